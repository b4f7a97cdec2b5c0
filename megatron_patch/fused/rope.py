"""Rotary position embedding as one fused kernel, installed in megatron-core's fused-RoPE slot when TE is absent.

megatron-core applies RoPE through `rope_utils.fused_apply_rotary_pos_emb` when `apply_rope_fusion` is on; only
Transformer Engine fills that slot. Unfused, each layer runs about ten elementwise kernels for q and k (cos, sin,
casts, rotate-half slices and concatenations); here they are one.
"""

from __future__ import annotations

import torch

from megatron_patch.fused.compile import compiled_on_cuda


@compiled_on_cuda
def _rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = t_rot * torch.cos(freqs).to(t.dtype) + rotated * torch.sin(freqs).to(t.dtype)
    return torch.cat((out, t_pass), dim=-1)


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """[s, b, heads, dim] queries or keys, [s, 1, 1, rot_dim] angles (megatron-core's bshd layout)."""
    if interleaved:
        raise NotImplementedError("interleaved RoPE is not Qwen2.5's; it needs Transformer Engine's fused RoPE")
    return _rope(t, freqs)


def slot_filled() -> bool:
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None


def install() -> None:
    """Fill megatron-core's fused-RoPE slot if Transformer Engine left it empty."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb


def configure(args) -> None:
    """After parsing Megatron's arguments, before its config is built: our fused RoPE unless TE's is there or
    --plain-kernels asks for megatron-core's unfused one."""
    if not args.plain_kernels:
        install()
    if args.apply_rope_fusion and not slot_filled():
        args.apply_rope_fusion = False
