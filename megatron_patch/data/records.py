"""Reading input files record by record, keeping each record's file:line so errors can point at it.

Files are read as UTF-8 (a leading byte-order mark is dropped). A byte that is not UTF-8 makes that line (or
that JSON array element) a bad record naming file:line, which --skip-bad-lines skips like any other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from megatron_patch.errors import UserError

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")


class InputError(UserError):
    """A problem with one input record; str() is a full message naming file:line."""


# Skipped bad lines/records named in the summary; the rest are only counted.
MAX_REPORTED_BAD_INPUTS = 10


def stop_or_note_bad_input(message: str, skip: bool, kind: str, reported: list[str]) -> None:
    """A malformed line or record (`kind`): stop with the fix, or (--skip-bad-lines) note it for the summary.
    The caller counts it."""
    if not skip:
        raise InputError(f"error: {message}\nFix that {kind}, or pass --skip-bad-lines to skip such {kind}s.")
    if len(reported) < MAX_REPORTED_BAD_INPUTS:
        reported.append(message)


# Decoding with errors="surrogateescape" turns each byte that is not UTF-8 into one of these code points
# (valid UTF-8 never decodes to them), so a line keeps its place and the bad byte can be named.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def undecodable_byte(line: str) -> str | None:
    """Why a line (decoded with surrogateescape) is not UTF-8, or None."""
    bad = None if line.isascii() else _UNDECODABLE.search(line)
    return None if bad is None else _not_utf8(bad)


def _not_utf8(bad: re.Match) -> str:
    column = bad.start() - bad.string.rfind("\n", 0, bad.start())
    return (f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at column {column}); "
            f"convert the file to UTF-8 (e.g. iconv -f GB18030 -t UTF-8)")


def _open_text(path: str | Path):
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


@dataclass(frozen=True)
class JsonRecord:
    source: str  # file path, for messages
    line: int  # 1-based line where the record starts
    value: Any = None  # the parsed JSON value, when `error` is None
    error: str | None = None  # why this record could not be parsed

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def first_non_space_chars(path: str | Path, count: int = 1) -> str:
    """The file's first `count` non-blank characters (fewer at its end; '' for a blank file)."""
    found = ""
    with _open_text(path) as f:
        while len(found) < count and (chunk := f.read(1 << 16)):
            found += "".join(chunk.split())[: count - len(found)]
    return found


def is_json_array_file(path: str | Path) -> bool:
    """An alpaca-style file holding one JSON array (as opposed to one JSON object per line)."""
    return first_non_space_chars(path) == "["


def iter_raw_lines(path: str | Path) -> Iterator[tuple[int, str, str | None]]:
    """(1-based line number, line without its newline, why it is not UTF-8 or None) for every line."""
    with _open_text(path) as f:
        for number, line in enumerate(f, start=1):
            text = line.rstrip("\n").rstrip("\r")
            yield number, text, undecodable_byte(text)


def parse_json_line(source: str, line: int, text: str) -> JsonRecord:
    try:
        return JsonRecord(source, line, value=json.loads(text))
    except json.JSONDecodeError as e:
        return JsonRecord(source, line, error=f"malformed JSON: {e.msg} (column {e.colno})")


def iter_json_lines(path: str | Path) -> Iterator[JsonRecord]:
    """JSONL: one JSON value per non-blank line."""
    for number, text, error in iter_raw_lines(path):
        if error is not None:
            yield JsonRecord(str(path), number, error=error)
        elif text.strip():
            yield parse_json_line(str(path), number, text)


def iter_json_array(path: str | Path) -> Iterator[JsonRecord]:
    """The elements of a file holding one JSON array, each with the line where it starts.

    An element holding a byte that is not UTF-8 comes with its error (it can be skipped); a syntax error
    cannot be skipped (the parser loses its place), so it raises InputError.
    """
    with _open_text(path) as f:
        text = f.read()
    all_utf8 = text.isascii() or _UNDECODABLE.search(text) is None
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
                f"error: {path}:{e.lineno}: malformed JSON array: {e.msg} (column {e.colno}). "
                f"A broken JSON array cannot be skipped: fix the file, or convert it to JSONL (one record per line) "
                f"to use --skip-bad-lines."
            ) from None
        bad = None if all_utf8 else _UNDECODABLE.search(text, pos, end)
        if bad is None:
            yield JsonRecord(str(path), line_at(pos), value=value)
        else:
            yield JsonRecord(str(path), line_at(pos) + text.count("\n", pos, bad.start()), error=_not_utf8(bad))
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise InputError(f"error: {path}:{line_at(pos)}: expected ',' or ']' between array elements; "
                         f"fix the JSON array.")


def iter_json_records(path: str | Path) -> Iterator[JsonRecord]:
    """Records of a JSON array file or a JSONL file, told apart by the first non-blank character."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"error: {path}: no such file; check the --input path.")
    return iter_json_array(path) if is_json_array_file(path) else iter_json_lines(path)
