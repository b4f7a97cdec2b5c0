"""What ties an idxmap's .idx to its .bin: a stamp after the index, and the header facts the checks read.

Megatron's .idx (MMIDIDX version 1) is a 34-byte header, then int32 sequence lengths, int64 byte pointers into
the .bin and int64 document indices; its readers ignore anything after that. Our writer appends a 48-byte stamp:
the .bin's size, a digest of sampled blocks of the .bin, and a pair id shared by every idxmap written in one go
(SFT's text and label idxmaps), a digest of all of them. A .bin replaced without its .idx (a replacement cut
short, one file copied over) then no longer matches the stamp, and a text idxmap no longer pairs with a label
idxmap of other data. The same inputs give byte-identical files (the id comes from the contents, not chance).

The .bin gets no extra bytes: megatron's own merge (IndexedDatasetBuilder.add_index) copies whole .bin files, so
anything appended there would shift every later document. Idxmaps written elsewhere (no stamp) are still read;
for them only the sizes are compared.

Pure Python (struct, hashlib), about 130 KiB read per idxmap: the launcher checks datasets before torchrun.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document index count
_TOKEN_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron's DType code -> item size
_STAMP = struct.Struct("<8sQ16s16s")  # magic, .bin size, .bin digest, pair id
STAMP_MAGIC = b"MPSTAMP1"
SAMPLED_BLOCKS = 32
BLOCK_BYTES = 4096


class IndexDamaged(ValueError):
    """The .idx is not a whole Megatron index; str() says what is wrong with it."""


@dataclass(frozen=True)
class Stamp:
    bin_size: int
    bin_digest: bytes
    pair_id: bytes


@dataclass(frozen=True)
class IndexFacts:
    sequences: int
    documents: int
    data_bytes: int  # how much of the .bin the index points into
    stamp: Stamp | None  # None: written by another tool
    dtype_code: int  # megatron's DType code of the tokens (4: int32)


def bin_digest(bin_path: str | Path) -> bytes:
    """A digest of the .bin's size and 32 evenly spaced 4 KiB blocks (the whole file when it is small)."""
    size = os.path.getsize(bin_path)
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    with open(bin_path, "rb") as f:
        if size <= SAMPLED_BLOCKS * BLOCK_BYTES:
            digest.update(f.read())
        else:
            last = size - BLOCK_BYTES
            for k in range(SAMPLED_BLOCKS):
                f.seek(last * k // (SAMPLED_BLOCKS - 1))
                digest.update(f.read(BLOCK_BYTES))
    return digest.digest()


def pair_id_of(prefixes: list[str]) -> bytes:
    """The pair id of idxmaps written together, not stamped yet: a digest of each one's .bin digest and .idx."""
    digest = hashlib.blake2b(digest_size=16)
    for prefix in prefixes:
        digest.update(bin_digest(f"{prefix}.bin"))
        with open(f"{prefix}.idx", "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.digest()


def append_stamp(idx_path: str | Path, bin_path: str | Path, pair_id: bytes) -> None:
    """Stamp a freshly finalized .idx with its .bin (call once, before either file is renamed into place)."""
    stamp = _STAMP.pack(STAMP_MAGIC, os.path.getsize(bin_path), bin_digest(bin_path), pair_id)
    with open(idx_path, "ab") as f:
        f.write(stamp)


def read_index_facts(idx_path: str | Path) -> IndexFacts:
    """Counts, the .bin bytes the index covers, and the stamp; raises IndexDamaged on a partial or foreign file."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise IndexDamaged(f"{size} bytes, shorter than a Megatron index header")
        magic, version, code, sequences, document_entries = _HEADER.unpack(head)
        if magic != INDEX_HEADER or version != 1 or code not in _TOKEN_BYTES:
            raise IndexDamaged("no Megatron MMIDIDX version 1 header")
        index_end = _HEADER.size + 12 * sequences + 8 * document_entries
        stamp = None
        if size == index_end + _STAMP.size:
            f.seek(index_end)
            magic, bin_size, digest, pair_id = _STAMP.unpack(f.read(_STAMP.size))
            if magic != STAMP_MAGIC:
                raise IndexDamaged(f"{_STAMP.size} unknown bytes after the index")
            stamp = Stamp(bin_size, digest, pair_id)
        elif size not in (index_end, index_end + sequences):  # + one mode byte per sequence: multimodal
            raise IndexDamaged(f"{size} bytes where its header promises {index_end} (cut short or overwritten)")
        data_bytes = 0
        if sequences:
            f.seek(_HEADER.size + 4 * (sequences - 1))
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(_HEADER.size + 4 * sequences + 8 * (sequences - 1))
            (last_pointer,) = struct.unpack("<q", f.read(8))
            data_bytes = last_pointer + last_length * _TOKEN_BYTES[code]
    return IndexFacts(sequences, max(document_entries - 1, 0), data_bytes, stamp, code)


INT32_CODE = 4


def read_sequence_lengths(idx_path: str | Path, first: int, count: int) -> list[int]:
    """Sequence lengths [first, first + count) of a whole index (read_index_facts checked it)."""
    with open(idx_path, "rb") as f:
        f.seek(_HEADER.size + 4 * first)
        data = f.read(4 * count)
    return list(struct.unpack(f"<{len(data) // 4}i", data))
