"""Reading input files record by record, keeping each record's file:line so errors can point at it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")


class InputError(ValueError):
    """A problem with one input record; str() is a full message naming file:line."""


# Skipped bad lines/records named in the summary; the rest are only counted.
MAX_REPORTED_BAD_INPUTS = 10


def stop_or_note_bad_input(message: str, skip: bool, kind: str, reported: list[str]) -> None:
    """A malformed line or record (`kind`): stop with the fix, or (--skip-bad-lines) note it for the summary.
    The caller counts it."""
    if not skip:
        raise InputError(f"{message}\nFix that {kind}, or pass --skip-bad-lines to skip such {kind}s.")
    if len(reported) < MAX_REPORTED_BAD_INPUTS:
        reported.append(message)


@dataclass(frozen=True)
class JsonRecord:
    source: str  # file path, for messages
    line: int  # 1-based line where the record starts
    value: Any = None  # the parsed JSON value, when `error` is None
    error: str | None = None  # why this record could not be parsed

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def first_non_space_char(path: str | Path) -> str:
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def is_json_array_file(path: str | Path) -> bool:
    """An alpaca-style file holding one JSON array (as opposed to one JSON object per line)."""
    return first_non_space_char(path) == "["


def iter_raw_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for every line of a UTF-8 file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            yield number, line.rstrip("\n").rstrip("\r")


def parse_json_line(source: str, line: int, text: str) -> JsonRecord:
    try:
        return JsonRecord(source, line, value=json.loads(text))
    except json.JSONDecodeError as e:
        return JsonRecord(source, line, error=f"malformed JSON: {e.msg} (column {e.colno})")


def iter_json_lines(path: str | Path) -> Iterator[JsonRecord]:
    """JSONL: one JSON value per non-blank line."""
    for number, text in iter_raw_lines(path):
        if text.strip():
            yield parse_json_line(str(path), number, text)


def iter_json_array(path: str | Path) -> Iterator[JsonRecord]:
    """The elements of a file holding one JSON array, each with the line where it starts.

    A syntax error inside the array cannot be skipped (the parser loses its place), so it raises InputError.
    """
    text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    counted_to = pos

    def skip_space(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    def line_at(p: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, p)
        counted_to = p
        return line

    pos = skip_space(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}:{e.lineno}: malformed JSON array: {e.msg} (column {e.colno}). "
                f"A broken JSON array cannot be skipped: fix the file, or convert it to JSONL (one record per line) "
                f"to use --skip-bad-lines."
            ) from None
        yield JsonRecord(str(path), line_at(pos), value=value)
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise InputError(f"{path}:{line_at(pos)}: expected ',' or ']' between array elements; fix the JSON array.")


def iter_json_records(path: str | Path) -> Iterator[JsonRecord]:
    """Records of a JSON array file or a JSONL file, told apart by the first non-blank character."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the --input path.")
    return iter_json_array(path) if is_json_array_file(path) else iter_json_lines(path)
