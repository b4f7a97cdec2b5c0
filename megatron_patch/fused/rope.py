"""Rotary position embedding as one fused kernel, installed in megatron-core's fused-RoPE slot when TE is absent.

megatron-core applies RoPE through `rope_utils.fused_apply_rotary_pos_emb` when `apply_rope_fusion` is on; only
Transformer Engine fills that slot. Unfused, each layer runs about ten elementwise kernels for q and k (cos, sin,
casts, rotate-half slices and concatenations); here the rotation is one kernel each way, plus one small kernel
for the cos and sin tables.
"""

from __future__ import annotations

import torch

from megatron_patch.fused.compile import compiled_on_cuda

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: the split and the rotation run as torch operations
    triton = None


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


# ---- the QKV projection's output split into q, k, v with RoPE applied, one kernel each way
#
# megatron-core's split path views the [s, b, groups, (q heads per group + 2) * d] projection output as q, k and
# v, copies q into [s, b, heads, d] (a reshape across the groups), rotates q and k in two more kernels each way,
# and in the backward concatenates dq, dk and dv back into the projection's layout. With fused_single_qkv_rope it
# hands the unsplit tensor to one function instead (Transformer Engine's, when TE is there); this is ours: one
# read and one write of the projection output forward, the same backward.

if triton is not None:
    @triton.jit
    def _qkv_rope_kernel(src_ptr, src_stride_s, src_stride_b, src_stride_g,
                         q_ptr, q_stride_s, q_stride_b, q_stride_h,
                         k_ptr, k_stride_s, k_stride_b, k_stride_h,
                         v_ptr, v_stride_s, v_stride_b, v_stride_h,
                         cos_ptr, sin_ptr, rows, batch, groups, q_per_group,
                         HALF: tl.constexpr, ROWS: tl.constexpr, FORWARD: tl.constexpr):
        """Each program takes ROWS head rows of the projection output in its order (token, group, then the
        group's q heads, its k head and its v head) as [ROWS, 2 * HALF].

        Forward: src (the projection output) -> q, k, v. Backward: the gradients of q, k, v -> src's gradient;
        the rotation's transpose is the rotation by minus the angle.
        """
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
        col = tl.arange(0, HALF)[None, :]
        per_group = q_per_group + 2
        head = row % per_group
        group = (row // per_group) % groups
        token = row // (per_group * groups)
        pos, b = token // batch, token % batch
        inside = row < rows
        is_q = inside & (head < q_per_group)
        is_k = inside & (head == q_per_group)
        is_v = inside & (head == q_per_group + 1)
        src = src_ptr + pos * src_stride_s + b * src_stride_b + group * src_stride_g + head * (2 * HALF) + col
        q = q_ptr + pos * q_stride_s + b * q_stride_b + (group * q_per_group + head) * q_stride_h + col
        k = k_ptr + pos * k_stride_s + b * k_stride_b + group * k_stride_h + col
        v = v_ptr + pos * v_stride_s + b * v_stride_b + group * v_stride_h + col
        cos1 = tl.load(cos_ptr + pos * 2 * HALF + col, mask=inside, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + pos * 2 * HALF + HALF + col, mask=inside, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + pos * 2 * HALF + col, mask=inside, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + pos * 2 * HALF + HALF + col, mask=inside, other=0.0).to(tl.float32)
        if FORWARD:
            x1 = tl.load(src, mask=inside, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF, mask=inside, other=0.0).to(tl.float32)
            # rotate_half: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]; v passes unrotated
            out1 = tl.where(is_v, x1, x1 * cos1 - x2 * sin1)
            out2 = tl.where(is_v, x2, x2 * cos2 + x1 * sin2)
            out_type = q_ptr.dtype.element_ty
            tl.store(q, out1.to(out_type), mask=is_q)
            tl.store(q + HALF, out2.to(out_type), mask=is_q)
            tl.store(k, out1.to(out_type), mask=is_k)
            tl.store(k + HALF, out2.to(out_type), mask=is_k)
            tl.store(v, out1.to(out_type), mask=is_v)
            tl.store(v + HALF, out2.to(out_type), mask=is_v)
        else:
            g1 = (tl.load(q, mask=is_q, other=0.0).to(tl.float32) + tl.load(k, mask=is_k, other=0.0).to(tl.float32)
                  + tl.load(v, mask=is_v, other=0.0).to(tl.float32))
            g2 = (tl.load(q + HALF, mask=is_q, other=0.0).to(tl.float32)
                  + tl.load(k + HALF, mask=is_k, other=0.0).to(tl.float32)
                  + tl.load(v + HALF, mask=is_v, other=0.0).to(tl.float32))
            # the transpose of the rotation above: [g1 cos1 + g2 sin2, g2 cos2 - g1 sin1]
            out1 = tl.where(is_v, g1, g1 * cos1 + g2 * sin2)
            out2 = tl.where(is_v, g2, g2 * cos2 - g1 * sin1)
            out_type = src_ptr.dtype.element_ty
            tl.store(src, out1.to(out_type), mask=inside)
            tl.store(src + HALF, out2.to(out_type), mask=inside)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _strides_sbh(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


ROWS, NUM_WARPS = 32, 4  # head rows per program, warps (benchmarks/qkv_projection.py sweeps them)


def _launch(src, q, k, v, cos, sin, q_per_group, forward):
    seq, batch, groups = src.shape[:3]
    head_dim = q.shape[-1]
    rows = seq * batch * groups * (q_per_group + 2)
    if rows:
        _qkv_rope_kernel[(triton.cdiv(rows, ROWS),)](
            src, *_strides_sbh(src), q, *_strides_sbh(q), k, *_strides_sbh(k), v, *_strides_sbh(v),
            cos, sin, rows, batch, groups, q_per_group,
            HALF=head_dim // 2, ROWS=ROWS, FORWARD=forward, num_warps=NUM_WARPS)


class _QkvRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixed_qkv, freqs, q_per_group):
        seq, batch, groups, _ = mixed_qkv.shape
        head_dim = freqs.shape[-1]
        cos, sin = _cos_sin(freqs[:seq].reshape(seq, head_dim), mixed_qkv.dtype)
        cos, sin = cos.contiguous(), sin.contiguous()
        q = mixed_qkv.new_empty(seq, batch, groups * q_per_group, head_dim)  # (qkv_kernel_takes: last dim dense)
        k = mixed_qkv.new_empty(seq, batch, groups, head_dim)
        v = torch.empty_like(k)
        _launch(mixed_qkv, q, k, v, cos, sin, q_per_group, True)
        ctx.save_for_backward(cos, sin)
        ctx.q_per_group, ctx.src_shape = q_per_group, mixed_qkv.shape
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k, grad_v = (_last_dim_dense(g) for g in (grad_q, grad_k, grad_v))
        grad_src = grad_q.new_empty(ctx.src_shape)
        _launch(grad_src, grad_q, grad_k, grad_v, cos, sin, ctx.q_per_group, False)
        return grad_src, None, None


def split_qkv_unfused(mixed_qkv: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                      split_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron-core's split path: split, q to [s, b, heads, d], RoPE on q and k (the kernels above or eager)."""
    head_dim = split_sizes[-1]
    query, key, value = torch.split(mixed_qkv, split_sizes, dim=3)
    query = query.reshape(query.size(0), query.size(1), -1, head_dim)
    return fused_apply_rotary_pos_emb(query, q_freqs), fused_apply_rotary_pos_emb(key, k_freqs), value


def qkv_kernel_takes(mixed_qkv: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                     split_sizes: list[int]) -> bool:
    """The kernel's case: a GPU tensor, one angle table for q and k covering every head dimension."""
    head_dim = split_sizes[-1]
    return (triton is not None and mixed_qkv.is_cuda and q_freqs is k_freqs  # self-attention's one table
            and q_freqs.dim() == 4 and q_freqs.shape[1] == q_freqs.shape[2] == 1 and q_freqs.shape[-1] == head_dim
            and _power_of_two(head_dim // 2) and q_freqs.shape[0] >= mixed_qkv.shape[0] and mixed_qkv.stride(-1) == 1)


def fused_qkv_split_rope(mixed_qkv: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                         split_sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For megatron-core's fused_single_qkv_rope: the [s, b, groups, (q heads per group + 2) * d] projection
    output, the [s, 1, 1, d] angles of q and k, and megatron-core's split sizes [q heads per group * d, d, d]
    -> q [s, b, heads, d], k and v [s, b, groups, d], with RoPE on q and k (the non-interleaved halves)."""
    if not qkv_kernel_takes(mixed_qkv, q_freqs, k_freqs, split_sizes):
        return split_qkv_unfused(mixed_qkv, q_freqs, k_freqs, split_sizes)
    return _QkvRope.apply(mixed_qkv, q_freqs, split_sizes[0] // split_sizes[-1])


def qkv_slot_is_ours() -> bool:
    from megatron.core.transformer import attention

    return getattr(attention, "apply_fused_qkv_rotary_pos_emb", None) is fused_qkv_split_rope


def install_qkv() -> None:
    """Fill megatron-core's fused single-QKV RoPE slot (Transformer Engine's function, absent without TE)."""
    from megatron.core.transformer import attention

    attention.apply_fused_qkv_rotary_pos_emb = fused_qkv_split_rope
    attention.HAVE_FUSED_QKV_ROPE = True
