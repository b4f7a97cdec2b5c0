"""The packed SFT rows both sides of the fine-tuning benchmark train on, and the real tokens they hold.

Ours reads the records as a user's run does (MP_DATASET_TYPE=raw MP_SFT_PACKING=true: RawJSONSFTDataset with the
chat template and the best-fit-decreasing packer, PAD_LEN = SEQ_LEN). megatron's sampler hands out the train split's
items in order, micro-batch after micro-batch (one data-parallel rank; a CUDA-graphed step reads its micro-batches
the same way), and item i is packed row row_index(i), each epoch a fresh permutation drawn from the seed.
`prepare_sft_assets` writes the records, the tokenizer and those rows once, where the tokenizer's package and the
package index are (the device has neither); `PackedRows` reads them back for the Hugging Face side, which trains on
the same rows in the same order (position ids restarting in every sample: transformers' padding-free format), and
counts for both sides the real tokens of the steps they time: every sample token, the rows' padding left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.harness.matrix_assets import Assets
from megatron_patch.launch.flags import TRAINING_SEED as SEED  # the train split's epochs are drawn from it


@dataclass(frozen=True)
class SFTAssets(Assets):
    """The GPU matrix's asset folder layout (its tokenizer; a checkpoint converted from it) with these records and
    rows."""

    @property
    def records(self) -> Path:
        return self.root / "alpaca-demo.json"

    def rows_file(self, seq_len: int) -> Path:
        return self.root / f"packed-rows-{seq_len}.pt"


def prepare_sft_assets(root: Path, record_files: list[Path], seq_lens: list[int]) -> SFTAssets:
    """The tokenizer (the default Qwen2.5 one), the records of `record_files` (JSON arrays) as one file, and the
    packed rows per sequence length; each written once."""
    from megatron_patch.atomic_write import atomic_write_bytes

    assets = SFTAssets(Path(root))
    assets.root.mkdir(parents=True, exist_ok=True)
    if not (assets.tokenizer / "tokenizer_config.json").is_file():
        from megatron_patch.tokenizer import write_default_tokenizer

        write_default_tokenizer(assets.tokenizer)
    if not assets.records.is_file():
        records = [record for path in record_files for record in json.loads(Path(path).read_text(encoding="utf-8"))]
        atomic_write_bytes(assets.records, json.dumps(records, ensure_ascii=False).encode())
    for seq_len in seq_lens:
        if not assets.rows_file(seq_len).is_file():
            write_packed_rows(assets, seq_len)
    return assets


def write_packed_rows(assets: SFTAssets, seq_len: int) -> None:
    """Every packed row of the records as our raw-JSON dataset builds it: tokens, position ids, loss mask and the
    lengths of its samples."""
    import io

    import torch

    from megatron_patch.atomic_write import atomic_write_bytes
    from megatron_patch.data.sft_dataset import RawJSONSFTDataset, make_training_item
    from megatron_patch.tokenizer import load_tokenizer

    dataset = RawJSONSFTDataset(assets.records, load_tokenizer(assets.tokenizer), seq_len, None, SEED, packing=True)
    rows = [dataset.row_samples(row) for row in range(dataset.row_count)]
    items = [make_training_item(samples, seq_len, packing=True) for samples in rows]
    saved = {"seq_len": seq_len,
             "tokens": torch.stack([item["tokens"] for item in items]).to(torch.int32),
             "position_ids": torch.stack([item["position_ids"] for item in items]).to(torch.int16),
             "loss_mask": torch.stack([item["loss_mask"] for item in items]).bool(),
             "sample_lengths": [[len(sample) for sample in samples] for samples in rows]}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    atomic_write_bytes(assets.rows_file(seq_len), buffer.getvalue())


class PackedRows:
    """The prepared rows in the order a run of `global_batch` rows per step trains them: each step's micro-batches
    for transformers (on `device`) and each step's real tokens."""

    def __init__(self, path: Path, global_batch: int, device="cpu"):
        import torch

        from megatron_patch.data.sft_dataset import EpochShuffledRows

        saved = torch.load(path, weights_only=True)
        self.seq_len, self.global_batch = saved["seq_len"], global_batch
        self.lengths = saved["sample_lengths"]
        self.real = [sum(lengths) for lengths in self.lengths]
        self._order = EpochShuffledRows(len(self.real), self.seq_len, 2**62, SEED, packing=True)  # every epoch
        tokens = saved["tokens"].long()
        # transformers shifts the labels itself: position j is a label where our loss mask marks j - 1 (its
        # prediction within the same sample); prompts, a sample's first token and padding are ignored (-100).
        labels = torch.full_like(tokens, -100)
        labels[:, 1:] = torch.where(saved["loss_mask"][:, :-1], tokens[:, 1:], -100)
        self._rows = {"input_ids": tokens.to(device), "position_ids": saved["position_ids"].long().to(device),
                      "labels": labels.to(device)}

    def rows_of_step(self, step: int) -> list[int]:
        first = step * self.global_batch
        return [self._order.row_index(i) for i in range(first, first + self.global_batch)]

    def tokens(self, step: int) -> int:
        """Real tokens of a step: its rows' samples."""
        return sum(self.real[row] for row in self.rows_of_step(step))

    def micro_batches(self, step: int, count: int) -> list[dict]:
        import torch

        rows = torch.tensor(self.rows_of_step(step), device=self._rows["input_ids"].device)
        return [{key: value[part] for key, value in self._rows.items()} for part in rows.chunk(count)]

    @property
    def fill(self) -> float:
        """The share of all rows' positions that are real tokens."""
        return sum(self.real) / (len(self.real) * self.seq_len)

    @property
    def attention_span(self) -> float:
        """The sequence length whose causal attention costs per token what these samples' does (sum of squared
        lengths over the sum of lengths): the MFU's attention term for packed rows."""
        lengths = [n for row in self.lengths for n in row]
        return sum(n * n for n in lengths) / sum(lengths)


def real_tokens_per_s(log: str, rows: PackedRows, skip: int) -> float:
    """Our run's real tokens per second over its iterations after the first `skip` logged ones: each `[qwen]` line
    rates one iteration's global batch x sequence tokens over its wall time, so its time is those tokens over the
    rate; iteration j trained step j - 1's rows."""
    from megatron_patch.harness.iteration_log import qwen_iterations

    lines = qwen_iterations(log)[skip:]
    if not lines or not all(line.tokens_per_s_per_gpu for line in lines):
        return 0.0
    seconds = sum(rows.global_batch * rows.seq_len / line.tokens_per_s_per_gpu for line in lines)
    return sum(rows.tokens(line.iteration - 1) for line in lines) / seconds
