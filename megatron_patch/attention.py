"""Core attention through torch.nn.functional.scaled_dot_product_attention, for the local (non-TE) spec.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] scores in the activation dtype and
repeats K/V for grouped-query attention. SDPA picks flash / memory-efficient / cuDNN kernels on the GPU (and a
fused CPU kernel), handles GQA without repeating K/V, and takes the same boolean masks (packed samples).
It has no parameters of its own, so checkpoints are those of DotProductAttention.

Backend order: cuDNN first. On an H200 (torch 2.11, bf16, causal, GQA) its forward + backward ran 1.8x faster than
the flash backend that torch picks by default (381 vs 211 TFLOP/s at Qwen2.5-1.5B, sequence 2048;
benchmarks/attention_backends.py). Where cuDNN cannot take the call (a CPU, another GPU, a dropout or mask it
does not support) torch goes down the list to flash, memory-efficient, then math.

Packed samples (SFT packing): on a GPU the batch reader hands over the samples' boundaries (PackedSeqParams,
cumulative lengths over the micro-batch's rows) and attention runs through torch's variable-length flash kernel
(torch.nn.attention.varlen), which skips every block between two samples; elsewhere it gets the dense block mask
instead. (The Transformer Engine spec takes the same boundaries in megatron-core's "thd" format: data/providers.py.)

Context parallelism (megatron-core only has it in Transformer Engine's attention): see context_parallel.py.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # an older torch: packed samples take the block mask
    varlen_attn = None
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_patch.context_parallel import BACKEND_PRIORITY, context_parallel_attention


@dataclass
class PackedSamples(PackedSeqParams):
    """Packed samples' boundaries, [s, b, heads, d] layout. max_seqlen_q/kv hold the row length (GPTModel sizes
    its rotary table by them whenever packed_seq_params is given); longest_sample bounds the kernel's grid."""
    longest_sample: int = 0


@functools.cache  # asked by every micro-batch's get_batch; the answer is fixed for the process
def varlen_available() -> bool:
    """torch's variable-length flash kernels: a torch with torch.nn.attention.varlen and a CUDA GPU of compute
    capability 8.0 or later (Ampere on)."""
    return varlen_attn is not None and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@functools.cache
def _varlen_gqa_keyword() -> dict[str, bool]:
    """varlen_attn of torch 2.14 asks for enable_gqa=True when K/V have fewer heads than Q; that of torch 2.11 has no
    such argument, and its flash kernel takes grouped K/V as they are."""
    return {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}


def varlen_flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_kv, longest_q, longest_kv, scale):
    """[tokens, heads, d] each (K/V may have fewer heads: grouped-query attention); causal within each sample.
    torch's public variable-length attention (a custom op with its own backward): the same flash kernels as aten's
    private _flash_attention_forward/_backward, whose signatures move between torch releases, for 0.07-0.14 ms more
    host time per forward + backward (docs/benchmarks.md, issue 8)."""
    gqa = _varlen_gqa_keyword() if k.shape[1] != q.shape[1] else {}
    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_kv, longest_q, longest_kv, scale=scale, window_size=(-1, 0),
                       **gqa)


def packed_varlen_attention(query, key, value, packed_seq_params, scale):
    """Causal attention within each packed sample. query/key/value [s, b, heads, d]; the cumulative lengths
    count tokens row by row ([b, s] flattened). Returns [s, b, heads * d]."""
    seq, batch = query.shape[:2]
    # [s, b, heads, d] -> [b * s, heads, d]: tokens in the order of the cumulative lengths.
    q, k, v = (t.transpose(0, 1).reshape(batch * seq, t.shape[2], t.shape[3]) for t in (query, key, value))
    p = packed_seq_params
    longest_q, longest_kv = (p.longest_sample, p.longest_sample) if isinstance(p, PackedSamples) \
        else (p.max_seqlen_q, p.max_seqlen_kv)
    context = varlen_flash_attention(q, k, v, p.cu_seqlens_q, p.cu_seqlens_kv, longest_q, longest_kv, scale)
    return context.reshape(batch, seq, -1).transpose(0, 1).contiguous()


class SDPACoreAttention(DotProductAttention):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        # DotProductAttention refuses context parallelism (megatron-core has it in TE's attention only); this
        # class does it itself, so its parent is built as if CP were 1.
        without_cp = copy.copy(config)
        without_cp.context_parallel_size = 1
        super().__init__(without_cp, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        self.config = config
        self.cp_group = None
        if config.context_parallel_size > 1:
            from megatron.core import parallel_state

            cp_group = getattr(pg_collection, "cp", None)
            self.cp_group = parallel_state.get_context_parallel_group() if cp_group is None else cp_group

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("SDPA core attention takes masks, not attention_bias.")
        # DotProductAttention divides its scale by the layer number under query-key layer scaling and
        # multiplies it back inside its softmax: undo the division.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        if self.cp_group is not None:
            if packed_seq_params is not None or (self.training and self.config.attention_dropout) \
                    or (attention_mask is None and (attn_mask_type or self.attn_mask_type) != AttnMaskType.causal):
                raise NotImplementedError("SDPA core attention under context parallelism takes causal attention or "
                                          "a block mask, without packed_seq_params or attention dropout.")
            return context_parallel_attention(query, key, value, attention_mask, self.cp_group, scale)
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "sbhd" or (self.training and self.config.attention_dropout):
                raise NotImplementedError("SDPA core attention takes packed samples as [s, b, heads, d] (qkv_format "
                                          "'sbhd') and without attention dropout.")
            return packed_varlen_attention(query, key, value, packed_seq_params, scale)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is not None:
            # Megatron's masks are True where attention is forbidden; SDPA's are True where it is allowed.
            mask, causal = ~attention_mask, False
        else:
            mask, causal = None, mask_type == AttnMaskType.causal
        dropout = self.config.attention_dropout if self.training else 0.0
        with sdpa_kernel(BACKEND_PRIORITY, set_priority=True):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)
