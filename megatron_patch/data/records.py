"""Reading input files record by record, keeping each record's file:line so errors can point at it.

Files are read as UTF-8 (a leading byte-order mark is dropped), streaming, and decompressed on the fly when their
name ends in .gz or .zst (upstream's WuDao recipe splits a corpus into NN.jsonl.zst files); the suffix before
that tells JSON from plain text. A byte that is not UTF-8 makes that line (or that JSON array element) a bad
record naming file:line, which --skip-bad-lines skips like any other. `input_files` turns the paths a user
passes (files, or folders of them) into the files to read, in order.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from megatron_patch.errors import UserError

JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".text")
COMPRESSED_SUFFIXES = (".gz", ".zst")


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


def data_suffix(path: str | Path) -> str:
    """The suffix that says what a file holds, under any compression suffix: 'a.jsonl.zst' -> '.jsonl'."""
    path = Path(path)
    if path.suffix.lower() in COMPRESSED_SUFFIXES:
        path = path.with_suffix("")
    return path.suffix.lower()


def _open_binary(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 17)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a file of zstd frames. A file cut inside a frame raises EOFError at its end
    (zstandard's own stream_reader just stops there, silently dropping the rest)."""

    def __init__(self, path: Path) -> None:
        try:
            import zstandard
        except ImportError:
            raise InputError(f"error: {path} is zstd-compressed, and the zstandard package is not installed. "
                             f"Install it (pip install zstandard), or decompress the file (zstd -d).") from None
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame, self._in_frame = self._new_frame(), False
        self._file = open(path, "rb")
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            compressed = self._file.read(1 << 17)
            if not compressed:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame: it was cut short")
                return 0
            self._out, self._at = self._decompress(compressed), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def _decompress(self, compressed: bytes) -> bytes:
        out = []
        while compressed:
            out.append(self._frame.decompress(compressed))
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            compressed = self._frame.unused_data  # the next frame's start (zstd -c a b: one frame each)
            self._frame = self._new_frame()
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


@contextlib.contextmanager
def _open_text(path: str | Path) -> Iterator[io.TextIOBase]:
    """The file as UTF-8 text (decompressed if need be); damaged compressed data becomes an InputError."""
    path = Path(path)
    with io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", errors="surrogateescape") as f:
        try:
            yield f
        except Exception as e:
            if not _is_decompression_error(e):
                raise
            raise InputError(f"error: {path}: the compressed data is damaged ({e}). Compress the file again, "
                             f"or leave it out.") from None


def _is_decompression_error(error: Exception) -> bool:
    import gzip
    import zlib

    if isinstance(error, (EOFError, gzip.BadGzipFile, zlib.error)):
        return True
    return type(error).__name__ == "ZstdError"


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
    """An alpaca-style file holding one JSON array, as opposed to JSONL: one JSON value per line, where a line may
    be an array itself (Pai-Megatron-Patch's "pack these records together"). As upstream reads them, a file that
    is one JSON value is an array of items; so a first line that is a whole array makes JSONL only if more
    lines follow."""
    if first_non_space_chars(path) != "[":
        return False
    with _open_text(path) as f:
        first = next(line for line in f if line.strip())
        try:
            json.loads(first)
        except json.JSONDecodeError:
            return True
        return not any(line.strip() for line in f)


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
    while pos >= len(text) or text[pos] != "]":
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
        elif pos >= len(text) or text[pos] != "]":
            raise InputError(f"error: {path}:{line_at(pos)}: expected ',' or ']' between array elements; "
                             f"fix the JSON array.")
    _nothing_after_the_array(path, text, pos + 1, line_at)


def _nothing_after_the_array(path, text: str, pos: int, line_at) -> None:
    end = len(text) - len(text[pos:].lstrip())
    if end < len(text):
        raise InputError(f"error: {path}:{line_at(end)}: more text after the JSON array's closing ']'. A JSON file "
                         f"holds one array of records; JSONL holds one record (or one list of records) per line.")


def iter_json_records(path: str | Path) -> Iterator[JsonRecord]:
    """Records of a JSON array file or a JSONL file, told apart by the first non-blank character."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"error: {path}: no such file; check the --input path.")
    return iter_json_array(path) if is_json_array_file(path) else iter_json_lines(path)


def input_files(paths: list[str | Path], suffixes: tuple[str, ...], option: str = "--input"
                ) -> tuple[list[Path], list[Path]]:
    """(files to read, files left out) for the files and folders a user passed, in the order given; a folder
    gives its files whose data suffix (see data_suffix) is one of `suffixes`, by name (upstream's split pieces
    00, 01, ... in order). Raises InputError for a path that does not exist or a folder with nothing to read."""
    files, left_out = [], []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            readable = [p for p in found if data_suffix(p) in suffixes]
            if not readable:
                kinds = ", ".join(suffixes)
                raise InputError(f"error: {path} holds no input file (names ending in {kinds}, optionally followed "
                                 f"by .gz or .zst); check {option}.")
            files += readable
            left_out += [p for p in found if p not in readable]
        else:
            raise InputError(f"error: {path}: no such file or folder; check {option}.")
    return files, left_out
