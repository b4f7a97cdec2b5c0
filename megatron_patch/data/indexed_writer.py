"""Writing Megatron idxmaps (.bin + .idx) through megatron.core's IndexedDatasetBuilder, all or nothing.

Every output is written under a temporary name beside its target, and each .idx is stamped with its .bin (see
idxmap_stamp). Only when all outputs are complete do they replace the targets, each flushed to disk before its
rename (atomic_write.replace_file): first the old .idx files go, then the new .bin files and then the new .idx
files take their names. A crash, a bad input line or a stop (Ctrl-C, SIGTERM) before that leaves the old outputs
as they were, and a stop cannot cut the renames short; a kill during them leaves an idxmap without its .idx,
which every reader refuses (dataset_checks), never a new .bin beside an old .idx.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from megatron_patch.atomic_write import replace_file
from megatron_patch.data.idxmap_stamp import append_stamp, pair_id_of
from megatron_patch.errors import UserError, stop_signals_ignored
from megatron_patch.fault_injection import fault_point
from megatron_patch.process_lifetime import writer_alive
from megatron_patch.tokenizer import TOKENIZER_SIZE


def token_dtype(vocab_size: int = TOKENIZER_SIZE) -> type:
    """Megatron's choice for token ids: uint16 below 65,500 ids, else int32 (Qwen2.5's 151,665 need int32)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """A failed write (read-only folder, full disk) becomes one message naming the file, not a traceback."""
    try:
        yield
    except OSError as e:
        raise UserError(f"error: cannot write {path}: {e.strerror or e}. Choose an --output-prefix in a writable "
                        f"folder with free space.") from None


class IndexedDatasetWriter:
    """One idxmap being written under a temporary prefix; `documents` counts the documents added."""

    def __init__(self, prefix: str | Path, dtype: type) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        self.temp_prefix = f"{self.prefix}.tmp-{os.getpid()}"
        self.dtype = dtype
        self.pair_id = b""  # set when stamped
        with writing(self.temp_prefix + ".bin"):
            self.builder = IndexedDatasetBuilder(self.temp_prefix + ".bin", dtype=dtype)
        self.documents = 0

    def add_document(self, sequences: Sequence[np.ndarray]) -> None:
        """One document made of one or more sequences (several = a packed SFT row keeping sample boundaries)."""
        lengths = [len(s) for s in sequences]
        data = np.concatenate(sequences) if len(sequences) > 1 else np.asarray(sequences[0])
        with writing(self.temp_prefix + ".bin"):
            self.builder.add_document(data.astype(self.dtype, copy=False), lengths)
        self.documents += 1
        fault_point("data:document-added")

    def add_index(self, prefix: str | Path) -> None:
        """Append a whole existing idxmap (used to merge)."""
        with writing(self.temp_prefix + ".bin"):
            self.builder.add_index(str(prefix))

    def finalize_to_temp(self) -> None:
        with writing(self.temp_prefix + ".idx"):
            self.builder.finalize(self.temp_prefix + ".idx")

    def stamp(self, pair_id: bytes) -> None:
        with writing(self.temp_prefix + ".idx"):
            append_stamp(self.temp_prefix + ".idx", self.temp_prefix + ".bin", pair_id)
        self.pair_id = pair_id

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.builder.data_file.close()
        for suffix in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.temp_prefix + suffix)


def _replace_targets(writers: Sequence[IndexedDatasetWriter]) -> None:
    """Old .idx files first, then the .bin files, then the .idx files (see the module doc for why)."""
    for writer in writers:
        # megatron-core caches each GPTDataset's sample order under PREFIX/cache, keyed by the path and settings
        # but not the contents: left there, it would index the new documents with the old ones' boundaries.
        shutil.rmtree(Path(writer.prefix) / "cache" / "GPTDataset_indices", ignore_errors=True)
        with writing(writer.prefix + ".idx"):
            Path(writer.prefix + ".idx").unlink(missing_ok=True)
    for writer in writers:
        with writing(writer.prefix + ".bin"):
            replace_file(writer.temp_prefix + ".bin", writer.prefix + ".bin")
    fault_point("data:between-renames")
    for writer in writers:
        with writing(writer.prefix + ".idx"):
            replace_file(writer.temp_prefix + ".idx", writer.prefix + ".idx")
        _remove_leftovers_of_dead_writers(writer.prefix)


def _remove_leftovers_of_dead_writers(prefix: str) -> None:
    """Temporary files of earlier runs at this prefix that were killed (their process is gone)."""
    target = Path(prefix)
    for leftover in target.parent.glob(f"{glob.escape(target.name)}.tmp-*"):
        pid = leftover.name[len(target.name) + len(".tmp-"):].split(".")[0]
        if pid.isdigit() and not writer_alive(int(pid), leftover.lstat().st_ctime):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_indexed_writers(outputs: Sequence[tuple[str | Path, type]]) -> Iterator[list[IndexedDatasetWriter]]:
    """Writers for (prefix, dtype) outputs that all appear together on success and not at all on error.
    Their .idx stamps share one pair id, so a reader can tell they were written together."""
    for prefix, _ in outputs:
        with writing(Path(prefix).parent):
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    writers: list[IndexedDatasetWriter] = []
    try:
        for prefix, dtype in outputs:
            writers.append(IndexedDatasetWriter(prefix, dtype))
        yield writers
        for writer in writers:
            writer.finalize_to_temp()
        pair_id = pair_id_of([writer.temp_prefix for writer in writers])
        for writer in writers:
            writer.stamp(pair_id)
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    with stop_signals_ignored():
        _replace_targets(writers)


def merge_indexed_datasets(prefixes: Sequence[str | Path], output_prefix: str | Path) -> int:
    """Concatenate idxmaps (same dtype) into one at `output_prefix`; returns the number of documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_patch.data.dataset_checks import check_dataset

    if not prefixes:
        raise UserError("error: nothing to merge: pass at least one idxmap prefix to --merge.")
    dtypes = {}
    documents = 0
    for prefix in prefixes:
        check_dataset("--merge", prefix, "pretrain")
        dataset = IndexedDataset(str(prefix))
        dtypes[str(prefix)] = dataset.index.dtype
        documents += len(dataset.document_indices) - 1
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{p} ({np.dtype(d).name})" for p, d in dtypes.items())
        raise UserError(f"error: cannot merge idxmaps with different token dtypes: {listing}. Preprocess them again "
                        f"with the same tokenizer.")
    with atomic_indexed_writers([(output_prefix, next(iter(dtypes.values())))]) as (writer,):
        for prefix in prefixes:
            writer.add_index(prefix)
    return documents
