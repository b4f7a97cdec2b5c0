"""SFT data: answer masks token by token, idxmap vs raw JSON identity, packing, epochs, bad records and bytes,
empty inputs, atomic output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_patch.data.records import InputError
from megatron_patch.data.sft import SFTRecordError, build_sft_sample, plan_packing, record_to_messages
from megatron_patch.data.sft_dataset import RawJSONSFTDataset, SFTIdxMapDataset
from megatron_patch.data.sft_providers import packed_row_bounds
from megatron_patch.data.sft_preprocess import (
    build_sft_idxmap,
    label_prefix,
    meta_path,
    read_sft_records,
    text_prefix,
)
from megatron_patch.errors import UserError
from megatron_patch.tokenizer import IM_END_TOKEN_ID, IM_START_TOKEN_ID, PAD_TOKEN_ID, load_tokenizer

from missing_inputs import input_unavailable
from training_utils import REPO_ROOT  # noqa: E402
BUILD_SFT = REPO_ROOT / "toolkits" / "sft_data_preprocessing" / "build_idxmap_sft_dataset.py"

ALPACA_WITH_SYSTEM_AND_HISTORY = {
    "system": "你是一个翻译助手。", "history": [["1+1=?", "2"], ["Capital of France?", "Paris."]],
    "instruction": "把下面的句子翻译成英文", "input": "今天天气很好", "output": "The weather is nice today.",
}
MESSAGES_MULTI_TURN = {"messages": [
    {"role": "user", "content": "Write an add function in Python."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "And subtraction?"},
    {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
    {"role": "user", "content": "谢谢"},
    {"role": "assistant", "content": "不客气！"},
]}
SHAREGPT = {"conversations": [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "天空为什么是蓝色的？"},
    {"from": "gpt", "value": "因为瑞利散射：蓝光散射得更多。"},
]}
ALPACA_PLAIN = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
RECORDS = [ALPACA_WITH_SYSTEM_AND_HISTORY, MESSAGES_MULTI_TURN, SHAREGPT, ALPACA_PLAIN]
# (assistant answers in order) for each record, written out by hand
EXPECTED_ANSWERS = [
    ["2", "Paris.", "The weather is nice today."],
    ["def add(a, b):\n    return a + b", "def sub(a, b):\n    return a - b", "不客气！"],
    ["因为瑞利散射：蓝光散射得更多。"],
    ["Red."],
]


@pytest.fixture(scope="module")
def tok(default_tokenizer_dir):
    return load_tokenizer(default_tokenizer_dir)


def expected_answer_mask(tokens: list[int], tok) -> list[int]:
    """Independent of build_sft_sample: scan the ids for '<|im_start|>assistant\\n' and mark what follows up to
    and including the next <|im_end|>."""
    header = [IM_START_TOKEN_ID] + tok("assistant\n", add_special_tokens=False)["input_ids"]
    mask, i = [0] * len(tokens), 0
    while i < len(tokens):
        if tokens[i : i + len(header)] == header:
            j = i + len(header)
            while j < len(tokens):
                mask[j] = 1
                if tokens[j] == IM_END_TOKEN_ID:
                    break
                j += 1
            i = j
        i += 1
    return mask


@pytest.mark.parametrize("index", range(len(RECORDS)))
def test_answer_mask_covers_exactly_the_answers_and_their_im_end(tok, index):
    record, answers = RECORDS[index], EXPECTED_ANSWERS[index]
    sample = build_sft_sample(record, tok, max_length=4096)
    tokens = sample.tokens.tolist()
    # Same ids as tokenizing the template's rendering in one go.
    rendered = tok.apply_chat_template(record_to_messages(record), tokenize=False)
    assert tokens == tok(rendered, add_special_tokens=False)["input_ids"]
    assert sample.answer_mask.tolist() == expected_answer_mask(tokens, tok)
    # Each trained run decodes to one answer + <|im_end|>; the "\n" after it is never trained.
    runs, current = [], []
    for t, m in zip(tokens, sample.answer_mask.tolist()):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    assert not sample.truncated and not sample.is_empty


def test_alpaca_fields_become_chat_turns():
    messages = record_to_messages(ALPACA_WITH_SYSTEM_AND_HISTORY)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert messages[-2]["content"] == "把下面的句子翻译成英文\n今天天气很好"
    assert record_to_messages(ALPACA_PLAIN)[0]["content"] == "Name a primary color."


@pytest.mark.parametrize("record, message", [
    ({"text": "pre-training text"}, "not an SFT record"),
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "role 'narrator'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "starts with an assistant turn"),
    ({"instruction": "q", "output": 3}, "'output' must be a string"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"'history'\[0\]"),
    ({"instruction": "q", "input": "no answer"}, "no 'output': the record has no answer to train on"),
    ({"instruction": "q", "output": None}, "no 'output'"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
     "no assistant turn: nothing to train on"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q again"},
                        {"from": "gpt", "value": "a"}]}, r"turns \[0\] and \[1\] are both user turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}]}, r"turns \[1\] and \[2\] are both assistant turns"),
])
def test_bad_records_say_what_is_wrong(tok, record, message):
    with pytest.raises(SFTRecordError, match=message):
        build_sft_sample(record, tok, 128)


def test_truncation_is_explicit(tok):
    full = build_sft_sample(MESSAGES_MULTI_TURN, tok, 4096)
    cut = build_sft_sample(MESSAGES_MULTI_TURN, tok, 40)
    assert cut.truncated and len(cut) == 40
    assert cut.tokens.tolist() == full.tokens[:40].tolist() and cut.answer_mask.tolist() == full.answer_mask[:40].tolist()
    prompt_only = build_sft_sample(MESSAGES_MULTI_TURN, tok, 20)  # cut inside the system prompt
    assert prompt_only.truncated and prompt_only.is_empty


def test_plan_packing_is_a_deterministic_partition():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    rows = plan_packing(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert rows == plan_packing(lengths, 128)
    assert sum(lengths) / (len(rows) * 128) > 0.9  # best-fit decreasing packs tightly
    with pytest.raises(ValueError, match="seq_length"):
        plan_packing([10, 200], 128)


def test_several_tool_results_in_a_row_are_one_reply(tok):
    record = {"messages": [
        {"role": "user", "content": "Weather in Hangzhou and Beijing?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Hangzhou"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Beijing"}}}]},
        {"role": "tool", "content": "21"}, {"role": "tool", "content": "15"},
        {"role": "assistant", "content": "21 and 15 degrees."},
    ]}
    sample = build_sft_sample(record, tok, 512)
    assert tok.decode(sample.tokens[sample.answer_mask == 1]).endswith("21 and 15 degrees.<|im_end|>")


def write_sft_files(folder: Path) -> tuple[Path, Path]:
    """The same records as a JSON array (alpaca style) and as JSONL; more of them so packing has choices."""
    records = RECORDS * 3 + [
        {"instruction": f"Count to {n}.", "output": " ".join(str(i) for i in range(1, n + 1))} for n in (3, 20, 60)
    ] + [{"instruction": "Say nothing.", "output": ""}]
    array = folder / "sft.json"
    array.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    lines = folder / "sft.jsonl"
    lines.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return array, lines


def assert_same_items(a, b, indices):
    for i in indices:
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"item {i} differs in {key}"


def assert_bounds_fit_every_row(datasets, bounds) -> None:
    """The run's PackedRowBounds against every row of `datasets` as the trainer reads it: the fixed-size
    boundaries a CUDA graph replays (static_packed_seq_params) refine the row's own, cut no sample, and fit the
    bounds, which are tight (some row has that many segments, some sample that many tokens)."""
    from megatron_patch.data.providers import packed_seq_params_for, static_packed_seq_params
    from megatron_patch.data.sft_dataset import make_training_item

    most, longest = 0, 0
    for dataset in datasets:
        for row in range(dataset.row_count):
            item = make_training_item(dataset.row_samples(row), dataset.seq_length, packing=True)
            segments, positions = item["segment_ids"][None], item["position_ids"][None]
            cuts = static_packed_seq_params(segments, positions, bounds).cu_seqlens_q.tolist()
            own = packed_seq_params_for(segments, "cpu").cu_seqlens_q.tolist()
            used = sorted(set(cuts))
            assert set(own) <= set(used) and len(cuts) == bounds.segments + 1 and cuts[-1] == own[-1]
            assert max(b - a for a, b in zip(used, used[1:])) <= bounds.longest
            samples = dataset.row_lengths(row)
            assert own[1 : len(samples) + 1] == np.cumsum(samples).tolist()  # row_lengths: the item's samples
            most, longest = max(most, len(used) - 1), max(longest, *samples)
    assert (most, longest) == (bounds.segments, bounds.longest)


@pytest.mark.parametrize("packing", [False, True])
def test_raw_json_and_idxmap_datasets_give_identical_items(tmp_path, default_tokenizer_dir, tok, packing):
    array, lines = write_sft_files(tmp_path)
    seq_length = 160
    stats = build_sft_idxmap(array, tmp_path / "sft", default_tokenizer_dir, seq_length, packing=packing,
                             show_progress=False)
    assert stats.samples == 16 and stats.empty == 1 and stats.truncated >= 1  # the 60-count and long chats
    meta = json.loads(Path(meta_path(tmp_path / "sft")).read_text())
    assert (meta["packed"], meta["seq_length"], meta["samples"], meta["rows"]) == (packing, 160, 16, stats.rows)
    num_samples = 3 * stats.rows + 2  # wraps into a 4th epoch
    idxmap = SFTIdxMapDataset(tmp_path / "sft", seq_length, num_samples, seed=11, packing=packing)
    for source in (array, lines):
        raw = RawJSONSFTDataset(source, tok, seq_length, num_samples, seed=11, packing=packing)
        assert len(raw) == len(idxmap) == num_samples
        assert_same_items(idxmap, raw, range(num_samples))
        if packing:
            assert_bounds_fit_every_row([raw], packed_row_bounds([raw]))
    if packing:
        assert_bounds_fit_every_row([idxmap], packed_row_bounds([idxmap]))
    item = idxmap[0]
    expected_keys = {"tokens", "labels", "loss_mask", "position_ids"} | ({"segment_ids"} if packing else set())
    assert set(item) == expected_keys
    assert all(v.shape == (seq_length,) for v in item.values())
    assert item["tokens"].dtype == item["labels"].dtype == item["position_ids"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32


def test_packing_at_load_time_matches_prepacked(tmp_path, default_tokenizer_dir):
    array, _ = write_sft_files(tmp_path)
    build_sft_idxmap(array, tmp_path / "flat", default_tokenizer_dir, 160, packing=False, show_progress=False)
    build_sft_idxmap(array, tmp_path / "packed", default_tokenizer_dir, 160, packing=True, show_progress=False)
    at_load = SFTIdxMapDataset(tmp_path / "flat", 160, 20, seed=3, packing=True)
    prepacked = SFTIdxMapDataset(tmp_path / "packed", 160, 20, seed=3, packing=True)
    assert_same_items(at_load, prepacked, range(20))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text = IndexedDataset(text_prefix(tmp_path / "packed"))
    assert len(text.document_indices) - 1 == prepacked.row_count < len(text)  # documents hold several samples


def test_item_labels_positions_and_segments(tmp_path, default_tokenizer_dir, tok):
    array, _ = write_sft_files(tmp_path)
    samples = [build_sft_sample(r, tok, 160) for r in json.loads(array.read_text())]
    build_sft_idxmap(array, tmp_path / "p", default_tokenizer_dir, 160, packing=True, show_progress=False)
    dataset = SFTIdxMapDataset(tmp_path / "p", 160, None, seed=0, packing=True)
    plan = plan_packing([len(s) for s in samples], 160)  # the preprocessor wrote rows in this order
    assert len(dataset) == len(plan)
    for i in range(len(dataset)):
        item = {k: v.tolist() for k, v in dataset[i].items()}
        row = [samples[j] for j in plan[dataset.row_index(i)]]
        at = 0
        for k, sample in enumerate(row):
            span = range(at, at + len(sample))
            assert [item["tokens"][j] for j in span] == sample.tokens.tolist()
            assert [item["segment_ids"][j] for j in span] == [k] * len(sample)
            assert [item["position_ids"][j] for j in span] == list(range(len(sample)))
            # Targets stay inside the sample: the last token predicts nothing.
            assert [item["labels"][j] for j in span][:-1] == sample.tokens[1:].tolist()
            assert item["labels"][span[-1]] == PAD_TOKEN_ID
            assert [item["loss_mask"][j] for j in span] == sample.answer_mask[1:].astype(float).tolist() + [0.0]
            at += len(sample)
        padding = range(at, 160)
        assert all(item["tokens"][j] == PAD_TOKEN_ID and item["loss_mask"][j] == 0 for j in padding)
        assert all(item["segment_ids"][j] == len(row) for j in padding)  # an id no real token has
        assert [item["position_ids"][j] for j in padding] == list(range(len(padding)))


def test_epochs_are_reproducible_shuffles(tmp_path, default_tokenizer_dir):
    array, _ = write_sft_files(tmp_path)
    build_sft_idxmap(array, tmp_path / "e", default_tokenizer_dir, 160, show_progress=False)
    a = SFTIdxMapDataset(tmp_path / "e", 160, 48, seed=5, packing=False)
    b = SFTIdxMapDataset(tmp_path / "e", 160, 48, seed=5, packing=False)
    rows = [a.row_index(i) for i in range(48)]
    assert rows == [b.row_index(i) for i in range(48)]
    epochs = [rows[e * 16 : (e + 1) * 16] for e in range(3)]
    assert all(sorted(e) == list(range(16)) for e in epochs)  # each epoch sees every sample once
    assert epochs[0] != epochs[1]
    assert rows != [SFTIdxMapDataset(tmp_path / "e", 160, 48, seed=6, packing=False).row_index(i) for i in range(48)]
    with pytest.raises(IndexError):
        a[48]


def test_malformed_json_line_names_file_and_line_and_writes_nothing(tmp_path, default_tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA_PLAIN) + "\n" + '{"instruction": "x", "output": \n' + json.dumps(SHAREGPT) + "\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"(?s){path}:2: malformed JSON.*--skip-bad-lines"):
        build_sft_idxmap(path, out / "sft", default_tokenizer_dir, 128, packing=True, show_progress=False)
    assert not out.exists() or list(out.iterdir()) == []
    stats = build_sft_idxmap(path, out / "sft", default_tokenizer_dir, 128, skip_bad_lines=True, show_progress=False)
    assert stats.samples == 2 and stats.skipped_bad_records == 1
    assert stats.bad_record_messages[0].startswith(f"{path}:2: malformed JSON")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        Path(p).name for p in (text_prefix(out / "sft") + ".bin", text_prefix(out / "sft") + ".idx",
                               label_prefix(out / "sft") + ".bin", label_prefix(out / "sft") + ".idx",
                               meta_path(out / "sft")))


def test_bad_record_in_json_array_names_its_line(tmp_path, default_tokenizer_dir, tok):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"prompt": "wrong keys"}\n]\n')
    with pytest.raises(InputError, match=rf"{path}:3: not an SFT record"):
        build_sft_idxmap(path, tmp_path / "x", default_tokenizer_dir, 64, show_progress=False)
    with pytest.raises(InputError, match=rf"{path}:3: not an SFT record"):
        RawJSONSFTDataset(path, tok, 64, None, 0, packing=False)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": oops}\n]\n')
    with pytest.raises(InputError, match=rf"{broken}:3: malformed JSON array"):
        build_sft_idxmap(broken, tmp_path / "y", default_tokenizer_dir, 64, show_progress=False)
    assert list(tmp_path.glob("x*")) == [] and list(tmp_path.glob("y*")) == []


def test_records_without_an_answer_or_with_repeated_turns_name_their_line(tmp_path, default_tokenizer_dir, tok):
    path = tmp_path / "sft.jsonl"
    lines = [ALPACA_PLAIN, {"instruction": "no output"}, SHAREGPT,
             {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]}, MESSAGES_MULTI_TURN]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    with pytest.raises(InputError, match=rf"(?s)^error: {path}:2: no 'output'.*--skip-bad-lines"):
        build_sft_idxmap(path, tmp_path / "out" / "sft", default_tokenizer_dir, 256, show_progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    stats = build_sft_idxmap(path, tmp_path / "out" / "sft", default_tokenizer_dir, 256, skip_bad_lines=True,
                             show_progress=False)
    assert (stats.samples, stats.skipped_bad_records, stats.empty) == (3, 2, 0)
    assert stats.bad_record_messages[1] == (f"{path}:4: turns [0] and [1] are both user turns; user and assistant "
                                            f"turns must alternate (merge the two turns)")
    assert stats.bad_record_messages[0].startswith(f"{path}:2: no 'output'")
    # The raw dataset applies the same rules.
    with pytest.raises(InputError, match=rf"{path}:2: no 'output'"):
        RawJSONSFTDataset(path, tok, 256, None, 0, packing=False)
    assert len(RawJSONSFTDataset(path, tok, 256, None, 0, packing=False, skip_bad_records=True)) == 3


def test_bytes_that_are_not_utf8_name_their_line_in_arrays_and_jsonl(tmp_path, default_tokenizer_dir):
    latin1 = '{"instruction": "caf\u00e9", "output": "ok"}'.encode("latin-1")  # é as the single byte 0xe9
    array = tmp_path / "sft.json"
    array.write_bytes(b"[\n" + json.dumps(ALPACA_PLAIN).encode() + b",\n" + latin1 + b"\n]\n")
    jsonl = tmp_path / "sft.jsonl"
    jsonl.write_bytes(latin1 + b"\n" + json.dumps(ALPACA_PLAIN).encode() + b"\n")
    for path, line in ((array, 3), (jsonl, 1)):
        with pytest.raises(InputError, match=rf"^error: {path}:{line}: not UTF-8 \(byte 0xe9 at column 21\)"):
            build_sft_idxmap(path, tmp_path / "o", default_tokenizer_dir, 128, show_progress=False)
        stats = build_sft_idxmap(path, tmp_path / "o", default_tokenizer_dir, 128, skip_bad_lines=True,
                                 show_progress=False)
        assert (stats.samples, stats.skipped_bad_records) == (1, 1)


@pytest.mark.parametrize("content, message", [
    ("", " is empty: no SFT records, nothing written. Check --input."),
    ("[\n]\n", ": no SFT samples (0 bad records skipped); nothing written."),
])
def test_empty_sft_inputs_are_refused_and_write_nothing(tmp_path, default_tokenizer_dir, content, message):
    path = tmp_path / "sft.json"
    path.write_text(content)
    with pytest.raises(InputError, match="^" + re.escape(f"error: {path}{message}")):
        build_sft_idxmap(path, tmp_path / "out" / "sft", default_tokenizer_dir, 128, show_progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_idxmap_dataset_refuses_an_empty_or_unpaired_prefix(tmp_path):
    from data_files import write_sft_idxmap

    with pytest.raises(UserError, match=rf"^error: SFT data path {tmp_path / 'none'} is not an SFT idxmap prefix"):
        SFTIdxMapDataset(tmp_path / "none", 64, None, 0, packing=False)
    empty = write_sft_idxmap(tmp_path / "empty", [])
    with pytest.raises(UserError, match=rf"^error: SFT data path {empty}_text_document holds no documents"):
        SFTIdxMapDataset(empty, 64, None, 0, packing=False)


def test_cli_on_a_real_alpaca_corpus(tmp_path, default_tokenizer_dir, tok):
    from sample_corpora import CorpusUnavailable, alpaca_zh_demo_path

    try:
        source = alpaca_zh_demo_path()
    except CorpusUnavailable as e:
        input_unavailable(f"alpaca_zh_demo.json comes from the llamafactory sdist on PyPI, unreachable here: {e}")
    records = json.loads(source.read_text(encoding="utf-8"))[:200]  # capped to keep the test quick
    path = tmp_path / "alpaca_zh.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    run = subprocess.run(
        [sys.executable, str(BUILD_SFT), "--input", str(path), "--output-prefix", str(tmp_path / "az"),
         "--tokenizer", str(default_tokenizer_dir), "--seq-length", "256", "--packing"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads(Path(meta_path(tmp_path / "az")).read_text())
    assert meta["samples"] == 200 and meta["packed"] and f"{meta['truncated']:,} truncated to 256" in run.stdout
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text, labels = IndexedDataset(text_prefix(tmp_path / "az")), IndexedDataset(label_prefix(tmp_path / "az"))
    assert len(text) == 200 and meta["rows"] == len(text.document_indices) - 1 < 200
    untruncated = {r["output"] + "<|im_end|>" for r in records}
    decoded = [tok.decode(text[i][labels[i] == 1]) for i in range(len(text))]
    assert sum(d in untruncated for d in decoded) == 200 - meta["truncated"]


# ---- upstream's item forms, compressed inputs and flags ----

COUNTING = [{"instruction": f"Count to {n}.", "input": "", "output": " ".join(map(str, range(1, n + 1)))}
            for n in (2, 3, 4, 5, 6, 7)]


def test_a_list_item_is_packed_together(tmp_path, default_tokenizer_dir, tok):
    path = tmp_path / "groups.jsonl"
    items = [COUNTING[0], COUNTING[1:4], COUNTING[4], [COUNTING[5]]]
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    stats = build_sft_idxmap(path, tmp_path / "g", default_tokenizer_dir, 160, show_progress=False)
    assert (stats.samples, stats.rows) == (6, 4)
    assert json.loads(Path(meta_path(tmp_path / "g")).read_text())["packed"]
    # MP_SFT_PACKING=true trains the rows as grouped; without packing each sample is alone.
    grouped = SFTIdxMapDataset(tmp_path / "g", 160, None, seed=0, packing=True)
    assert sorted(grouped.rows) == [[0], [1, 2, 3], [4], [5]]
    assert [int(grouped[i]["segment_ids"].max()) for i in range(4)].count(3) == 1  # three samples + padding
    assert len(SFTIdxMapDataset(tmp_path / "g", 160, None, seed=0, packing=False)) == 6
    # The raw JSON reader takes a list item's records one by one.
    assert len(RawJSONSFTDataset(path, tok, 160, None, seed=0, packing=False)) == 6
    # A group longer than a row goes on in the next row, in its order (upstream's builder does the same).
    stats = build_sft_idxmap(path, tmp_path / "short", default_tokenizer_dir, 64, show_progress=False)
    assert (stats.samples, stats.rows) == (6, 6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps([COUNTING[0], {"instruction": "no answer"}]) + "\n" + json.dumps([]) + "\n")
    with pytest.raises(InputError, match=rf"^error: {bad}:1: \[1\] of the list: no 'output': the record has no answer"):
        build_sft_idxmap(bad, tmp_path / "b", default_tokenizer_dir, 64, show_progress=False)
    with pytest.raises(InputError, match=rf"^error: {bad}: no SFT samples \(2 bad records skipped\)"):
        build_sft_idxmap(bad, tmp_path / "b", default_tokenizer_dir, 64, skip_bad_lines=True, show_progress=False)
    _, messages = read_sft_records(bad, skip_bad=True)
    assert messages[1] == f"{bad}:2: expected a JSON object, or a list of them to pack together; got an empty list"


def test_compressed_sft_files_and_folders_read_as_the_plain_files(tmp_path, default_tokenizer_dir):
    import gzip

    import zstandard

    array, lines = write_sft_files(tmp_path)
    folder = tmp_path / "pieces"
    folder.mkdir()
    (folder / "a.json.zst").write_bytes(zstandard.ZstdCompressor().compress(array.read_bytes()))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines.read_bytes()))
    build_sft_idxmap([array, lines], tmp_path / "plain", default_tokenizer_dir, 160, show_progress=False)
    build_sft_idxmap(folder, tmp_path / "packed", default_tokenizer_dir, 160, show_progress=False)
    for prefix in (text_prefix, label_prefix):
        for suffix in (".bin", ".idx"):
            assert Path(prefix(tmp_path / "plain") + suffix).read_bytes() == \
                Path(prefix(tmp_path / "packed") + suffix).read_bytes()


@pytest.fixture(scope="module")
def sft_main():
    import runpy

    return runpy.run_path(str(BUILD_SFT))["main"]


def test_upstreams_sft_flags(tmp_path, default_tokenizer_dir, sft_main, capsys):
    array, _ = write_sft_files(tmp_path)
    # The flags upstream's run_build_idxmap_sft_dataset.sh passes, plus two more upstream spellings.
    assert sft_main(["--input", str(array), "--output-prefix", str(tmp_path / "mmap_qwen2_sft_datasets"),
                     "--patch-tokenizer-type", "Qwen2Tokenizer", "--load", str(default_tokenizer_dir),
                     "--seq-length", "160", "--workers", "1", "--partitions", "1", "--sequence-packing",
                     "--append-eod", "--json-keys", "text", "--no-progress"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")] == [
        "note: --partitions 1 changes nothing here: one pass reads the inputs in order and --workers sets the "
        "parallelism.",
        "note: --append-eod changes nothing here: every answer already ends with <|im_end|>."]
    assert json.loads(Path(meta_path(tmp_path / "mmap_qwen2_sft_datasets")).read_text())["packed"]
    with pytest.raises(SystemExit):
        sft_main(["--input", str(array), "--output-prefix", str(tmp_path / "x"), "--load", str(default_tokenizer_dir),
                  "--seq-length", "160", "--json-keys", "content"])
    assert "--json-keys content: the SFT builder writes PREFIX_text_document" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft_main(["--input", str(array), "--output-prefix", str(tmp_path / "x"), "--seq-length", "160"])
    assert "error: --tokenizer (or --load) is required" in capsys.readouterr().err


# ---- SFT idxmaps built by Pai-Megatron-Patch's own builder ----


@pytest.mark.parametrize("packing", [True, False])
def test_an_upstream_sft_idxmap_trains_by_its_own_labels(tmp_path, tok, packing):
    from data_files import write_upstream_sft_idxmap
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data.sft_providers import open_sft_idxmap

    items = [COUNTING[0], COUNTING[1:3], COUNTING[3], COUNTING[4:]]
    prefix = write_upstream_sft_idxmap(tmp_path / "mmap_qwen2_sft_datasets_text_document", items, tok, 160)
    written = IndexedDataset(prefix)  # held: megatron unmaps the file when the dataset goes
    upstream = np.stack([written[i] for i in range(len(written))])  # [rows, 2 x 160]: tokens, then shifted labels
    dataset = open_sft_idxmap(prefix, 160, None, seed=0, packing=packing)
    assert "Pai-Megatron-Patch's layout" in dataset.describe()
    assert len(dataset) == (len(upstream) if packing else len(COUNTING))
    decoded = []
    for i in range(len(dataset)):
        item = {k: v.numpy() for k, v in dataset[i].items()}
        trained = item["loss_mask"] > 0
        decoded.append(tok.decode(item["labels"][trained]))
        if packing:  # a row as built: upstream's tokens, labels, and sample boundaries
            row = upstream[dataset.row_index(i)]
            tokens, labels = row[:160], row[160:]
            assert item["tokens"].tolist() == np.where(tokens < 0, -1 - tokens, tokens).tolist()
            assert trained.tolist() == (labels != -100).tolist()
            assert item["labels"][trained].tolist() == labels[labels != -100].tolist()
            starts = [0] + (np.flatnonzero(tokens < 0) + 1).tolist()
            assert [j for j in range(160) if item["position_ids"][j] == 0] == starts
    if not packing:  # upstream trains everything after the prompt: the assistant header to the last newline
        expected = [f"<|im_start|>assistant\n{r['output']}<|im_end|>\n" for r in COUNTING]
        assert sorted(decoded) == sorted(expected)


def test_older_or_unfit_upstream_sft_idxmaps_are_refused(tmp_path, tok):
    from data_files import write_idxmap, write_upstream_sft_idxmap
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_patch.data.dataset_checks import SFT_TOOL, dataset_problem
    from megatron_patch.data.sft_providers import open_sft_idxmap

    # Before February 2025 upstream's rows did not mark where a sample ends: packed samples cannot be told apart.
    old = write_upstream_sft_idxmap(tmp_path / "old_text_document", COUNTING[:2], tok, 96, end_markers=False)
    with pytest.raises(UserError, match=rf"^error: SFT data path {old}: row 0, position 0: no sample ends in this "
                                        rf"row .* older than February 2025.* Build the data again from its JSON "
                                        rf"records with toolkits/sft_data_preprocessing/run_build_idxmap_sft_dataset"):
        open_sft_idxmap(old, 96, None, 0, packing=True)
    # Labels that are not the next tokens (e.g. unshifted): refused, not trained.
    good = write_upstream_sft_idxmap(tmp_path / "good_text_document", COUNTING[:1], tok, 96)
    written = IndexedDataset(good)  # held: megatron unmaps the file when the dataset goes
    row = written[0].copy()
    trained = np.flatnonzero(row[96:] != -100)
    row[96 + trained] = np.abs(row[trained])  # each label its own position's token: not shifted
    builder = IndexedDatasetBuilder(str(tmp_path / "unshifted_text_document.bin"), dtype=np.int32)
    builder.add_document(row, [len(row)])
    builder.finalize(str(tmp_path / "unshifted_text_document.idx"))
    with pytest.raises(UserError, match=rf"row 0, position {trained[0]}: label {row[96 + trained[0]]} is not the next "
                                        rf"token: labels are not the row's tokens shifted by one"):
        open_sft_idxmap(tmp_path / "unshifted_text_document", 96, None, 0, packing=False)
    # A pre-training idxmap given as SFT data.
    uneven = tmp_path / "uneven_text_document"
    builder = IndexedDatasetBuilder(f"{uneven}.bin", dtype=np.int32)
    for document in ([1, 2, 3, 4], [5, 6]):
        builder.add_document(np.asarray(document, dtype=np.int32), [len(document)])
    builder.finalize(f"{uneven}.idx")
    assert "is one idxmap whose rows differ in length (2 and 4 tokens)" in dataset_problem("D", uneven, "sft")
    ours = write_idxmap(tmp_path / "ours_text_document", [[1, 2], [3, 4]])
    assert dataset_problem("D", ours, "sft").startswith(
        f"D {ours} is not an SFT idxmap: {ours}.bin/.idx is one idxmap written by this toolkit (pre-training data, "
        f"or an SFT pair's text without its _label_document), neither the pair {SFT_TOOL} writes")


# Two samples (10 11 12 | 20 21) and one padding position; labels shifted, -100 where untrained.
UPSTREAM_ROW_TOKENS = [10, 11, -1 - 12, 20, -1 - 21, 0]
UPSTREAM_ROW_LABELS = [-100, 12, -100, 21, -100, -100]


@pytest.mark.parametrize("position, label, message", [
    (None, None, None),
    (1, -5, "label -5 is neither -100 nor a token id"),
    (2, 20, "a sample's last position is trained (label 20), though nothing follows it"),
    (1, 99, "label 99 is not the next token: labels are not the row's tokens shifted by one"),
    (5, 7, "label 7 in the padding after the row's last sample"),
])
def test_each_upstream_row_is_checked(position, label, message):
    from megatron_patch.data.upstream_sft_idxmap import row_problem

    labels = list(UPSTREAM_ROW_LABELS)
    if position is not None:
        labels[position] = label
    found = row_problem(np.asarray([UPSTREAM_ROW_TOKENS]), np.asarray([labels]))
    assert found == (None if message is None else (0, position, message))


def test_an_upstream_idxmap_with_a_row_of_another_length_is_refused(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_patch.data import dataset_checks
    from megatron_patch.data.sft_providers import open_sft_idxmap

    row = UPSTREAM_ROW_TOKENS + UPSTREAM_ROW_LABELS
    builder = IndexedDatasetBuilder(str(tmp_path / "u_text_document.bin"), dtype=np.int32)
    for values in (row, row + [1, -100], row):
        builder.add_document(np.asarray(values, dtype=np.int32), [len(values)])
    builder.finalize(str(tmp_path / "u_text_document.idx"))
    monkeypatch.setattr(dataset_checks, "SAMPLED_ROWS", 1)  # the cheap check sees the first and last rows only
    with pytest.raises(UserError, match=r"row 1 has 14 values where row 0 has 12: not Pai-Megatron-Patch's SFT "
                                        r"layout"):
        open_sft_idxmap(tmp_path / "u", 6, None, 0, packing=False)
    with pytest.raises(UserError, match="is not an SFT idxmap pair; open it with open_sft_idxmap"):
        SFTIdxMapDataset(tmp_path / "u_text_document", 6, None, 0, packing=False)


def test_text_after_a_json_arrays_end_is_refused(tmp_path, default_tokenizer_dir):
    path = tmp_path / "two.json"
    path.write_text(json.dumps([ALPACA_PLAIN], indent=1) + "\n" + json.dumps(ALPACA_PLAIN) + "\n")
    with pytest.raises(InputError, match=rf"^error: {path}:8: more text after the JSON array's closing '\]'\. A JSON "
                                         rf"file holds one array of records; JSONL holds one record \(or one list of "
                                         rf"records\) per line\."):
        build_sft_idxmap(path, tmp_path / "x", default_tokenizer_dir, 64, show_progress=False)


# ---- blends: 'W1 P1 W2 P2 ...', as the entrypoint gets them ----


def test_an_sft_blend_draws_by_its_weights(tmp_path, default_tokenizer_dir, tok, monkeypatch):
    from data_files import assert_drawn_by_weight, write_upstream_sft_idxmap
    from megatron.training.arguments import parse_args

    from megatron_patch.megatron_flags import add_extra_args
    from megatron_patch.data.sft_providers import open_sft_idxmap
    from megatron_patch.data.sft_providers import BlendedSFTDataset, build_sft_datasets, \
        packed_row_bounds_of_this_run

    array, _ = write_sft_files(tmp_path)
    build_sft_idxmap(array, tmp_path / "ours", default_tokenizer_dir, 160, show_progress=False)
    theirs = write_upstream_sft_idxmap(tmp_path / "theirs_text_document", COUNTING, tok, 160)
    monkeypatch.setattr(sys, "argv", ["pretrain_qwen", "--instruction-tuning", "--dataset-type", "idxmap",
                                      "--seq-length", "160", "--seed", "7", "--sft-packing", "--tokenizer-type",
                                      "HuggingFaceTokenizer", "--tokenizer-model", str(default_tokenizer_dir),
                                      "--train-data-path", "1", str(tmp_path / "ours"), "3", theirs,
                                      "--valid-data-path", theirs])
    train, valid, test = build_sft_datasets(parse_args(add_extra_args), [100, 5, 0])
    assert isinstance(train, BlendedSFTDataset) and len(train) == 100 and test is None
    # What a CUDA graph sizes the packed samples' boundaries by: every row of both layouts, blend opened up.
    assert_bounds_fit_every_row(train.datasets + [valid], packed_row_bounds_of_this_run())
    assert "Pai-Megatron-Patch's layout" in valid.describe() and len(valid) == 5
    assert_drawn_by_weight(train.dataset_index, [1, 3])
    # Each item is its dataset's own item, each dataset read in its own order.
    ours, upstream = (open_sft_idxmap(path, 160, n, seed, packing=True) for path, n, seed in
                      ((tmp_path / "ours", 25, 7), (theirs, 75, 1007)))
    for i in (0, 1, 2, 3, 50, 99):
        source = (ours, upstream)[train.dataset_index[i]]
        assert_same_items({0: train[i]}, {0: source[int(train.dataset_sample_index[i])]}, [0])
    with pytest.raises(UserError, match=r"^error: --valid-data-path: the weight '0' of .* must be a positive number"):
        monkeypatch.setattr(sys, "argv", sys.argv[:-1] + ["0", theirs])
        build_sft_datasets(parse_args(add_extra_args), [100, 5, 0])
