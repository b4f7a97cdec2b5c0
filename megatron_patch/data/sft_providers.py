"""SFT train/valid/test datasets for `pretrain()`: idxmap (preprocessed) or raw JSON (tokenized on the fly), each
one dataset or a blend of several (`W1 P1 W2 P2 ...`, drawn as Megatron draws its blends)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from megatron.training import print_rank_0

from megatron_patch.data.blend import Blend, read_blend
from megatron_patch.data.dataset_checks import check_dataset, locate_sft_idxmap
from megatron_patch.data.sft_dataset import EpochShuffledRows, RawJSONSFTDataset, SFTIdxMapDataset
from megatron_patch.data.upstream_sft_idxmap import UpstreamSFTIdxMapDataset
from megatron_patch.errors import UserError


def open_sft_idxmap(path: str | Path, seq_length: int, num_samples: int | None, seed: int, packing: bool
                    ) -> SFTIdxMapDataset | UpstreamSFTIdxMapDataset:
    """The SFT idxmap dataset at `path`: our pair (SFTIdxMapDataset) or one built by Pai-Megatron-Patch's own
    builder (UpstreamSFTIdxMapDataset), as dataset_checks.locate_sft_idxmap tells them apart."""
    check_dataset("SFT data path", path, "sft")
    found = locate_sft_idxmap(path)
    if found.layout == "upstream":
        return UpstreamSFTIdxMapDataset(found.prefix, seq_length, num_samples, seed, packing)
    return SFTIdxMapDataset(found.prefix, seq_length, num_samples, seed, packing)



class BlendedSFTDataset(torch.utils.data.Dataset):
    """`num_samples` items from several SFT datasets in proportion to the blend's weights, in the order Megatron's
    BlendedDataset draws them (its build_blending_indices: each item from the dataset furthest below its share,
    so every prefix of the order is within one item of the weights). Dataset k gets as many items as it is drawn
    for; its own epochs and shuffle are its own (seed + 1000 k)."""

    def __init__(self, blend: Blend, num_samples: int, seed: int, build: Callable[[str, int, int], object]) -> None:
        from megatron.core.datasets import helpers

        weights = [w / sum(blend.weights) for w in blend.weights]
        self.blend = blend
        self.dataset_index = np.zeros(num_samples, dtype=np.int16)
        self.dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index, weights, len(weights),
                                       num_samples, False)
        counts = np.bincount(self.dataset_index, minlength=len(weights)).tolist()
        self.datasets = [build(path, count, seed + 1000 * k) for k, (path, count) in enumerate(zip(blend.paths, counts))]

    def describe(self) -> str:
        return "blend of " + ", ".join(f"{w:g} x {d.describe()}" for w, d in zip(self.blend.weights, self.datasets))

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.datasets[self.dataset_index[idx]][int(self.dataset_sample_index[idx])]


@dataclass(frozen=True)
class PackedRowBounds:
    """What every packed row of a run's SFT datasets fits in: samples of at most `longest` tokens, and at most
    `segments` attention segments per row once the row's padding is cut into runs of at most `longest` tokens.
    A whole-iteration CUDA graph replays the samples' boundaries in buffers of this size (data/providers.py)."""
    longest: int
    segments: int


def _row_datasets(dataset) -> list[EpochShuffledRows]:
    return [d for part in dataset.datasets for d in _row_datasets(part)] if isinstance(dataset, BlendedSFTDataset) \
        else [dataset]


def packed_row_bounds(datasets) -> PackedRowBounds | None:
    """The bounds over every row of `datasets` (blends opened up); None when they hold no sample token."""
    rows = [(d.seq_length, d.row_lengths(r)) for dataset in datasets for d in _row_datasets(dataset)
            for r in range(d.row_count)]
    longest = max((max(lengths, default=0) for _, lengths in rows), default=0)
    if longest == 0:
        return None
    segments = max(len(lengths) + math.ceil((seq - sum(lengths)) / longest) for seq, lengths in rows)
    return PackedRowBounds(longest, segments)


_packed_sft: dict = {}  # this process's packed SFT datasets, and their bounds once asked for


def packed_row_bounds_of_this_run() -> PackedRowBounds | None:
    """packed_row_bounds of the datasets build_sft_datasets built last with packing (None if it did not)."""
    if "bounds" not in _packed_sft:
        _packed_sft["bounds"] = packed_row_bounds(_packed_sft.get("datasets", []))
    return _packed_sft["bounds"]


def _blend(words, what: str) -> Blend:
    if not words:
        raise UserError(f"error: SFT needs --{what}-data-path (DATASET_PATH / VALID_DATASET_PATH in run_mcore_qwen.sh).")
    return read_blend(f"--{what}-data-path", list(words))


def build_sft_datasets(args, num_samples):
    train = _blend(args.train_data_path, "train")
    valid = _blend(args.valid_data_path, "valid")
    # Upstream passed the validation file as the test file too, evaluating it twice: no test set unless asked.
    test = _blend(args.test_data_path, "test") if args.test_data_path else None
    packing = args.sft_packing
    if args.dataset_type == "raw":
        from megatron_patch.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer_model)
        # Raw samples are padded to PAD_LEN (--max-padding-length), which the launcher keeps <= SEQ_LEN.
        length = args.max_padding_length or args.seq_length

        def build_one(path, n, seed):
            return RawJSONSFTDataset(path, tokenizer, length, n, seed, packing)
    else:
        def build_one(path, n, seed):
            return open_sft_idxmap(path, args.seq_length, n, seed, packing)

    def build(blend: Blend, n: int, seed: int):
        if blend.weights is None:
            return build_one(blend.paths[0], n, seed)
        return BlendedSFTDataset(blend, n, seed, build_one)

    datasets = []
    for blend, n, offset in ((train, num_samples[0], 0), (valid, num_samples[1], 1), (test, num_samples[2], 2)):
        datasets.append(build(blend, n, args.seed + offset) if n and blend else None)
        if datasets[-1] is not None:
            print_rank_0(f"> SFT {('train', 'valid', 'test')[offset]}: {datasets[-1].describe()}, {n} samples"
                         + (", packed" if packing else ""))
    _packed_sft.clear()
    if packing:
        _packed_sft["datasets"] = [d for d in datasets if d is not None]
    return tuple(datasets)
