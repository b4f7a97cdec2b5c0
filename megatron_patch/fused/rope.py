"""Rotary position embedding as one fused kernel, installed in megatron-core's fused-RoPE slot when TE is absent.

megatron-core applies RoPE through `rope_utils.fused_apply_rotary_pos_emb` when `apply_rope_fusion` is on; only
Transformer Engine fills that slot. Unfused, each layer runs about ten elementwise kernels for q and k (cos, sin,
casts, rotate-half slices and concatenations); here the rotation is one kernel each way, plus one small kernel
for the cos and sin tables.
"""

from __future__ import annotations

import torch

from megatron_patch.fused.compile import compiled_on_cuda


@compiled_on_cuda
def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)


@compiled_on_cuda
def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot_dim = cos.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    out = t_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out, t_pass), dim=-1)


@compiled_on_cuda
def _rotate_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of _rotate: grad * cos plus the rotate-half's transpose of grad * sin."""
    rot_dim = cos.shape[-1]
    g_rot, g_pass = grad[..., :rot_dim], grad[..., rot_dim:]
    g_sin1, g_sin2 = (g_rot * sin).chunk(2, dim=-1)
    return torch.cat((g_rot * cos + torch.cat((g_sin2, -g_sin1), dim=-1), g_pass), dim=-1)


class _Rope(torch.autograd.Function):
    """cos and sin once per call, on the [s, 1, 1, rot_dim] angles, then the rotation and its transpose as two
    compiled kernels. Compiled as one function with autograd, the kernel evaluated cos and sin for every element
    of q (the angles broadcast over batch and heads) and the backward went through slices and concatenations
    that wrote zero-filled copies. On the CPU the same maths run eagerly, in megatron-core's unfused order
    (bit-identical to it)."""

    @staticmethod
    def forward(ctx, t, freqs):
        cos, sin = _cos_sin(freqs, t.dtype)
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate_backward(grad, cos, sin), None


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """[s, b, heads, dim] queries or keys, [s, 1, 1, rot_dim] angles (megatron-core's bshd layout)."""
    if interleaved:
        raise NotImplementedError("interleaved RoPE is not Qwen2.5's; it needs Transformer Engine's fused RoPE")
    return _Rope.apply(t, freqs)


def install() -> None:
    """Fill megatron-core's fused-RoPE slot (the manifest does so only where Transformer Engine left it empty)."""
    from megatron.core.models.common.embeddings import rope_utils

    rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
