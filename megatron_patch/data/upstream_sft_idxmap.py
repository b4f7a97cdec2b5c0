"""SFT idxmaps written by Pai-Megatron-Patch's own build_idxmap_sft_dataset.py (its layout since February 2025),
read into the same samples as our pair, so that data trains as upstream meant it to.

The layout: one idxmap PREFIX_text_document of int32, one document of one sequence per row, each row 2 x S values
(S: the --seq-length it was built for): S token ids, then S labels.
  * the last token of each sample is stored as -1 - id, which marks where a sample ends in a row (upstream packs
    the records of a list item, or every record with default_packing, into shared rows);
  * labels are already shifted: label i is the token at i + 1, or -100 where nothing is trained (the prompt, each
    sample's last position, the padding after the last sample).
A sample here is its tokens and an answer mask (mask j = 1 where label j - 1 is trained), from which
make_training_item gives back exactly those labels and that loss mask, with positions restarting per sample
and, packed, attention kept inside each sample.

Every row is checked when the dataset opens (one pass over the file, in blocks). A file that does not fit, such
as one from an older upstream builder whose rows carry no end markers (packed samples cannot be told apart), is
refused with how to rebuild it: such data never trains silently wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_patch.data.dataset_checks import SFT_SCRIPT, check_dataset
from megatron_patch.data.sft import SFTSample
from megatron_patch.data.sft_dataset import EpochShuffledRows, sample_rows
from megatron_patch.errors import UserError

IGNORED = -100  # upstream's label for an untrained position
BLOCK_VALUES = 1 << 22  # int32 values checked at once (16 MiB; the checks' temporaries are a few times that)
REBUILD = (f"Build the data again from its JSON records with {SFT_SCRIPT} (the same arguments as upstream's "
           f"script), then train on what it writes.")


class UpstreamSFTIdxMapDataset(EpochShuffledRows):
    """Pai-Megatron-Patch's SFT idxmap at `prefix` (PREFIX_text_document.bin/.idx), as our samples.

    Rows as built are kept (packing=True, built for this seq_length); otherwise samples are alone (packing=False)
    or packed here with our planner, as SFTIdxMapDataset does with our own files."""

    def __init__(self, prefix: str | Path, seq_length: int, num_samples: int | None, seed: int,
                 packing: bool) -> None:
        check_dataset("SFT data path", prefix, "sft")
        self.prefix = str(prefix)
        self.data = _rows_of(self.prefix)
        built = self.data.shape[1] // 2
        self.sample_row, self.sample_start, self.sample_end = find_samples(self.data, self.prefix)
        if packing and built == seq_length:
            firsts = np.flatnonzero(np.diff(self.sample_row, prepend=-1)).tolist() + [len(self.sample_row)]
            self.rows = [list(range(a, b)) for a, b in zip(firsts[:-1], firsts[1:])]
        else:
            self.rows = sample_rows((self.sample_end - self.sample_start).tolist(), seq_length, packing)
        super().__init__(len(self.rows), seq_length, num_samples, seed, packing)

    def describe(self) -> str:
        return f"SFT idxmap {self.prefix} (Pai-Megatron-Patch's layout)"

    def row_samples(self, row: int) -> list[SFTSample]:
        built = self.data.shape[1] // 2
        samples = []
        for i in self.rows[row]:
            values = np.asarray(self.data[self.sample_row[i]])
            start, end = int(self.sample_start[i]), int(self.sample_end[i])
            tokens = values[start:end].copy()
            tokens[-1] = -1 - tokens[-1]
            mask = np.zeros(end - start, dtype=np.uint8)
            mask[1:] = values[built + start : built + end - 1] != IGNORED
            samples.append(SFTSample(tokens[: self.seq_length], mask[: self.seq_length], truncated=False))
        return samples

    def sample_length(self, i: int) -> int:
        return int(self.sample_end[i] - self.sample_start[i])


def _rows_of(prefix: str) -> np.ndarray:
    """The .bin as a read-only [rows, 2 x S] int32 array, once the .idx says the rows lie end to end, all of one
    length (check_dataset saw it even)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    index = IndexedDataset(prefix)
    lengths, pointers = index.index.sequence_lengths, index.index.sequence_pointers
    width = int(lengths[0])
    other = np.flatnonzero((lengths != width) | (pointers != np.arange(len(lengths)) * 4 * width))
    if len(other):
        row = int(other[0])
        raise UserError(f"error: SFT data path {prefix}: row {row:,} has {int(lengths[row]):,} values where row 0 has "
                        f"{width:,}: not Pai-Megatron-Patch's SFT layout (rows of its seq length's tokens, then as "
                        f"many labels). {REBUILD}")
    return np.memmap(f"{prefix}.bin", dtype=np.int32, mode="r", shape=(len(lengths), width))


def find_samples(rows: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, end) of every sample of [rows, 2 x S] upstream rows, each row checked (row_problem)."""
    built = rows.shape[1] // 2
    step = max(1, BLOCK_VALUES // rows.shape[1])
    found_rows, found_ends = [], []
    for first in range(0, len(rows), step):
        block = np.asarray(rows[first : first + step])
        problem = row_problem(block[:, :built], block[:, built:])
        if problem is not None:
            row, position, why = problem
            raise UserError(f"error: SFT data path {where}: row {first + row:,}, position {position:,}: {why}. "
                            f"{REBUILD}")
        row_of, last = np.nonzero(block[:, :built] < 0)
        found_rows.append(row_of + first)
        found_ends.append(last + 1)
    sample_row, end = np.concatenate(found_rows), np.concatenate(found_ends)
    starts_row = np.diff(sample_row, prepend=-1) != 0
    start = np.where(starts_row, 0, np.concatenate([[0], end[:-1]]))
    return sample_row, start, end


def row_problem(tokens: np.ndarray, labels: np.ndarray) -> tuple[int, int, str] | None:
    """(row, position, what is wrong) of the first place where [rows, S] tokens and labels leave upstream's
    layout, or None."""
    ends = tokens < 0
    no_end = ~ends.any(axis=1)
    if no_end.any():
        return int(np.argmax(no_end)), 0, (
            "no sample ends in this row (no token is marked as a sample's last, -1 - id): written by a "
            "Pai-Megatron-Patch builder older than February 2025, whose rows do not say where packed samples end")
    trained = labels != IGNORED
    next_tokens = np.where(ends, -1 - tokens, tokens)[:, 1:]
    last_end = tokens.shape[1] - 1 - np.argmax(ends[:, ::-1], axis=1)
    checks = [
        (trained & (labels < 0), "label {label} is neither -100 nor a token id"),
        (trained & ends, "a sample's last position is trained (label {label}), though nothing follows it"),
        (trained[:, :-1] & (labels[:, :-1] != next_tokens), "label {label} is not the next token: labels are not the "
                                                            "row's tokens shifted by one"),
        (trained & (np.arange(tokens.shape[1]) > last_end[:, None]), "label {label} in the padding after the row's "
                                                                     "last sample"),
    ]
    for bad, why in checks:
        if bad.any():
            row, position = map(int, np.argwhere(bad)[0])
            return row, position, why.format(label=int(labels[row, position]))
    return None
