"""dataset_problem, the one check of a dataset path: missing, empty, damaged and mismatched idxmaps, SFT pairs
written apart, raw JSON files; a kill between the renames of a replacement never leaves a mix that loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_files import write_idxmap, write_sft_idxmap
from megatron_patch.data.dataset_checks import PRETRAIN_TOOL, SFT_TOOL, dataset_problem
from megatron_patch.fault_injection import FAULT_ENV, KILLED_EXIT_STATUS

from training_utils import REPO_ROOT  # noqa: E402
PREPROCESS = REPO_ROOT / "toolkits" / "pretrain_data_preprocessing" / "preprocess_data.py"


def test_the_check_imports_neither_torch_nor_megatron():
    # The launcher runs it before torchrun: torch's import alone takes seconds.
    code = ("import sys; from megatron_patch.data.dataset_checks import dataset_problem; "
            "dataset_problem('D', '/nonexistent', 'pretrain'); print('torch' in sys.modules, 'megatron' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert run.stdout.split() == ["False", "False"], run.stderr


def test_a_complete_idxmap_passes_and_missing_files_are_named(tmp_path):
    prefix = write_idxmap(tmp_path / "corpus_text_document", [[1, 2, 3], [4, 5]])
    assert dataset_problem("DATASET_PATH", prefix, "pretrain") is None
    Path(prefix + ".idx").unlink()
    problem = dataset_problem("DATASET_PATH", prefix, "pretrain")
    assert problem.startswith(f"DATASET_PATH {prefix} is not an idxmap dataset prefix: missing {prefix}.idx.")
    assert PRETRAIN_TOOL in problem
    # The prefix given to the preprocessor instead of the one it wrote: say which to pass.
    write_idxmap(tmp_path / "other_text_document", [[7]])
    problem = dataset_problem("DATASET_PATH", tmp_path / "other", "pretrain")
    assert f"pass {tmp_path / 'other_text_document'})" in problem


def test_an_empty_idxmap_is_refused(tmp_path):
    prefix = write_idxmap(tmp_path / "empty_text_document", [])
    problem = dataset_problem("VALID_DATASET_PATH", prefix, "pretrain")
    assert problem.startswith(f"VALID_DATASET_PATH {prefix} holds no documents ({prefix}.idx lists 0, {prefix}.bin has 0 bytes)")
    assert PRETRAIN_TOOL in problem


@pytest.mark.parametrize("other_documents, reason", [
    ([[9, 9, 9], [9, 9]], "the .bin's contents are not those the .idx was written for"),  # same size, new tokens
    ([[1, 2, 3, 4], [5, 6]], "the .idx indexes 20 bytes, the .bin has 24"),
])
def test_a_bin_beside_another_writes_idx_is_refused_naming_both(tmp_path, other_documents, reason):
    prefix = write_idxmap(tmp_path / "a", [[1, 2, 3], [4, 5]])
    other = write_idxmap(tmp_path / "b", other_documents)
    shutil.copy(other + ".bin", prefix + ".bin")
    problem = dataset_problem("DATASET_PATH", prefix, "pretrain")
    assert problem == (f"DATASET_PATH: {prefix}.bin and {prefix}.idx are not one pair ({reason}): the .bin was "
                       f"replaced without its .idx (a replacement cut short, or one file copied over). Write both "
                       f"again with {PRETRAIN_TOOL}.")


def test_megatron_reads_stamped_idxmaps_and_merges_them_with_its_own_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    a = write_idxmap(tmp_path / "a", [[1, 2, 3], [4, 5]])
    b = write_idxmap(tmp_path / "b", [[6], [7, 8]])
    assert [d.tolist() for d in IndexedDataset(a)] == [[1, 2, 3], [4, 5]]
    # Upstream's merge copies whole .bin files: the stamp lives in the .idx, so nothing shifts.
    builder = IndexedDatasetBuilder(str(tmp_path / "merged.bin"), dtype=np.int32)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(str(tmp_path / "merged.idx"))
    assert [d.tolist() for d in IndexedDataset(str(tmp_path / "merged"))] == [[1, 2, 3], [4, 5], [6], [7, 8]]
    # An idxmap without our stamp (upstream's tools, Pai's downloads) passes; its sizes are still compared.
    assert dataset_problem("DATASET_PATH", tmp_path / "merged", "pretrain") is None
    shutil.copy(a + ".bin", tmp_path / "merged.bin")
    assert "the .idx indexes 32 bytes, the .bin has 20" in dataset_problem("D", tmp_path / "merged", "pretrain")


def test_a_cut_index_is_refused(tmp_path):
    prefix = write_idxmap(tmp_path / "a", [[1, 2, 3], [4, 5]])
    data = Path(prefix + ".idx").read_bytes()
    Path(prefix + ".idx").write_bytes(data[:40])
    problem = dataset_problem("DATASET_PATH", prefix, "pretrain")
    assert problem.startswith(f"DATASET_PATH: {prefix}.idx is not a whole Megatron index (40 bytes where its header "
                              f"promises 82 (cut short or overwritten))")


def test_an_sft_pair_written_apart_is_refused(tmp_path):
    samples = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])]
    first = write_sft_idxmap(tmp_path / "first", samples)
    assert dataset_problem("DATASET_PATH", first, "sft") is None
    # Same lengths, other tokens: only the pair id tells the runs apart (identical data would be one pair).
    second = write_sft_idxmap(tmp_path / "second", [([1, 2, 9], [0, 1, 1]), ([4, 5], [0, 0])])
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{second}_label_document{suffix}", f"{first}_label_document{suffix}")
    assert dataset_problem("DATASET_PATH", first, "sft") == (
        f"DATASET_PATH: {first}_text_document.idx and {first}_label_document.idx were not written together (they "
        f"come from different preprocessing runs): one was replaced without the other. Write the pair again with "
        f"{SFT_TOOL}.")
    Path(f"{second}_label_document.idx").unlink()
    problem = dataset_problem("DATASET_PATH", second, "sft")
    assert problem.startswith(f"DATASET_PATH {second} is not an SFT idxmap prefix: missing "
                              f"{second}_label_document.idx. Pass the --output-prefix given to {SFT_TOOL}")


@pytest.mark.parametrize("content, problem", [
    (None, "is not a file; MP_DATASET_TYPE=raw reads a JSON/JSONL file."),
    ("\n  \n", "holds no records (the file is empty)."),
    ("[ \n ]\n", "holds no records (an empty JSON array)."),
    ("instruction: hi\n", "starts with 'i', not '[' or '{': MP_DATASET_TYPE=raw reads SFT records"),
    (json.dumps([{"instruction": "hi", "output": "ho"}]), None),
])
def test_raw_json_files(tmp_path, content, problem):
    path = tmp_path / "sft.json"
    if content is not None:
        path.write_text(content)
    found = dataset_problem("DATASET_PATH", path, "raw")
    assert found is None if problem is None else found.startswith(f"DATASET_PATH {path} {problem}"), found


def test_a_kill_between_the_renames_leaves_no_loadable_mix(tmp_path, default_tokenizer_dir):
    from megatron_patch.data.pretrain_preprocess import preprocess_pretrain_corpus

    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text('{"text": "the old corpus"}\n')
    new.write_text('{"text": "a new corpus with other words"}\n{"text": "and a second document"}\n')
    output_prefix = tmp_path / "out" / "c"
    prefix, _ = preprocess_pretrain_corpus([old], output_prefix, default_tokenizer_dir, show_progress=False)
    # The replacement, killed after the new .bin took its name and before the new .idx did.
    killed = subprocess.run(
        [sys.executable, str(PREPROCESS), "--input", str(new), "--output-prefix", str(output_prefix),
         "--tokenizer", str(default_tokenizer_dir), "--no-progress"],
        capture_output=True, text=True, timeout=300, env={**os.environ, FAULT_ENV: "data:between-renames"})
    assert killed.returncode == KILLED_EXIT_STATUS, killed.stderr[-2000:]
    (leftover,) = (tmp_path / "out").glob("c_text_document.tmp-*.idx")
    assert dataset_problem("DATASET_PATH", prefix, "pretrain").startswith(
        f"DATASET_PATH {prefix} is not an idxmap dataset prefix: missing {prefix}.idx ({leftover} is left from a "
        f"preprocessing run that was cut short).")
    # Running it again completes the replacement and clears what the killed run left.
    preprocess_pretrain_corpus([new], output_prefix, default_tokenizer_dir, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c_text_document.bin", "c_text_document.idx"]
    assert dataset_problem("DATASET_PATH", prefix, "pretrain") is None


def test_a_replaced_idxmap_drops_megatrons_sample_index_cache(tmp_path):
    # megatron-core keys PREFIX/cache/GPTDataset_indices by path and settings only, not by the documents.
    prefix = write_idxmap(tmp_path / "c_text_document", [[1, 2, 3]])
    cached = Path(prefix) / "cache" / "GPTDataset_indices" / "0123-GPTDataset-train-sample_index.npy"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"stale")
    write_idxmap(prefix, [[4, 5], [6]])
    assert not cached.parent.exists() and (Path(prefix) / "cache").is_dir()
    assert dataset_problem("DATASET_PATH", prefix, "pretrain") is None


def write_rows(prefix: Path, rows: list[list[int]], dtype=np.int32, lengths=None) -> str:
    """An idxmap written by megatron's own builder (no stamp, as upstream's tools write them)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for row in rows:
        builder.add_document(np.asarray(row, dtype=dtype), lengths or [len(row)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.parametrize("rows, dtype, lengths, why", [
    ([[1, 2, 3, 4], [5, 6, 7, 8]], np.uint16, None, "whose token ids are not int32"),
    ([[1, -3, 4, -100], [5, -7, 6, -100]], np.int32, [2, 2], "whose documents hold several sequences"),
    ([[1, 2, 3], [4, 5, 6]], np.int32, None, "of rows of an odd length"),
    ([[1, 2, 3, 4], [5, 6]], np.int32, None, "whose rows differ in length (2 and 4 tokens)"),
])
def test_a_single_idxmap_that_cannot_be_upstreams_sft_layout_is_refused(tmp_path, rows, dtype, lengths, why):
    prefix = write_rows(tmp_path / "sft_text_document", rows, dtype, lengths)
    # Given as upstream names it (PREFIX_text_document) or as its prefix.
    for given in (prefix, tmp_path / "sft"):
        assert dataset_problem("DATASET_PATH", given, "sft") == (
            f"DATASET_PATH {given} is not an SFT idxmap: {prefix}.bin/.idx is one idxmap {why}, neither the pair "
            f"{SFT_TOOL} writes (text and answer mask) nor the layout of Pai-Megatron-Patch's SFT builder. Build SFT "
            f"data from the JSON records with toolkits/sft_data_preprocessing/run_build_idxmap_sft_dataset.sh; a "
            f"pre-training idxmap trains with SFT=false.")


def test_our_sft_pair_is_found_from_either_name(tmp_path):
    from megatron_patch.data.dataset_checks import locate_sft_idxmap

    prefix = write_sft_idxmap(tmp_path / "alpaca", [([1, 2, 3], [0, 1, 1])])
    for given in (prefix, f"{prefix}_text_document"):
        assert dataset_problem("DATASET_PATH", given, "sft") is None
        assert (locate_sft_idxmap(given).layout, locate_sft_idxmap(given).prefix) == ("pair", prefix)
    # Its label idxmap gone (and nothing else of the pair): the text idxmap alone is not taken for upstream's.
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}_label_document{suffix}").unlink()
    assert dataset_problem("DATASET_PATH", prefix, "sft").startswith(
        f"DATASET_PATH {prefix} is not an SFT idxmap: {prefix}_text_document.bin/.idx is one idxmap written by this "
        f"toolkit (pre-training data, or an SFT pair's text without its _label_document), neither the pair")
