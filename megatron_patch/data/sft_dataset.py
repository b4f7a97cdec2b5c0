"""SFT datasets for the trainer: from a preprocessed idxmap pair, or from raw JSON tokenized on the fly.

Both yield the same items for the same data and arguments. Each item is a dict of tensors of length seq_length:
  tokens       int64  input ids, padded with <|endoftext|> (151643)
  labels       int64  labels[i] = tokens[i + 1] within the same sample; the last token of a sample and padding
                      get the pad id (a sample never predicts the next sample's first token)
  loss_mask    float32 1.0 where labels[i] is an assistant answer token (or its <|im_end|>), else 0.0
  position_ids int64  0, 1, ... restarting at every sample (padding counts on from 0 as its own run)
  segment_ids  int64  (packing only) the sample's index in the row; padding gets one more id than the last sample,
                      so attention can be limited to tokens with equal segment ids

Epochs: `num_samples` may exceed the rows available; index i reads row perm_e[i % rows] of epoch
e = i // rows, where perm_e is a permutation drawn from (seed, e), so every epoch is a fresh, reproducible shuffle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_patch.data.dataset_checks import check_dataset, locate_sft_idxmap
from megatron_patch.data.sft import SFTSample, build_sft_sample, plan_packing
from megatron_patch.errors import UserError
from megatron_patch.tokenizer import PAD_TOKEN_ID


def make_training_item(samples: Sequence[SFTSample], seq_length: int, packing: bool) -> dict[str, torch.Tensor]:
    """The trainer's dict for one row made of `samples` (one sample unless packing)."""
    tokens = np.full(seq_length, PAD_TOKEN_ID, dtype=np.int64)
    labels = np.full(seq_length, PAD_TOKEN_ID, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    segment_ids = np.full(seq_length, len(samples), dtype=np.int64)
    at = 0
    for k, sample in enumerate(samples):
        n = min(len(sample), seq_length - at)
        if n <= 0:
            break
        ids, mask = sample.tokens[:n], sample.answer_mask[:n]
        tokens[at : at + n] = ids
        labels[at : at + n - 1] = ids[1:]
        loss_mask[at : at + n - 1] = mask[1:]
        position_ids[at : at + n] = np.arange(n)
        segment_ids[at : at + n] = k
        at += n
    position_ids[at:] = np.arange(seq_length - at)
    item = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
    }
    if packing:
        item["segment_ids"] = torch.from_numpy(segment_ids)
    return item


class EpochShuffledRows(torch.utils.data.Dataset):
    """num_samples items over `row_count` rows, each epoch a permutation drawn from (seed, epoch)."""

    def __init__(self, row_count: int, seq_length: int, num_samples: int | None, seed: int, packing: bool) -> None:
        if row_count == 0:
            raise UserError(f"error: {self.describe()} holds no samples: there is nothing to train on.")
        self.row_count = row_count
        self.seq_length = seq_length
        self.num_samples = row_count if num_samples is None else int(num_samples)
        self.seed = seed
        self.packing = packing
        self._permutations: dict[int, np.ndarray] = {}

    def describe(self) -> str:
        return type(self).__name__

    def __len__(self) -> int:
        return self.num_samples

    def row_index(self, idx: int) -> int:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"index {idx} out of range for {self.num_samples} samples")
        epoch, within = divmod(int(idx), self.row_count)
        if epoch not in self._permutations:
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.row_count)
        return int(self._permutations[epoch][within])

    def row_samples(self, row: int) -> list[SFTSample]:
        raise NotImplementedError

    def sample_length(self, i: int) -> int:
        """Sample i's token count as stored (row_lengths cuts it to its row)."""
        raise NotImplementedError

    def row_lengths(self, row: int) -> list[int]:
        """The token counts of the row's samples as make_training_item lays them out: each cut to what is left of
        the row, a sample with nothing left dropped."""
        lengths, left = [], self.seq_length
        for i in self.rows[row]:
            n = min(self.sample_length(i), left)
            if n <= 0:
                break
            lengths.append(n)
            left -= n
        return lengths

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return make_training_item(self.row_samples(self.row_index(idx)), self.seq_length, self.packing)


def sample_rows(lengths: Sequence[int], seq_length: int, packing: bool) -> list[list[int]]:
    """Rows of sample indices: each sample alone, or packed into rows of seq_length (samples cut to it first)."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    return plan_packing([min(n, seq_length) for n in lengths], seq_length)


class SFTIdxMapDataset(EpochShuffledRows):
    """Reads `{path_prefix}_text_document` and `{path_prefix}_label_document` (see sft_preprocess).

    A file packed at preprocessing time for this seq_length is read row by row as written; with packing=True on
    an unpacked file (or one packed for another seq_length) the samples are packed here with the same planner.
    packing=False reads every sample alone, even from a packed file.
    """

    def __init__(self, path_prefix: str | Path, seq_length: int, num_samples: int | None, seed: int,
                 packing: bool) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_patch.data.idxmap_stamp import read_index_facts
        from megatron_patch.data.sft_preprocess import label_prefix, meta_path, text_prefix

        check_dataset("SFT data path", path_prefix, "sft")
        found = locate_sft_idxmap(path_prefix)
        if found.layout != "pair":
            raise UserError(f"error: {path_prefix} is not an SFT idxmap pair; open it with open_sft_idxmap.")
        path_prefix = self.path_prefix = found.prefix
        self.text = IndexedDataset(text_prefix(path_prefix))
        self.labels = IndexedDataset(label_prefix(path_prefix))
        meta_file = Path(meta_path(path_prefix))
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        stamp = read_index_facts(text_prefix(path_prefix) + ".idx").stamp
        if stamp is not None and meta.get("pair_id") != stamp.pair_id.hex():
            meta = {}  # left from another preprocessing run: its packing may not be this data's
        lengths = self.text.sequence_lengths.tolist()
        documents = self.text.document_indices
        if packing and meta.get("packed") and meta.get("seq_length") == seq_length:
            self.rows = [list(range(documents[d], documents[d + 1])) for d in range(len(documents) - 1)]
        else:
            self.rows = sample_rows(lengths, seq_length, packing)
        super().__init__(len(self.rows), seq_length, num_samples, seed, packing)

    def describe(self) -> str:
        return f"SFT idxmap {self.path_prefix}"

    def row_samples(self, row: int) -> list[SFTSample]:
        samples = []
        for i in self.rows[row]:
            tokens = self.text[i][: self.seq_length]
            mask = self.labels[i][: self.seq_length]
            samples.append(SFTSample(tokens, mask, truncated=False))
        return samples

    def sample_length(self, i: int) -> int:
        return int(self.text.sequence_lengths[i])


class RawJSONSFTDataset(EpochShuffledRows):
    """SFT records from a JSON array / JSONL file, tokenized on the fly with build_sft_sample.

    Records are parsed and validated up front (a bad one raises with file:line unless skip_bad_records). Without
    packing each item is tokenized when read; with packing every record is tokenized here, since packing
    needs all the lengths.
    """

    def __init__(self, json_path: str | Path, tokenizer, seq_length: int, num_samples: int | None, seed: int,
                 packing: bool, skip_bad_records: bool = False) -> None:
        from megatron_patch.data.sft_preprocess import read_sft_records

        check_dataset("SFT data path", json_path, "raw")
        self.json_path = str(json_path)
        self.tokenizer = tokenizer
        self.records, self.bad_records = read_sft_records(json_path, skip_bad_records)
        self._samples: list[SFTSample] | None = None
        if packing:
            self._samples = [build_sft_sample(r.value, tokenizer, seq_length) for r in self.records]
            self.rows = sample_rows([len(s) for s in self._samples], seq_length, packing=True)
        else:
            self.rows = [[i] for i in range(len(self.records))]
        super().__init__(len(self.rows), seq_length, num_samples, seed, packing)

    def describe(self) -> str:
        return f"SFT file {self.json_path}"

    def _sample(self, i: int) -> SFTSample:
        if self._samples is not None:
            return self._samples[i]
        return build_sft_sample(self.records[i].value, self.tokenizer, self.seq_length)

    def row_samples(self, row: int) -> list[SFTSample]:
        return [self._sample(i) for i in self.rows[row]]

    def sample_length(self, i: int) -> int:
        return len(self._sample(i))
