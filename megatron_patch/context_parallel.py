"""Context parallelism (CP) for the local spec's SDPA attention: megatron-core's sequence layout without
Transformer Engine.

Layout (megatron-core's `get_batch_on_this_cp_rank`): the sequence is cut into 2*CP equal chunks and CP rank r
holds chunks r and 2*CP-1-r, in that order, so every rank gets the same share of the causal work. RoPE is sliced
the same way by megatron-core's RotaryEmbedding, and the loss is a per-token sum whose token count megatron-core
all-reduces over the data- and context-parallel ranks (`--calculate-per-token-loss`), as are the gradients.

Attention: each rank all-gathers K and V over the CP group (small under GQA: 2 KV heads against 12 query heads
at 1.5B, 4 against 28 at 7B) and each of its two query chunks attends to the keys it may see: chunk i of the
2*CP sees itself causally (one square block, from the rank's own keys) and chunks 0..i-1 fully (one rectangular
block, no mask, from the gathered ones). The blocks' outputs are merged by their log-sum-exp, and the backward
hands every block the merged output and log-sum-exp (the ring-attention identity), so each block's gradient is
exact. dK and dV of the gathered keys are summed in fp32 and reduce-scattered back to the ranks that own them;
K and V are gathered again in the backward rather than kept (activation memory limits long sequences).

The collectives run under the own-chunk blocks, which need no remote keys: the forward's gather under both,
the backward's gather under the first chunk's and its reduce-scatter under the second's. The gathered buffer
holds every rank's second chunk, then every rank's first (chunks 2CP-1..CP, 0..CP-1), so two all-gathers write
it in place and each chunk's earlier keys are one contiguous range (no reordering copy of K, V, dK or dV).
The two blocks' merge and the sum of their dQ are one compiled kernel each on a GPU.

Why an all-gather and not a ring: at 7B and 32k tokens with CP2 a rank receives 16,384 tokens x 4 KV heads x
128 x 2 bytes x 2 (K and V) = 34 MB per layer (about 0.1 ms over NVLink), against about 3.9 TFLOP of attention
forward per rank and layer (about 10 ms); one exchange hidden under the own-chunk blocks is all it needs. TE's
ring (`p2p`) and `a2a` modes pay off with many KV heads or many CP ranks.

Block kernels: cuDNN's attention on a GPU in bf16/fp16 (the fastest of torch's kernels on Hopper, see
attention.py), else torch's flash kernel, whichever first matches the fp32 reference on a small problem (checked
once per process and shape of heads); an fp32 reference in plain torch elsewhere (the CPU; fp32 on a GPU).
Whatever the device, the chunk bookkeeping and the collectives are the same code.

Packed samples (SFT packing) arrive as the rows of the block mask that belong to this rank's queries
([b, 1, 2*s/2CP, s], True where attention is forbidden, keys in sequence order): attention against the gathered
keys with that mask, the gather's backward reduce-scattering dK and dV.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_patch.fused.compile import compiled_on_cuda

# SDPA's kernel order for the local spec's attention (attention.py says why cuDNN comes first).
BACKEND_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two of the 2*CP sequence chunks that CP rank `cp_rank` holds, in the order it holds them."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


# torch 2.14 renamed the single-tensor collectives (the old names warn there); older torch has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---- Block kernels: attention of queries [b, h, sq, d] to keys/values [b, g, sk, d] (g divides h), returning the
# output and the fp32 log-sum-exp of the scaled scores [b, h, sq]; the backward takes the *merged* output and
# log-sum-exp. `causal` is only ever asked of square blocks (sq == sk).

class ReferenceBlock:
    """Plain torch in fp32: the CPU, and fp32 on a GPU (the fused kernels take bf16/fp16 only)."""

    @staticmethod
    def _scores(q, k, causal, scale):
        b, h, sq, d = q.shape
        groups = k.shape[1]
        # Query heads grouped by the key head they share: [b, g, h/g, sq, d].
        scores = q.float().reshape(b, groups, h // groups, sq, d) @ k.float().unsqueeze(2).transpose(-1, -2) * scale
        if causal:
            future = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores

    @classmethod
    def forward(cls, q, k, v, causal, scale):
        scores = cls._scores(q, k, causal, scale)
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.exp(scores - lse.unsqueeze(-1)) @ v.float().unsqueeze(2)
        return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2), None

    @classmethod
    def backward(cls, grad_out, q, k, v, out, lse, state, causal, scale):
        b, h, sq, d = q.shape
        groups = k.shape[1]
        grouped = lambda t: t.float().reshape(b, groups, h // groups, *t.shape[2:])  # noqa: E731
        probs = torch.exp(cls._scores(q, k, causal, scale) - grouped(lse).unsqueeze(-1))
        grad_out, out = grouped(grad_out), grouped(out)
        grad_v = (probs.transpose(-1, -2) @ grad_out).sum(2)
        grad_probs = grad_out @ v.float().unsqueeze(2).transpose(-1, -2)
        grad_scores = probs * (grad_probs - (grad_out * out).sum(-1, keepdim=True)) * scale
        grad_q = (grad_scores @ k.float().unsqueeze(2)).flatten(1, 2)
        grad_k = (grad_scores.transpose(-1, -2) @ grouped(q)).sum(2)
        return grad_q, grad_k, grad_v


class CudnnBlock:
    """torch's cuDNN attention (bf16/fp16 on a GPU); its log-sum-exp keeps a trailing dimension of 1."""

    @staticmethod
    def forward(q, k, v, causal, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        return out, lse.view(lse.shape[:3]), (cum_q, cum_k, max_q, max_k, seed, offset)

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, state, causal, scale):
        cum_q, cum_k, max_q, max_k, seed, offset = state
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k, v, out, lse.unsqueeze(-1), seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, causal,
            scale=scale)


class FlashBlock:
    """torch's flash kernel (bf16/fp16, Ampere on), through the [b, s, heads, d] op that takes GQA as it is."""

    @staticmethod
    def forward(q, k, v, causal, scale):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal, False, scale=scale)
        return out.transpose(1, 2), lse, (rng_state, unused)

    @staticmethod
    def backward(grad_out, q, k, v, out, lse, state, causal, scale):
        rng_state, unused = state
        q, k, v, out, grad_out = (t.transpose(1, 2) for t in (q, k, v, out, grad_out))
        grads = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), None, None, q.shape[1], k.shape[1],
            0.0, causal, rng_state, unused, scale=scale)
        return tuple(g.transpose(1, 2) for g in grads)


def kernel_error(kernel, device, dtype, heads: int, groups: int) -> str | None:
    """Why `kernel` cannot serve here (it raises, or its output, dQ, dK or dV strays from the fp32 reference by
    more than 2% on a small CP2 problem laid out as in the model), or None."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(256, 1, n, 64, generator=generator).to(device, dtype) for n in (heads, groups,
                                                                                                 groups, heads))
    full_key_value = torch.stack([k, v], dim=2)
    rows = slice(64, 192)  # CP2 rank 1's chunks 1 and 2 of 4
    try:
        results = []
        for block in (kernel, ReferenceBlock):
            exchange = SimulatedExchange(full_key_value, 2)
            out, saved = causal_chunks_forward(q[rows], full_key_value[rows], exchange, 1, 2, 0.125, block)
            grad_query, grad_own = causal_chunks_backward(grad[rows].flatten(2), q[rows], full_key_value[rows],
                                                          exchange, 1, 2, 0.125, saved)
            results.append((out, grad_query, grad_own, exchange.buffer_grad))
    except Exception as error:  # noqa: BLE001  (any failure of the kernel call means: not this kernel)
        return f"{type(error).__name__}: {error}"
    for name, got, want in zip(("output", "dQ", "dK/dV of the own chunks", "dK/dV of the gathered chunks"),
                               *results):
        relative = ((got.float() - want.float()).norm() / want.float().norm()).item()
        if not relative < 2e-2:
            return f"{name} differs from the fp32 reference by {relative:.3g} (relative norm)"
    return None


@functools.cache
def _fused_block_kernel(device: torch.device, dtype: torch.dtype, heads: int, groups: int):
    """cuDNN's kernel if it serves this GPU/dtype/GQA layout, else flash's (checked once per combination)."""
    errors = []
    for kernel in (CudnnBlock, FlashBlock):
        error = kernel_error(kernel, device, dtype, heads, groups)
        if error is None:
            return kernel
        errors.append(f"{kernel.__name__}: {error}")
    raise RuntimeError("context parallelism: no fused attention kernel serves this GPU "
                       f"({torch.cuda.get_device_name(device)}, {dtype}): " + "; ".join(errors))


def block_kernel(q: torch.Tensor, k: torch.Tensor):
    """The block kernel for queries [b, h, s, d] and keys [b, g, s, d]."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return ReferenceBlock
    return _fused_block_kernel(q.device, q.dtype, q.shape[1], k.shape[1])


@compiled_on_cuda
def merge_two_blocks(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two blocks' keys, from each block's output [b, h, c, d] and log-sum-exp
    [b, h, c]: fp32 maths, one compiled kernel on a GPU (eager torch makes 8 passes over fp32 copies of the
    output: about 3 GB of memory traffic per merge at 7B/32k, against 0.35 GB read and written here)."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.float() * torch.exp(lse_a - lse).unsqueeze(-1) + out_b.float() * torch.exp(lse_b - lse).unsqueeze(-1)
    return out.to(out_a.dtype), lse


@compiled_on_cuda
def sum_in_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b added in fp32, rounded once to a's dtype (one kernel on a GPU)."""
    return (a.float() + b.float()).to(a.dtype)


# ---- The gathered K/V buffer: every rank's second chunk in rank order, then every rank's first chunk, i.e. chunks
# 2CP-1, 2CP-2, ..., CP, 0, 1, ..., CP-1. The chunks a query chunk sees in full (all before it) are then one
# contiguous range, and two all-gathers write the two halves in place: no reordering copy either way.

def buffer_order(cp_size: int) -> list[int]:
    """The sequence chunk ids in the order the gathered buffer holds them."""
    return list(range(2 * cp_size - 1, cp_size - 1, -1)) + list(range(cp_size))


def earlier_chunks(chunk: int, chunk_len: int, cp_size: int) -> slice | None:
    """The buffer rows of sequence chunks 0..chunk-1 (what chunk `chunk` attends to in full); None for chunk 0."""
    if chunk == 0:
        return None
    if chunk < cp_size:  # chunks 0..chunk-1 open the buffer's second half
        return slice(cp_size * chunk_len, (cp_size + chunk) * chunk_len)
    # chunks CP..chunk-1 close the first half, chunks 0..CP-1 fill the second
    return slice((2 * cp_size - chunk) * chunk_len, 2 * cp_size * chunk_len)


def sequence_to_buffer(full: torch.Tensor, cp_size: int) -> torch.Tensor:
    """[2CP * c, ...] in sequence order -> buffer_order (a copy)."""
    chunks = full.view(2 * cp_size, full.shape[0] // (2 * cp_size), *full.shape[1:])
    return chunks[buffer_order(cp_size)].flatten(0, 1)


def buffer_to_sequence(buffer: torch.Tensor, cp_size: int) -> torch.Tensor:
    """The inverse of sequence_to_buffer (a copy)."""
    chunks = buffer.view(2 * cp_size, buffer.shape[0] // (2 * cp_size), *buffer.shape[1:])
    return chunks[torch.tensor(buffer_order(cp_size)).argsort()].flatten(0, 1)


class _Pending:
    """A collective in flight: wait() returns its result once it has arrived."""

    def __init__(self, result: torch.Tensor, works=()):
        self.result, self.works = result, works

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.result


class GroupExchange:
    """The collectives of CP attention over a process group, started without waiting (the caller computes the
    blocks that need no remote keys meanwhile)."""

    def __init__(self, group):
        self.group = group

    def gather(self, local: torch.Tensor) -> _Pending:
        """This rank's chunks [2c, ...] -> every rank's, [2CP * c, ...] in buffer_order."""
        cp_size, chunk_len = self.group.size(), local.shape[0] // 2
        local = local.contiguous()
        out = torch.empty((2 * cp_size * chunk_len, *local.shape[1:]), dtype=local.dtype, device=local.device)
        halves = (out[:cp_size * chunk_len], local[chunk_len:]), (out[cp_size * chunk_len:], local[:chunk_len])
        return _Pending(out, [_all_gather_single(whole, mine, group=self.group, async_op=True)
                              for whole, mine in halves])

    def reduce_scatter(self, buffer: torch.Tensor) -> _Pending:
        """The gradient of a gathered buffer [2CP * c, ...], summed over the ranks -> this rank's chunks [2c, ...]."""
        cp_size = self.group.size()
        chunk_len = buffer.shape[0] // (2 * cp_size)
        buffer = buffer.contiguous()
        out = torch.empty((2 * chunk_len, *buffer.shape[1:]), dtype=buffer.dtype, device=buffer.device)
        halves = (out[chunk_len:], buffer[:cp_size * chunk_len]), (out[:chunk_len], buffer[cp_size * chunk_len:])
        return _Pending(out, [_reduce_scatter_single(mine, whole, group=self.group, async_op=True)
                              for mine, whole in halves])


class SimulatedExchange:
    """One CP rank's collectives without the other ranks (the tests' simulated ranks, the kernel check): the
    gather hands out the whole sequence's K/V (given in sequence order); the reduce-scatter keeps this rank's
    share of the buffer's gradient in `buffer_grad` and hands back zeros (as if the other ranks sent none)."""

    def __init__(self, full: torch.Tensor, cp_size: int):
        self.full, self.cp_size, self.buffer_grad = full, cp_size, None

    def gather(self, local: torch.Tensor) -> _Pending:
        return _Pending(sequence_to_buffer(self.full, self.cp_size))

    def reduce_scatter(self, buffer: torch.Tensor) -> _Pending:
        self.buffer_grad = buffer
        return _Pending(buffer.new_zeros((buffer.shape[0] // self.cp_size, *buffer.shape[1:])))


class _GatherSequence(torch.autograd.Function):
    """This rank's [2c, ...] -> the whole [2CP * c, ...] in sequence order (the packed path's keys, which its
    mask's columns index); the backward sums the gradient over the ranks and hands each its own chunks."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        return buffer_to_sequence(GroupExchange(group).gather(local).wait(), group.size())

    @staticmethod
    def backward(ctx, grad):
        return GroupExchange(ctx.group).reduce_scatter(sequence_to_buffer(grad, ctx.group.size())).wait(), None


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 0, 3)  # [s, b, heads, d] -> [b, heads, s, d], a view


def _rows(position: int, chunk_len: int) -> slice:
    return slice(position * chunk_len, (position + 1) * chunk_len)


def _keys_values(key_value: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [b, g, len, d] (views) of key_value [s, b, 2, g, d]'s rows."""
    return _bhsd(key_value[rows, :, 0]), _bhsd(key_value[rows, :, 1])


def causal_chunks_forward(query, key_value, exchange, cp_rank: int, cp_size: int, scale: float, kernel=None):
    """CP rank `cp_rank`'s causal attention. query [2c, b, h, d] and key_value [2c, b, 2, g, d] (K and V stacked)
    hold its two chunks (chunk_ids); exchange (GroupExchange, or SimulatedExchange) brings every rank's K/V.
    Each query chunk attends to its own chunk causally (local keys: computed while the gather runs) and to the
    chunks before it in full. kernel: one of the block kernels above (default: block_kernel's choice). Returns
    the output [2c, b, h * d] and what the backward needs."""
    chunk_len = query.shape[0] // 2
    pending = exchange.gather(key_value)
    queries = [_bhsd(query[_rows(position, chunk_len)]) for position in (0, 1)]
    kernel = kernel or block_kernel(queries[0], _bhsd(key_value[:, :, 0]))
    own = [kernel.forward(q, *_keys_values(key_value, _rows(position, chunk_len)), True, scale)
           for position, q in enumerate(queries)]
    gathered = pending.wait()
    context = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # [2c, b, h, d], contiguous
    outs, lses, states = [], [], []
    for position, chunk in enumerate(chunk_ids(cp_rank, cp_size)):
        out, lse, own_state = own[position]
        states.append([own_state])
        earlier = earlier_chunks(chunk, chunk_len, cp_size)
        if earlier is not None:
            earlier_out, earlier_lse, earlier_state = kernel.forward(queries[position],
                                                                     *_keys_values(gathered, earlier), False, scale)
            out, lse = merge_two_blocks(out, lse, earlier_out, earlier_lse)
            states[-1].append(earlier_state)
        rows = _rows(position, chunk_len)
        context[rows] = out.permute(2, 0, 1, 3)
        # The backward reads each chunk's output where the layer's output holds it: no second copy is kept.
        outs.append(_bhsd(context[rows]))
        lses.append(lse)
    return context.view(context.shape[0], context.shape[1], -1), (kernel, outs, lses, states)


def causal_chunks_backward(grad_out, query, key_value, exchange, cp_rank: int, cp_size: int, scale: float,
                           saved) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of causal_chunks_forward: dQ [2c, b, h, d] and dK/dV of this rank's chunks [2c, b, 2, g, d]
    in fp32, the other ranks' shares included. K/V are gathered again (memory over traffic) while the first
    chunk's own block runs; the gathered keys' dK/dV go back to their ranks while the second chunk's runs."""
    kernel, outs, lses, states = saved
    chunk_len = query.shape[0] // 2
    grad_out = grad_out.reshape(query.shape)
    pending = exchange.gather(key_value)
    grad_own = torch.zeros(key_value.shape, dtype=torch.float32, device=key_value.device)
    grad_queries = [[], []]  # each chunk's dQ of its blocks

    def block_backward(position, keys_values, causal, state):
        rows = _rows(position, chunk_len)
        dq, dk, dv = kernel.backward(_bhsd(grad_out[rows]), _bhsd(query[rows]), *keys_values, outs[position],
                                     lses[position], state, causal, scale)
        grad_queries[position].append(dq)
        return dk, dv

    def own_block_backward(position):
        rows = _rows(position, chunk_len)
        dk, dv = block_backward(position, _keys_values(key_value, rows), True, states[position][0])
        _bhsd(grad_own[rows, :, 0]).add_(dk)
        _bhsd(grad_own[rows, :, 1]).add_(dv)

    own_block_backward(0)
    gathered = pending.wait()
    grad_gathered = torch.zeros(gathered.shape, dtype=torch.float32, device=gathered.device)
    for position, chunk in enumerate(chunk_ids(cp_rank, cp_size)):
        earlier = earlier_chunks(chunk, chunk_len, cp_size)
        if earlier is not None:
            dk, dv = block_backward(position, _keys_values(gathered, earlier), False, states[position][1])
            _bhsd(grad_gathered[earlier, :, 0]).add_(dk)
            _bhsd(grad_gathered[earlier, :, 1]).add_(dv)
    returned = exchange.reduce_scatter(grad_gathered)
    own_block_backward(1)
    grad_own += returned.wait()
    grad_query = torch.cat([(sum_in_fp32(*parts) if len(parts) == 2 else parts[0]).permute(2, 0, 1, 3)
                            for parts in grad_queries])
    return grad_query.to(query.dtype), grad_own


class _CausalChunksAttention(torch.autograd.Function):
    """Causal attention of this rank's two query chunks against the whole sequence's keys; see the module doc."""

    @staticmethod
    def forward(ctx, query, key, value, group, scale):
        key_value = torch.stack([key, value], dim=2)  # one buffer: one pair of collectives for both
        out, (kernel, outs, lses, states) = causal_chunks_forward(query, key_value, GroupExchange(group),
                                                                  group.rank(), group.size(), scale)
        ctx.save_for_backward(query, key_value, *outs, *lses)
        ctx.group, ctx.scale, ctx.kernel, ctx.states = group, scale, kernel, states
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key_value, out0, out1, lse0, lse1 = ctx.saved_tensors
        group = ctx.group
        grad_query, grad_own = causal_chunks_backward(grad_out, query, key_value, GroupExchange(group), group.rank(),
                                                      group.size(), ctx.scale,
                                                      (ctx.kernel, [out0, out1], [lse0, lse1], ctx.states))
        return grad_query, grad_own[:, :, 0].to(key_value.dtype), grad_own[:, :, 1].to(key_value.dtype), None, None


def context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               forbidden: torch.Tensor | None, group, scale: float) -> torch.Tensor:
    """This CP rank's attention output [2c, b, heads * d] for its queries [2c, b, heads, d] and keys/values
    [2c, b, groups, d] (chunks as `chunk_ids`). forbidden: None for causal attention, else the block mask's rows
    of this rank's queries [b, 1, 2c, s], True where attention is forbidden (packed samples)."""
    if forbidden is None:
        return _CausalChunksAttention.apply(query, key, value, group, scale)
    q = _bhsd(query)
    # K/V heads repeated for the query heads: SDPA's kernels that take a mask take no GQA (the math one would
    # hold [b, heads, 2c, s] fp32 scores); K/V are small beside the mask.
    full_key, full_value = (_bhsd(_GatherSequence.apply(t, group)).repeat_interleave(q.shape[1] // t.shape[2], dim=1)
                            for t in (key, value))
    with sdpa_kernel(BACKEND_PRIORITY, set_priority=True):
        context = F.scaled_dot_product_attention(q, full_key, full_value, attn_mask=~forbidden, scale=scale)
    return context.permute(2, 0, 1, 3).reshape(context.shape[2], context.shape[0], -1)


def packed_attention_mask_rows(segment_ids: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """The rows of the packed samples' block mask ([b, 1, s, s], True where attention is forbidden: later
    tokens and other samples) that belong to this CP rank's queries: [b, 1, 2s/2CP, s]. Built for these rows
    only (the whole mask is s x s: 1 GiB per sample at 32k)."""
    seq = segment_ids.shape[-1]
    chunk_len = seq // (2 * cp_size)
    positions = torch.arange(seq, device=segment_ids.device)
    rows = torch.cat([positions[c * chunk_len:(c + 1) * chunk_len] for c in chunk_ids(cp_rank, cp_size)])
    allowed = (positions[None, :] <= rows[:, None])[None] & (segment_ids[:, rows, None] == segment_ids[:, None, :])
    return ~allowed[:, None]
