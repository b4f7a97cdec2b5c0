"""Core attention through torch.nn.functional.scaled_dot_product_attention, for the local (non-TE) spec.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] scores in the activation dtype and
repeats K/V for grouped-query attention. SDPA picks flash / memory-efficient / cuDNN kernels on the GPU (and a
fused CPU kernel), handles GQA without repeating K/V, and takes the same boolean masks (packed samples).
It has no parameters of its own, so checkpoints are those of DotProductAttention.

Backend order: cuDNN first. On an H200 (torch 2.11, bf16, causal, GQA) its forward + backward ran 1.8x faster than
the flash backend that torch picks by default (381 vs 211 TFLOP/s at Qwen2.5-1.5B, sequence 2048;
benchmarks/attention_backends.py). Where cuDNN cannot take the call (a CPU, another GPU, a dropout or mask it
does not support) torch goes down the list to flash, memory-efficient, then math.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


BACKEND_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


class SDPACoreAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPA core attention takes masks, not packed_seq_params or attention_bias.")
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is not None:
            # Megatron's masks are True where attention is forbidden; SDPA's are True where it is allowed.
            mask, causal = ~attention_mask, False
        else:
            mask, causal = None, mask_type == AttnMaskType.causal
        dropout = self.config.attention_dropout if self.training else 0.0
        # DotProductAttention divides its scale by the layer number under query-key layer scaling and
        # multiplies it back inside its softmax: undo the division.
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        with sdpa_kernel(BACKEND_PRIORITY, set_priority=True):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)
