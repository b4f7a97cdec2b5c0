"""SFT records -> an idxmap pair the SFTIdxMapDataset reads.

Layout for `--output-prefix P`:
  P_text_document.{bin,idx}   int32 token ids; one *sequence* per SFT sample
  P_label_document.{bin,idx}  uint8 answer mask, same sequence lengths and document boundaries as the text
  P_sft_meta.json             seq_length, packed, the counts (samples, truncated, empty, skipped) and the pair
                              id of the .idx stamps (see idxmap_stamp), so a reader ignores a meta file left
                              from another run
Unpacked, each sample is its own *document*, except the records of one input item that is a list (upstream's
"pack these together"): they share documents of at most seq_length tokens, in their order. With packing, each
document is one packed row of several sequences (Megatron's document_indices; list items are packed with the
rest), so sample boundaries survive and the reader restarts positions per sample. Inputs are JSON / JSONL files (optionally .gz or .zst), or folders
of them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_patch.data.parallel import ordered_parallel_map
from megatron_patch.data.records import (
    JSON_LINES_SUFFIXES,
    InputError,
    JsonRecord,
    first_non_space_chars,
    input_files,
    iter_json_records,
    stop_or_note_bad_input,
)
from megatron_patch.data.sft import SFTRecordError, build_sft_sample, plan_packing, sft_group, split_group

CHUNK_RECORDS = 64
META_FORMAT = "megatron_patch.sft_idxmap/1"


def text_prefix(prefix: str | Path) -> str:
    return f"{prefix}_text_document"


def label_prefix(prefix: str | Path) -> str:
    return f"{prefix}_label_document"


def meta_path(prefix: str | Path) -> str:
    return f"{prefix}_sft_meta.json"


@dataclass
class SFTPreprocessStats:
    samples: int = 0  # written
    tokens: int = 0
    answer_tokens: int = 0
    truncated: int = 0  # cut to seq_length (kept)
    empty: int = 0  # no answer token left (kept, they train nothing)
    skipped_bad_records: int = 0
    rows: int = 0  # documents written: samples, or packed rows
    seconds: float = 0.0
    bad_record_messages: list[str] = field(default_factory=list)

    def summary(self, prefix: str, seq_length: int, packing: bool) -> str:
        packed = packing or self.rows < self.samples
        fill = f", {self.rows:,} packed rows ({self.tokens / max(self.rows * seq_length, 1):.0%} full)" if packed else ""
        return (
            f"done: {self.samples:,} samples, {self.tokens:,} tokens ({self.answer_tokens:,} answer tokens), "
            f"{self.truncated:,} truncated to {seq_length}, {self.empty:,} with no answer token, "
            f"{self.skipped_bad_records:,} bad records skipped{fill}, {self.seconds:.1f}s "
            f"-> {text_prefix(prefix)} + {label_prefix(prefix)}"
        )


def _bad(record: JsonRecord, why: str, skip: bool, stats: SFTPreprocessStats) -> None:
    stop_or_note_bad_input(f"{record.where}: {why}", skip, "record", stats.bad_record_messages)
    stats.skipped_bad_records += 1


def iter_valid_sft_records(paths: list[Path], skip_bad: bool, stats: SFTPreprocessStats) -> Iterator[JsonRecord]:
    """Parsed items of the files in order (a record, or a list of records to pack together) that look like SFT
    samples; bad ones raise InputError (file:line) or are counted."""
    for path in paths:
        for record in iter_json_records(path):
            if record.error is not None:
                _bad(record, record.error, skip_bad, stats)
                continue
            try:
                sft_group(record.value)
            except SFTRecordError as e:
                _bad(record, str(e), skip_bad, stats)
                continue
            yield record


def read_sft_records(path: str | Path, skip_bad: bool = False) -> tuple[list[JsonRecord], list[str]]:
    """All valid records of an SFT file, a list item's records one by one, and the messages of skipped ones."""
    stats = SFTPreprocessStats()
    records = [JsonRecord(item.source, item.line, value=record)
               for item in iter_valid_sft_records([Path(path)], skip_bad, stats) for record in sft_group(item.value)]
    return records, stats.bad_record_messages


# ---- worker side ----

_TOKENIZER = None
_TOKENIZER_DIR = ""
_MAX_LENGTH = 0


def init_sft_worker(tokenizer_dir: str, max_length: int, in_worker: bool = True) -> None:
    """Load the tokenizer once per process (a run in this process reuses the last one: seconds each)."""
    global _TOKENIZER, _TOKENIZER_DIR, _MAX_LENGTH
    if in_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from megatron_patch.tokenizer import load_tokenizer

    if _TOKENIZER is None or _TOKENIZER_DIR != str(Path(tokenizer_dir).resolve()):
        _TOKENIZER, _TOKENIZER_DIR = load_tokenizer(tokenizer_dir), str(Path(tokenizer_dir).resolve())
    _MAX_LENGTH = max_length


def encode_sft_chunk(chunk: list[tuple[str, int, object]]) -> list[tuple[str, int, list | None, str | None]]:
    """[(file, line, the item's SFTSamples or None, error or None)] for (file, line, item) triples."""
    out = []
    for source, line, value in chunk:
        try:
            out.append((source, line, [build_sft_sample(r, _TOKENIZER, _MAX_LENGTH) for r in sft_group(value)], None))
        except SFTRecordError as e:
            out.append((source, line, None, str(e)))
    return out


def _chunks(records: Iterator[JsonRecord]) -> Iterator[list[tuple[str, int, object]]]:
    batch = []
    for record in records:
        batch.append((record.source, record.line, record.value))
        if len(batch) >= CHUNK_RECORDS:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_packed(unpacked_prefix: str, prefix: str, seq_length: int, stats: SFTPreprocessStats) -> bytes:
    """Second pass: regroup the unpacked samples into packed rows (documents of several sequences); returns the
    pair id of the written idxmaps."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data.indexed_writer import atomic_indexed_writers, token_dtype

    text = IndexedDataset(text_prefix(unpacked_prefix))
    labels = IndexedDataset(label_prefix(unpacked_prefix))
    rows = plan_packing(text.sequence_lengths.tolist(), seq_length)
    outputs = [(text_prefix(prefix), token_dtype()), (label_prefix(prefix), np.uint8)]
    with atomic_indexed_writers(outputs) as (text_out, label_out):
        for row in rows:
            text_out.add_document([text[i] for i in row])
            label_out.add_document([labels[i] for i in row])
    stats.rows = len(rows)
    return text_out.pair_id


def _sft_input_files(inputs: str | Path | list[str | Path]) -> list[Path]:
    files, _ = input_files(inputs if isinstance(inputs, list) else [inputs], JSON_LINES_SUFFIXES)
    for path in files:
        if not first_non_space_chars(path):
            raise InputError(f"error: {path} is empty: no SFT records, nothing written. Check --input.")
    return files


def build_sft_idxmap(
    input_path: str | Path | list[str | Path],
    output_prefix: str | Path,
    tokenizer_dir: str | Path,
    seq_length: int,
    packing: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    show_progress: bool = True,
) -> SFTPreprocessStats:
    """Write the SFT idxmap pair (and meta) for alpaca / messages / ShareGPT files (or folders of them). See the
    module doc."""
    from megatron_patch.data.indexed_writer import atomic_indexed_writers, token_dtype, writing
    from megatron_patch.tokenizer import check_tokenizer_folder

    files = _sft_input_files(input_path)
    check_tokenizer_folder(tokenizer_dir)
    prefix = str(output_prefix)
    stats = SFTPreprocessStats()
    dtype = token_dtype()  # imports megatron.core (seconds): before the clock starts
    start = time.perf_counter()
    # Packing needs every length first: write samples unpacked under a scratch prefix, then regroup them.
    first_prefix = f"{prefix}.unpacked-tmp-{os.getpid()}" if packing else prefix
    outputs = [(text_prefix(first_prefix), dtype), (label_prefix(first_prefix), np.uint8)]
    try:
        with atomic_indexed_writers(outputs) as (text_out, label_out):
            records = iter_valid_sft_records(files, skip_bad_lines, stats)
            results = ordered_parallel_map(encode_sft_chunk, _chunks(records), workers, init_sft_worker,
                                           (str(tokenizer_dir), seq_length, workers > 1))
            _write_samples((text_out, label_out), results, stats, skip_bad_lines, seq_length, show_progress)
            if stats.samples == 0:
                inputs = input_path if isinstance(input_path, list) else [input_path]
                raise InputError(f"error: {', '.join(map(str, inputs))}: no SFT samples ({stats.skipped_bad_records:,} "
                                 f"bad records skipped); nothing written.")
        pair_id = _write_packed(first_prefix, prefix, seq_length, stats) if packing else text_out.pair_id
    finally:
        if packing:
            for p in (text_prefix(first_prefix), label_prefix(first_prefix)):
                for suffix in (".bin", ".idx"):
                    Path(p + suffix).unlink(missing_ok=True)
    stats.seconds = time.perf_counter() - start
    meta = {"format": META_FORMAT, "seq_length": seq_length, "packed": packing or stats.rows < stats.samples,
            "source": ", ".join(map(str, files)), "pair_id": pair_id.hex()}
    meta.update({k: v for k, v in asdict(stats).items() if k not in ("bad_record_messages", "seconds")})
    temp_meta = Path(meta_path(prefix) + f".tmp-{os.getpid()}")
    with writing(meta_path(prefix)):
        temp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        temp_meta.replace(meta_path(prefix))
    return stats


def _write_samples(writers: tuple, results: Iterator[list], stats: SFTPreprocessStats, skip_bad_lines: bool,
                   seq_length: int, show_progress: bool) -> None:
    """Add encode_sft_chunk's results in order: a sample per document, a list item's samples in documents of at
    most seq_length tokens (split_group). Counts into stats."""
    from tqdm import tqdm

    text_out, label_out = writers
    start = time.perf_counter()
    progress = tqdm(unit=" samples", disable=not show_progress, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    with progress:
        for results_of_chunk in results:
            for source, line, samples, error in results_of_chunk:
                if error is not None:
                    _bad(JsonRecord(source, line), error, skip_bad_lines, stats)
                    continue
                for row in split_group([len(s) for s in samples], seq_length):
                    text_out.add_document([samples[i].tokens for i in row])
                    label_out.add_document([samples[i].answer_mask for i in row])
                    stats.rows += 1
                for sample in samples:
                    stats.samples += 1
                    stats.tokens += len(sample)
                    stats.answer_tokens += int(sample.answer_mask.sum())
                    stats.truncated += sample.truncated
                    stats.empty += sample.is_empty
            progress.update(len(results_of_chunk))
            progress.set_postfix_str(f"{stats.tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s",
                                     refresh=False)
