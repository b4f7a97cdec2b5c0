"""Atomic writing of Megatron idxmaps (.bin + .idx) through megatron.core's IndexedDatasetBuilder.

Everything is written under temporary names beside the target and renamed only when every file of the output
is complete, so a crash or a bad input line never leaves a half-written .bin/.idx that training would read.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from megatron_patch.tokenizer import TOKENIZER_SIZE


def token_dtype(vocab_size: int = TOKENIZER_SIZE) -> type:
    """Megatron's choice for token ids: uint16 below 65,500 ids, else int32 (Qwen2.5's 151,665 need int32)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _temp_prefix(prefix: str) -> str:
    return f"{prefix}.tmp-{os.getpid()}"


class IndexedDatasetWriter:
    """One idxmap being written under a temporary prefix; `documents` counts the documents added."""

    def __init__(self, prefix: str | Path, dtype: type) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        self.temp_prefix = _temp_prefix(self.prefix)
        self.dtype = dtype
        self.builder = IndexedDatasetBuilder(self.temp_prefix + ".bin", dtype=dtype)
        self.documents = 0

    def add_document(self, sequences: Sequence[np.ndarray]) -> None:
        """One document made of one or more sequences (several = a packed SFT row keeping sample boundaries)."""
        lengths = [len(s) for s in sequences]
        data = np.concatenate(sequences) if len(sequences) > 1 else np.asarray(sequences[0])
        self.builder.add_document(data.astype(self.dtype, copy=False), lengths)
        self.documents += 1

    def add_index(self, prefix: str | Path) -> None:
        """Append a whole existing idxmap (used to merge)."""
        self.builder.add_index(str(prefix))

    def finalize_to_temp(self) -> None:
        self.builder.finalize(self.temp_prefix + ".idx")

    def commit(self) -> None:
        for suffix in (".bin", ".idx"):
            os.replace(self.temp_prefix + suffix, self.prefix + suffix)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.builder.data_file.close()
        for suffix in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.temp_prefix + suffix)


@contextlib.contextmanager
def atomic_indexed_writers(outputs: Sequence[tuple[str | Path, type]]) -> Iterator[list[IndexedDatasetWriter]]:
    """Writers for (prefix, dtype) outputs that all appear together on success and not at all on error."""
    for prefix, _ in outputs:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    writers: list[IndexedDatasetWriter] = []
    try:
        for prefix, dtype in outputs:
            writers.append(IndexedDatasetWriter(prefix, dtype))
        yield writers
        for writer in writers:
            writer.finalize_to_temp()
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    for writer in writers:
        writer.commit()


def idxmap_exists(prefix: str | Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def merge_indexed_datasets(prefixes: Sequence[str | Path], output_prefix: str | Path) -> int:
    """Concatenate idxmaps (same dtype) into one at `output_prefix`; returns the number of documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not prefixes:
        raise ValueError("nothing to merge: pass at least one input prefix")
    dtypes = {}
    documents = 0
    for prefix in prefixes:
        if not idxmap_exists(prefix):
            raise FileNotFoundError(
                f"{prefix}.bin/.idx not found. Pass prefixes without the .bin/.idx suffix, "
                f"e.g. out/corpus_text_document."
            )
        dataset = IndexedDataset(str(prefix))
        dtypes[str(prefix)] = dataset.index.dtype
        documents += len(dataset.document_indices) - 1
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{p} ({np.dtype(d).name})" for p, d in dtypes.items())
        raise ValueError(f"cannot merge idxmaps with different token dtypes: {listing}. Re-run preprocessing.")
    with atomic_indexed_writers([(output_prefix, next(iter(dtypes.values())))]) as (writer,):
        for prefix in prefixes:
            writer.add_index(prefix)
    return documents
