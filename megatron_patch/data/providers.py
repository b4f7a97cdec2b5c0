"""The dataset provider and batch reader that `pretrain()` calls, for every dataset type."""

from __future__ import annotations

import torch
from megatron.core import mpu
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.training import get_args, get_tokenizer, print_rank_0
from megatron.training.utils import get_blend_and_blend_per_split

from megatron_patch.attention import PackedSamples, varlen_available
from megatron_patch.data.blend import weight_problem
from megatron_patch.data.dataset_checks import check_dataset
from megatron_patch.data.idxmap_stamp import read_index_facts
from megatron_patch.errors import UserError


def build_pretrain_datasets(args, tokenizer, num_samples):
    """The (train, valid, test) GPTDatasets (MockGPTDatasets for --dataset-type mock) that training builds from
    its arguments: the --data-path blend split by --split, or --train/valid/test-data-path. Every idxmap of
    the blend is checked first, so a missing, empty or mismatched one stops with a message naming it."""
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    if args.dataset_type != "mock":
        splits = zip(("--train-data-path", "--valid-data-path", "--test-data-path"), blend_per_split or [])
        for label, (prefixes, weights) in [(label, b) for label, b in [("--data-path", blend), *splits] if b]:
            for prefix, weight in zip(prefixes, weights or [1.0] * len(prefixes)):
                if problem := weight_problem(label, weight, prefix):
                    raise UserError(f"error: {problem}")
                check_dataset(label, prefix, "pretrain")
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        # The model builds its own causal mask; an S x S mask per sample only costs memory.
        create_attention_mask=False,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )
    if args.dataset_type == "mock":
        return BlendedMegatronDatasetBuilder(MockGPTDataset, num_samples, lambda: True, config).build()
    _check_split_documents(config, num_samples)
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()


def _check_split_documents(config: GPTDatasetConfig, num_samples) -> None:
    """megatron-core loops forever building a split that is asked for samples but gets no document of an idxmap
    (its epochs hold no tokens), as --split 99,1,0 does to the validation split of 50 documents or fewer."""
    if config.blend is None:
        return
    for prefix in config.blend[0]:
        documents = read_index_facts(f"{prefix}.idx").documents
        for name, wanted, bounds in zip(("training", "validation", "test"), num_samples, config.split_matrix):
            # megatron-core's own bounds: documents [round(start * n), round(end * n)) of each idxmap
            if wanted and bounds and round(bounds[0] * documents) == round(bounds[1] * documents):
                raise UserError(
                    f"error: --data-path {prefix} has {documents:,} documents, and --split {config.split} leaves its "
                    f"{name} split none. Give it more documents (at least 51 for run_mcore_qwen.sh's 99,1,0 split "
                    f"when VALID_DATASET_PATH is DATASET_PATH), or pass a separate VALID_DATASET_PATH.")


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """megatron.training asks for `vp_stage` under virtual pipelining (every rank builds the same datasets here)."""
    args = get_args()
    if args.dataset_type != "mock" and (args.dataset_type == "raw" or args.instruction_tuning):
        from megatron_patch.data.sft_providers import build_sft_datasets

        return build_sft_datasets(args, train_val_test_num_samples)
    print_rank_0(f"> building {args.dataset_type} pre-training datasets ...")
    return build_pretrain_datasets(args, get_tokenizer(), train_val_test_num_samples)


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


def sample_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] bool, True where a packed sample starts: every row's first token, and wherever the id changes (so
    the padding after the last sample too)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def sample_boundaries(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative lengths of the packed samples over the rows of segment_ids [b, s] read one after the other, int32;
    the longest sample's length). A row always starts a new sample; so does its padding."""
    starts = sample_starts(segment_ids)
    total = torch.tensor([segment_ids.numel()])
    cu_seqlens = torch.cat([starts.reshape(-1).nonzero().squeeze(1), total]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def packed_seq_params_for(segment_ids: torch.Tensor, device) -> PackedSamples:
    """The packed samples' boundaries for the local spec's variable-length attention ([s, b, heads, d] layout)."""
    cu_seqlens, longest = sample_boundaries(segment_ids)
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    row = segment_ids.shape[1]
    return PackedSamples(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                         max_seqlen_q=row, max_seqlen_kv=row, longest_sample=longest)


def static_packed_seq_params(segment_ids: torch.Tensor, position_ids: torch.Tensor, bounds) -> PackedSamples:
    """packed_seq_params_for in fixed shapes, computed where segment_ids lie without reading them on the host, so that
    a whole-iteration CUDA graph replays it with each batch's own boundaries. Cuts at every sample start and every
    `bounds.longest` tokens of padding (positions count on from 0 through the padding; no sample is longer), then
    repeats the total up to `b x bounds.segments` samples (empty ones, which the kernel skips). The kernel's grid is
    sized by the datasets' longest sample (sft_providers.PackedRowBounds), not by this batch's, which the host
    cannot know inside a replay."""
    rows, row = segment_ids.shape
    capacity = rows * bounds.segments
    starts = (sample_starts(segment_ids) | (position_ids % bounds.longest == 0)).reshape(-1)
    total = starts.numel()
    # Start k goes to slot k + 1 of the buffer, every other token to slot 0, dropped; a start past the capacity
    # indexes out of the buffer and fails (the bounds cover every row of the datasets, so it cannot happen).
    slot = torch.where(starts, starts.cumsum(0), 0)
    buffer = torch.full((capacity + 1,), total, dtype=torch.int64, device=starts.device)
    buffer.scatter_(0, slot, torch.arange(total, device=starts.device))
    cu_seqlens = torch.cat([buffer[1:], buffer.new_full((1,), total)]).to(torch.int32)
    return PackedSamples(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                         max_seqlen_q=row, max_seqlen_kv=row, longest_sample=bounds.longest)


def thd_packed_seq_params(segment_ids: torch.Tensor, device) -> PackedSeqParams:
    """The packed samples' boundaries in megatron-core's "thd" format, which Transformer Engine's attention and
    megatron-core's RoPE take (positions restart in every sample): the micro-batch's rows as one row of b * s
    tokens (thd_batch), max_seqlen the longest sample (it sizes the rotary table and TE's kernels)."""
    cu_seqlens, longest = sample_boundaries(segment_ids)
    cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def thd_batch(batch: dict, segment_ids: torch.Tensor, device) -> dict:
    """A packed micro-batch for the Transformer Engine spec: tokens, labels, loss mask and positions as one row of
    b * s tokens ([1, b * s]: megatron-core's thd attention squeezes a batch dimension of 1), and the boundaries."""
    flat = {key: value.reshape(1, -1) for key, value in batch.items() if key != "attention_mask"}
    return {**flat, "packed_seq_params": thd_packed_seq_params(segment_ids, device)}


def packed_attention_by_varlen(args) -> bool:
    """Packed samples go to the local spec's SDPA attention as boundaries (variable-length flash kernel) where it
    can run: a GPU, a torch that has it, bf16/fp16, no attention dropout, no context parallelism (its split of the
    sequence needs the mask), not --plain-kernels (megatron-core's own DotProductAttention takes masks only).
    Otherwise as the dense block mask. (Under a whole-iteration CUDA graph the boundaries take fixed shapes:
    static_packed_seq_params.)"""
    return (varlen_available() and args.transformer_impl == "local" and not args.plain_kernels
            and (args.bf16 or args.fp16)
            and not args.attention_dropout and mpu.get_context_parallel_world_size() == 1)


def _packed_row_bounds():
    """This run's sft_providers.PackedRowBounds (None when no packed SFT dataset was built), imported when asked
    as train_valid_test_datasets_provider imports the SFT datasets: pre-training never loads them."""
    from megatron_patch.data.sft_providers import packed_row_bounds_of_this_run

    return packed_row_bounds_of_this_run()


MODEL_INPUTS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")


def get_batch(data_iterator) -> dict:
    """Next micro-batch, on this rank's device: under context parallelism, this CP rank's two sequence chunks."""
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    # Only what the model takes: a blend's items also carry their dataset id ([b], no sequence dimension), which
    # megatron-core's context-parallel split would try to cut along one.
    out = {key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS if torch.is_tensor(batch.get(key))}
    segment_ids = batch.get("segment_ids")
    cp_size = mpu.get_context_parallel_world_size()
    args = get_args() if segment_ids is not None else None  # pre-training batches need no settings
    if segment_ids is not None and args.transformer_impl == "transformer_engine":
        if cp_size > 1 or (args.pipeline_model_parallel_size > 1 and args.micro_batch_size > 1):
            # The launcher trains these layouts on the local spec (launch/machine.py, packed_samples_need_masks).
            raise UserError("error: packed SFT samples with CP > 1, or with PP > 1 and a micro-batch above 1, need "
                            "--transformer-impl local: TE's thd format needs sample lengths divisible by 2 x CP, and "
                            "its one row of b x s tokens is not the activation shape pipeline stages exchange.")
        return thd_batch(out, segment_ids.cpu(), device)
    varlen = segment_ids is not None and packed_attention_by_varlen(args)
    if varlen and args.cuda_graph_impl != "full_iteration":
        # Computed from the reader's CPU tensor: the longest sample's length needs no GPU sync.
        out["packed_seq_params"] = packed_seq_params_for(segment_ids.cpu(), device)
    elif varlen and (bounds := _packed_row_bounds()) is not None:  # in a replay: fixed shapes, sized by the data
        out["packed_seq_params"] = static_packed_seq_params(segment_ids.to(device, non_blocking=True),
                                                            out["position_ids"], bounds)
    elif segment_ids is not None and cp_size == 1:
        out["attention_mask"] = packed_attention_mask(segment_ids.to(device, non_blocking=True))
    if cp_size > 1:
        return _on_this_cp_rank(out, segment_ids, device)
    return out


def _on_this_cp_rank(batch: dict, segment_ids, device) -> dict:
    """megatron-core's load-balanced split (2 of the 2*CP sequence chunks per rank, megatron_patch/
    context_parallel.py); packed samples' block mask only as this rank's query rows against every key."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_patch.context_parallel import packed_attention_mask_rows

    group = mpu.get_context_parallel_group()
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    if segment_ids is not None:
        batch["attention_mask"] = packed_attention_mask_rows(segment_ids.to(device, non_blocking=True),
                                                             group.rank(), group.size())
    return batch
