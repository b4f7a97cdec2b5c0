"""SFT records -> an idxmap pair the SFTIdxMapDataset reads.

Layout for `--output-prefix P`:
  P_text_document.{bin,idx}   int32 token ids; one *sequence* per SFT sample
  P_label_document.{bin,idx}  uint8 answer mask, same sequence lengths and document boundaries as the text
  P_sft_meta.json             seq_length, packed, the counts (samples, truncated, empty, skipped) and the pair
                              id of the .idx stamps (see idxmap_stamp), so a reader ignores a meta file left
                              from another run
Unpacked, each sample is its own *document*. With packing, each document is one packed row of several sequences
(Megatron's document_indices), so sample boundaries survive and the reader restarts positions per sample.
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
    InputError,
    JsonRecord,
    first_non_space_chars,
    iter_json_records,
    stop_or_note_bad_input,
)
from megatron_patch.data.sft import SFTRecordError, build_sft_sample, plan_packing, record_to_messages

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
        fill = f", {self.rows:,} packed rows ({self.tokens / max(self.rows * seq_length, 1):.0%} full)" if packing else ""
        return (
            f"done: {self.samples:,} samples, {self.tokens:,} tokens ({self.answer_tokens:,} answer tokens), "
            f"{self.truncated:,} truncated to {seq_length}, {self.empty:,} with no answer token, "
            f"{self.skipped_bad_records:,} bad records skipped{fill}, {self.seconds:.1f}s "
            f"-> {text_prefix(prefix)} + {label_prefix(prefix)}"
        )


def _bad(record: JsonRecord, why: str, skip: bool, stats: SFTPreprocessStats) -> None:
    stop_or_note_bad_input(f"{record.where}: {why}", skip, "record", stats.bad_record_messages)
    stats.skipped_bad_records += 1


def iter_valid_sft_records(path: str | Path, skip_bad: bool, stats: SFTPreprocessStats) -> Iterator[JsonRecord]:
    """Parsed records that look like SFT samples; bad ones raise InputError (file:line) or are counted."""
    for record in iter_json_records(path):
        if record.error is not None:
            _bad(record, record.error, skip_bad, stats)
            continue
        try:
            record_to_messages(record.value)
        except SFTRecordError as e:
            _bad(record, str(e), skip_bad, stats)
            continue
        yield record


def read_sft_records(path: str | Path, skip_bad: bool = False) -> tuple[list[JsonRecord], list[str]]:
    """All valid records of an SFT file and the messages of skipped ones."""
    stats = SFTPreprocessStats()
    records = list(iter_valid_sft_records(path, skip_bad, stats))
    return records, stats.bad_record_messages


# ---- worker side ----

_TOKENIZER = None
_MAX_LENGTH = 0


def init_sft_worker(tokenizer_dir: str, max_length: int, in_worker: bool = True) -> None:
    global _TOKENIZER, _MAX_LENGTH
    if in_worker:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from megatron_patch.tokenizer import load_tokenizer

    _TOKENIZER, _MAX_LENGTH = load_tokenizer(tokenizer_dir), max_length


def encode_sft_chunk(chunk: list[tuple[int, object]]) -> list[tuple[int, object, str | None]]:
    """[(line, SFTSample or None, error or None)] for (line, record) pairs."""
    out = []
    for line, value in chunk:
        try:
            out.append((line, build_sft_sample(value, _TOKENIZER, _MAX_LENGTH), None))
        except SFTRecordError as e:
            out.append((line, None, str(e)))
    return out


def _chunks(records: Iterator[JsonRecord]) -> Iterator[list[tuple[int, object]]]:
    batch = []
    for record in records:
        batch.append((record.line, record.value))
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


def build_sft_idxmap(
    input_path: str | Path,
    output_prefix: str | Path,
    tokenizer_dir: str | Path,
    seq_length: int,
    packing: bool = False,
    workers: int = 1,
    skip_bad_lines: bool = False,
    show_progress: bool = True,
) -> SFTPreprocessStats:
    """Write the SFT idxmap pair (and meta) for one alpaca / messages / ShareGPT file. See the module doc."""
    from tqdm import tqdm

    from megatron_patch.data.indexed_writer import atomic_indexed_writers, token_dtype, writing
    from megatron_patch.tokenizer import check_tokenizer_folder

    if not Path(input_path).is_file():
        raise InputError(f"error: {input_path}: no such file; check --input.")
    if not first_non_space_chars(input_path):
        raise InputError(f"error: {input_path} is empty: no SFT records, nothing written. Check --input.")
    check_tokenizer_folder(tokenizer_dir)
    prefix = str(output_prefix)
    stats = SFTPreprocessStats()
    dtype = token_dtype()  # imports megatron.core (seconds): before the clock starts
    start = time.perf_counter()
    # Packing needs every length first: write samples unpacked under a scratch prefix, then regroup them.
    first_prefix = f"{prefix}.unpacked-tmp-{os.getpid()}" if packing else prefix
    outputs = [(text_prefix(first_prefix), dtype), (label_prefix(first_prefix), np.uint8)]
    progress = tqdm(unit=" samples", disable=not show_progress, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    try:
        with progress, atomic_indexed_writers(outputs) as (text_out, label_out):
            records = iter_valid_sft_records(input_path, skip_bad_lines, stats)
            for results in ordered_parallel_map(
                encode_sft_chunk, _chunks(records), workers, init_sft_worker,
                (str(tokenizer_dir), seq_length, workers > 1),
            ):
                for line, sample, error in results:
                    if error is not None:
                        _bad(JsonRecord(str(input_path), line), error, skip_bad_lines, stats)
                        continue
                    text_out.add_document([sample.tokens])
                    label_out.add_document([sample.answer_mask])
                    stats.samples += 1
                    stats.tokens += len(sample)
                    stats.answer_tokens += int(sample.answer_mask.sum())
                    stats.truncated += sample.truncated
                    stats.empty += sample.is_empty
                progress.update(len(results))
                progress.set_postfix_str(f"{stats.tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s",
                                         refresh=False)
            if stats.samples == 0:
                raise InputError(f"error: {input_path}: no SFT samples ({stats.skipped_bad_records:,} bad records "
                                 f"skipped); nothing written.")
        if packing:
            pair_id = _write_packed(first_prefix, prefix, seq_length, stats)
        else:
            stats.rows, pair_id = stats.samples, text_out.pair_id
    finally:
        if packing:
            for p in (text_prefix(first_prefix), label_prefix(first_prefix)):
                for suffix in (".bin", ".idx"):
                    Path(p + suffix).unlink(missing_ok=True)
    stats.seconds = time.perf_counter() - start
    meta = {"format": META_FORMAT, "seq_length": seq_length, "packed": packing, "source": str(input_path),
            "pair_id": pair_id.hex()}
    meta.update({k: v for k, v in asdict(stats).items() if k not in ("bad_record_messages", "seconds")})
    temp_meta = Path(meta_path(prefix) + f".tmp-{os.getpid()}")
    with writing(meta_path(prefix)):
        temp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        temp_meta.replace(meta_path(prefix))
    return stats
