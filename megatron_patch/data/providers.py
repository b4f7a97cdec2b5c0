"""The dataset provider and batch reader that `pretrain()` calls, for every dataset type."""

from __future__ import annotations

import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.training import get_args, get_tokenizer, print_rank_0
from megatron.training.utils import get_blend_and_blend_per_split


def _gpt_dataset_config(args) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        # The model builds its own causal mask; an S x S mask per sample only costs memory.
        create_attention_mask=False,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples):
    args = get_args()
    if args.dataset_type == "mock":
        dataset_type = MockGPTDataset
    elif args.dataset_type == "idxmap" and not args.instruction_tuning:
        dataset_type = GPTDataset
    else:
        from megatron_patch.data.sft_providers import build_sft_datasets

        return build_sft_datasets(args, train_val_test_num_samples)
    print_rank_0(f"> building {args.dataset_type} pre-training datasets ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, lambda: True, _gpt_dataset_config(args)
    ).build()


# Every rank reads its own batches (the samplers depend only on the data-parallel rank), so no
# tensor-parallel broadcast is needed and every pipeline stage gets the fields it uses.
train_valid_test_datasets_provider.is_distributed = True


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] mask, True where attention is forbidden: later tokens and other packed samples.

    RoPE keeps scores relative, so samples packed after others see the same attention as alone.
    """
    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same_sample = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(causal[None] & same_sample)[:, None]


def get_batch(data_iterator) -> dict:
    """Next micro-batch, on this rank's device."""
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    out = {key: value.to(device, non_blocking=True) for key, value in batch.items() if torch.is_tensor(value)}
    segment_ids = out.pop("segment_ids", None)
    if segment_ids is not None:
        out["attention_mask"] = packed_attention_mask(segment_ids)
    if mpu.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        out = get_batch_on_this_cp_rank(out)
    return out
