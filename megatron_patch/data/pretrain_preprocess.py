"""Pre-training corpus -> Megatron idxmap: one document per input record, token ids + end-of-document.

Inputs (files, or folders of them; .gz and .zst files are read decompressed, see records):
  * JSON (.jsonl/.ndjson/.json): one object per line, or one JSON array of objects; the text under `json_key`.
  * anything else is plain UTF-8 text: by default one document per paragraph (lines up to a blank line, joined
    with their newlines); `text_mode="line"` makes every line a document instead.
A blank input file, or inputs that give no document at all, are refused: nothing is written.

Output: `{output_prefix}_{json_key}_document.{bin,idx}` (Megatron's naming), one sequence per document, int32 ids.
Workers only import `tokenizers` (not transformers or megatron), so a pool of them starts in well under a second.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_patch.data.parallel import ordered_parallel_map
from megatron_patch.data.records import (
    JSON_LINES_SUFFIXES,
    TEXT_SUFFIXES,
    InputError,
    JsonRecord,
    data_suffix,
    first_non_space_chars,
    input_files,
    is_json_array_file,
    iter_json_array,
    iter_raw_lines,
    stop_or_note_bad_input,
)
from megatron_patch.tokenizer import EOD_TOKEN, EOD_TOKEN_ID, check_end_of_document_id, check_tokenizer_folder

# A task sent to a worker ends at whichever comes first: big enough to amortise inter-process overhead,
# small enough to keep memory flat and the progress bar moving.
CHUNK_DOCUMENTS = 4096
CHUNK_CHARACTERS = 1 << 20


@dataclass
class PreprocessStats:
    documents: int = 0  # written
    tokens: int = 0  # written, end-of-document tokens included
    skipped_bad_lines: int = 0
    empty_documents: int = 0  # blank text: counted, not written
    seconds: float = 0.0
    bad_line_messages: list[str] = field(default_factory=list)
    left_out_files: list[str] = field(default_factory=list)  # in an input folder, not of a readable kind

    def summary(self, output: str) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"done: {self.documents:,} documents, {self.tokens:,} tokens, "
            f"{self.skipped_bad_lines:,} bad lines skipped, {self.empty_documents:,} empty documents skipped, "
            f"{self.seconds:.1f}s ({rate:,.0f} tokens/s) -> {output}.{{bin,idx}}"
        )


# ---- worker side: keep this light, it runs in every spawned process ----

_ENCODER = None
_LOADED: dict[str, object] = {}  # tokenizer.json path -> tokenizers.Tokenizer, loaded once per process


def load_fast_tokenizer(tokenizer_dir: str | Path):
    from tokenizers import Tokenizer

    path = str(Path(tokenizer_dir).resolve() / "tokenizer.json")
    if path not in _LOADED:
        _LOADED[path] = Tokenizer.from_file(path)
    return _LOADED[path]


def init_encoder(tokenizer_dir: str, in_worker: bool = True) -> None:
    """Load the fast tokenizer once per process."""
    global _ENCODER
    if in_worker:
        # Each worker is already one of N processes; rayon threads on top would only oversubscribe the cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _ENCODER = load_fast_tokenizer(tokenizer_dir)


def _document_text(raw: str | JsonRecord, json_key: str | None) -> tuple[str | None, str | None]:
    """(text, error) of one input record: raw text as is, or the `json_key` field of a JSON line or array element."""
    if json_key is None:
        return raw, None
    if isinstance(raw, JsonRecord):
        obj = raw.value
    else:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            return None, f"malformed JSON: {e.msg} (column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if json_key not in obj:
        keys = ", ".join(list(obj)[:8])
        return None, f"no '{json_key}' key (keys: {keys}); choose the text field with --json-key"
    text = obj[json_key]
    if not isinstance(text, str):
        return None, f"'{json_key}' is {type(text).__name__}, expected a string"
    return text, None


def encode_chunk(chunk: tuple[str, list[tuple[int, object, str | None]], str | None, bool]
                 ) -> tuple[str, list[int], np.ndarray, np.ndarray, list]:
    """Encode one chunk of raw records of one file: (the file, lines, ids of all documents concatenated (int32,
    each followed by EOD when asked), per-document lengths, per-document error or None).

    One flat array per chunk, not one per document, keeps pickling between processes cheap. A blank document
    has length 0 (and no EOD) so the writer can count it.
    """
    path, items, json_key, append_eod = chunk
    lines, texts, errors = [], [], []
    for line, raw, error in items:
        if error is None:
            text, error = _document_text(raw, json_key)
        lines.append(line)
        errors.append(error)
        if error is None:
            texts.append(text)
    encodings = iter(_ENCODER.encode_batch(texts, add_special_tokens=False) if texts else [])
    pieces, lengths = [], np.zeros(len(items), dtype=np.int64)
    for i, error in enumerate(errors):
        if error is None:
            ids = next(encodings).ids
            if ids:
                if append_eod:
                    ids.append(EOD_TOKEN_ID)
                pieces.append(np.asarray(ids, dtype=np.int32))
                lengths[i] = len(ids)
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return path, lines, flat, lengths, errors


# ---- reading inputs ----


def is_json_input(path: str | Path) -> bool:
    return data_suffix(path) in JSON_LINES_SUFFIXES


def iter_documents(path: str | Path, text_mode: str = "paragraph") -> Iterator[tuple[int, object, str | None]]:
    """(line, raw record, error or None) for a JSON or plain-text file. The raw record is a JSON line's text, a
    parsed JSON array element (JsonRecord), or plain text; the line is where it starts, or where it went wrong."""
    if is_json_input(path):
        if is_json_array_file(path):
            for record in iter_json_array(path):
                yield record.line, record, record.error
            return
        for line, raw, error in iter_raw_lines(path):
            if error is not None or raw.strip():
                yield line, raw, error
        return
    if text_mode == "line":
        yield from iter_raw_lines(path)
        return
    if text_mode != "paragraph":
        raise ValueError(f"text_mode must be 'paragraph' or 'line', not {text_mode!r}")
    start, lines, bad = 0, [], None  # bad: (line, error) of the paragraph's first line that is not UTF-8

    def paragraph() -> tuple[int, str | None, str | None]:
        return (start, "\n".join(lines), None) if bad is None else (bad[0], None, bad[1])

    for line, raw, error in iter_raw_lines(path):
        if raw.strip():
            if not lines:
                start = line
            lines.append(raw)
            if error is not None and bad is None:
                bad = (line, error)
        elif lines:
            yield paragraph()
            lines, bad = [], None
    if lines:
        yield paragraph()


def iter_chunks(files: list[Path], text_mode: str, json_key: str, append_eod: bool = True) -> Iterator[tuple]:
    """The chunks encode_chunk takes, file after file (one worker pool serves a whole folder)."""
    for path in files:
        key = json_key if is_json_input(path) else None
        batch: list[tuple[int, object, str | None]] = []
        characters = 0
        for item in iter_documents(path, text_mode):
            batch.append(item)
            characters += len(item[1]) if isinstance(item[1], str) else 0  # array elements: counted by number only
            if len(batch) >= CHUNK_DOCUMENTS or characters >= CHUNK_CHARACTERS:
                yield str(path), batch, key, append_eod
                batch, characters = [], 0
        if batch:
            yield str(path), batch, key, append_eod


def check_tokenizer_dir(tokenizer_dir: str | Path) -> None:
    """Preprocessing needs the fast tokenizer file (tokenizer.json) of a Qwen2.5 tokenizer."""
    check_tokenizer_folder(tokenizer_dir, "tokenizer.json")
    check_end_of_document_id(load_fast_tokenizer(tokenizer_dir).token_to_id(EOD_TOKEN), tokenizer_dir)


def output_prefix_for(output_prefix: str | Path, json_key: str = "text") -> str:
    return f"{output_prefix}_{json_key}_document"


def readable_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """(files to tokenize, files of a folder left out) for the files and folders passed; an empty file is
    refused before anything is written."""
    files, left_out = input_files(inputs, JSON_LINES_SUFFIXES + TEXT_SUFFIXES)
    for path in files:
        if not first_non_space_chars(path):
            raise InputError(f"error: {path} is empty (no text): nothing to tokenize, nothing written. "
                             f"Check that file, or leave it out of --input.")
    return files, left_out


def preprocess_pretrain_corpus(
    inputs: list[str | Path],
    output_prefix: str | Path,
    tokenizer_dir: str | Path,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    skip_bad_lines: bool = False,
    text_mode: str = "paragraph",
    show_progress: bool = True,
) -> tuple[str, PreprocessStats]:
    """Tokenize `inputs` (files, or folders of files) into one idxmap; returns (its prefix, stats). Raises
    InputError on a bad line."""
    from megatron_patch.data.indexed_writer import atomic_indexed_writers, token_dtype

    files, left_out = readable_inputs(inputs)
    check_tokenizer_dir(tokenizer_dir)
    out = output_prefix_for(output_prefix, json_key)
    stats = PreprocessStats(left_out_files=[str(p) for p in left_out])
    dtype = token_dtype()  # imports megatron.core (seconds): before the clock starts
    start = time.perf_counter()
    with atomic_indexed_writers([(out, dtype)]) as (writer,):
        chunks = iter_chunks(files, text_mode, json_key, append_eod)
        results = ordered_parallel_map(encode_chunk, chunks, workers, init_encoder, (str(tokenizer_dir), workers > 1))
        _write_documents(writer, results, stats, skip_bad_lines, files, show_progress)
        if stats.documents == 0:
            raise InputError(
                f"error: no document in {', '.join(map(str, inputs))} ({stats.skipped_bad_lines:,} bad lines skipped, "
                f"{stats.empty_documents:,} blank documents): nothing written. Check --input"
                + (" and --json-key." if any(is_json_input(p) for p in files) else "."))
    stats.seconds = time.perf_counter() - start
    return out, stats


def _write_documents(writer, results: Iterator[tuple], stats: PreprocessStats, skip_bad_lines: bool,
                     files: list[Path], show_progress: bool) -> None:
    """Add encode_chunk's results to the writer in order, counting into stats, with a progress bar that names
    the file being read."""
    from tqdm import tqdm

    start, names = time.perf_counter(), {str(p): f"{i}/{len(files)} {p.name}" for i, p in enumerate(files, 1)}
    progress = tqdm(unit=" docs", disable=not show_progress, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    with progress:
        for path, lines, flat, lengths, errors in results:
            progress.set_description(names[path] if len(files) > 1 else Path(path).name, refresh=False)
            ends = np.cumsum(lengths)
            for line, error, length, end in zip(lines, errors, lengths.tolist(), ends.tolist()):
                if error is not None:
                    stop_or_note_bad_input(f"{path}:{line}: {error}", skip_bad_lines, "line", stats.bad_line_messages)
                    stats.skipped_bad_lines += 1
                elif length == 0:
                    stats.empty_documents += 1
                else:
                    writer.add_document([flat[end - length : end]])
                    stats.documents += 1
                    stats.tokens += length
            progress.update(len(lines))
            elapsed = time.perf_counter() - start
            progress.set_postfix_str(f"{stats.tokens / max(elapsed, 1e-9):,.0f} tokens/s", refresh=False)
