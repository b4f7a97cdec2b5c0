"""Output layer + cross-entropy in token chunks, without ever holding the [tokens, vocab] fp32 logits.

For Qwen2.5 the vocabulary is 151,936: at micro-batch 8 x 2048 tokens the plain path keeps bf16 logits (5 GB),
their fp32 copy and its softmax (10 GB each) alive until the backward pass. Here the forward pass computes, chunk by
chunk, the logits (a bf16 GEMM), the loss and already the gradients for the hidden states and the output weight
(the softmax minus the one-hot target, scaled by the loss mask); only those gradients (the size of the hidden
states and of the weight) wait for the backward pass, which scales them by the incoming gradient.

The numerics are the plain path's on a GPU: bf16 logits from the GEMM, log-softmax in fp32, bf16 gradient of the
logits. On a CPU everything is fp32 (see the forward pass).
Tensor parallelism: the weight is split along the vocabulary (megatron's ColumnParallelLinear); max/sum/target
are all-reduced across the tensor-parallel group, the input goes through the same copy/gather region as the
output layer's, so its backward all-reduces (or reduce-scatters) the hidden-state gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_patch.fused.compile import compiled_on_cuda
from megatron_patch.fused.grad_accumulation import out_dtype_addmm_available, wgrad_gemm_accum_fp32

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: the eager maths below
    triton = None

# Tokens per chunk are chosen so one chunk's logits take about this many bytes (the fp32 softmax never exists
# on the GPU: the kernels read the bf16 logits).
CHUNK_LOGIT_BYTES = 1 << 30
VOCAB_BLOCK = 4096

if triton is not None:
    @triton.jit
    def _logsumexp_kernel(logits_ptr, lse_ptr, vocab: tl.constexpr, BLOCK: tl.constexpr):
        """One row per program, one pass: the running maximum rescales the running sum (online softmax)."""
        row_start = logits_ptr + tl.program_id(0).to(tl.int64) * vocab
        row_max = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        row_sum = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_start + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            row_max = new_max
        tl.store(lse_ptr + tl.program_id(0), row_max + tl.log(row_sum))

    @triton.jit
    def _logit_grad_kernel(logits_ptr, lse_ptr, target_ptr, in_shard_ptr, weight_ptr, vocab: tl.constexpr,
                           BLOCK: tl.constexpr):
        """(softmax - onehot(target)) * weight over one column block of one row, written over the logits."""
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        at = logits_ptr + row.to(tl.int64) * vocab + cols
        inside = cols < vocab
        x = tl.load(at, mask=inside).to(tl.float32)
        softmax = tl.exp(x - tl.load(lse_ptr + row))
        onehot = (cols == tl.load(target_ptr + row)) & (tl.load(in_shard_ptr + row) != 0)
        grad = (softmax - onehot.to(tl.float32)) * tl.load(weight_ptr + row)
        tl.store(at, grad.to(logits_ptr.dtype.element_ty), mask=inside)


def _kernels_apply(logits: torch.Tensor) -> bool:
    return triton is not None and logits.is_cuda


def local_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logsumexp of each row of [tokens, vocab_shard] logits. On CUDA one Triton pass over the bf16 logits
    (inductor's reduction read them twice, at 3.3 TB/s on an H200)."""
    if not _kernels_apply(logits):
        return torch.logsumexp(logits.float(), dim=-1)
    return _logsumexp_triton(logits)


def _logsumexp_triton(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.contiguous()
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _logsumexp_kernel[(logits.shape[0],)](logits, lse, logits.shape[1], BLOCK=VOCAB_BLOCK, num_warps=8)
    return lse


@compiled_on_cuda
def _target_logit(logits: torch.Tensor, local_target: torch.Tensor, in_shard: torch.Tensor) -> torch.Tensor:
    picked = logits.gather(1, local_target.unsqueeze(1)).squeeze(1).float()
    return torch.where(in_shard, picked, torch.zeros_like(picked))


def logit_grad(logits: torch.Tensor, logsumexp: torch.Tensor, local_target: torch.Tensor, in_shard: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
    """(softmax - onehot(target)) * weight per token, in the logits' dtype. The logits are spent: on CUDA a Triton
    kernel writes the gradient over them (one 1 GiB buffer less per chunk); elsewhere it is a new tensor."""
    if not _kernels_apply(logits):
        softmax = torch.exp(logits.float() - logsumexp.unsqueeze(1))
        columns = torch.arange(logits.shape[1], device=logits.device)
        onehot = (columns.unsqueeze(0) == local_target.unsqueeze(1)) & in_shard.unsqueeze(1)
        return ((softmax - onehot.float()) * weight.unsqueeze(1)).to(logits.dtype)
    return _logit_grad_triton_(logits, logsumexp, local_target, in_shard, weight)


def _logit_grad_triton_(logits, logsumexp, local_target, in_shard, weight):
    if not logits.is_contiguous():
        raise ValueError("the logit-gradient kernel writes over the logits: they must be contiguous [tokens, vocab]")
    rows, vocab = logits.shape
    if rows:
        _logit_grad_kernel[(rows, triton.cdiv(vocab, VOCAB_BLOCK))](
            logits, logsumexp.float().contiguous(), local_target.contiguous(), in_shard.contiguous(),
            weight.float().contiguous(), vocab, BLOCK=VOCAB_BLOCK, num_warps=8)
    return logits


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _chunk_logsumexp_and_loss(logits, target, inside, token_weight, tp_group):
    """The chunk's logsumexp over the whole vocabulary (all shards) and its weighted loss sum."""
    lse_local = local_logsumexp(logits)
    # logsumexp across the vocabulary shards: max, then the sum of the shards' exp(lse - max).
    lse_max = _all_reduce(lse_local.clone(), dist.ReduceOp.MAX, tp_group)
    lse = lse_max + torch.log(_all_reduce(torch.exp(lse_local - lse_max), dist.ReduceOp.SUM, tp_group))
    target_logit = _all_reduce(_target_logit(logits, target, inside), dist.ReduceOp.SUM, tp_group)
    return lse, ((lse - target_logit) * token_weight).sum()


def _chunk_loss_and_grad_kernels(logits, target, inside, token_weight, tp_group):
    """The chunk's weighted loss sum and the bf16 gradient of its logits (written over them), through the kernels
    above: on CUDA they read the bf16 logits and never write an fp32 copy."""
    lse, loss = _chunk_logsumexp_and_loss(logits, target, inside, token_weight, tp_group)
    return loss, logit_grad(logits, lse, target, inside, token_weight)


def _chunk_loss_and_grad_in_place(logits, target, inside, token_weight, tp_group):
    """The same maths in eager mode, for the CPU: one fp32 copy of the logits becomes the gradient in place. The
    CPU allocator caches nothing, so each [tokens, vocab] temporary of the eager kernels above costs page faults
    (3.6x slower per micro-batch at the tiny test model's real vocabulary)."""
    probs = logits.float()
    rows = torch.arange(probs.shape[0], device=probs.device)
    target_logit = _all_reduce(torch.where(inside, probs[rows, target], 0.0), dist.ReduceOp.SUM, tp_group)
    row_max = _all_reduce(probs.amax(dim=1), dist.ReduceOp.MAX, tp_group)
    probs.sub_(row_max.unsqueeze(1)).exp_()
    row_sum = _all_reduce(probs.sum(dim=1), dist.ReduceOp.SUM, tp_group)
    loss = ((row_max + row_sum.log() - target_logit) * token_weight).sum()
    probs.mul_((token_weight / row_sum).unsqueeze(1))  # softmax * weight
    probs[rows[inside], target[inside]] -= token_weight[inside]  # - onehot * weight
    return loss, probs.to(logits.dtype)


_CPU_LOGITS: dict[tuple[int, int], torch.Tensor] = {}


def _cpu_logits_buffer(rows: int, vocab: int) -> torch.Tensor:
    """An fp32 [rows, vocab] buffer kept between calls (the CPU allocator returns large blocks to the system, and
    faulting 78 MB of fresh pages in costs as much as the softmax over them). One size is kept: a run's chunks
    have one shape but the last."""
    buffer = _CPU_LOGITS.get((rows, vocab))
    if buffer is None:
        _CPU_LOGITS.clear()
        buffer = _CPU_LOGITS[(rows, vocab)] = torch.empty(rows, vocab, dtype=torch.float32)
    return buffer


def _chunk_maths(device: torch.device):
    return _chunk_loss_and_grad_kernels if device.type == "cuda" else _chunk_loss_and_grad_in_place


def _labels_in_shard(labels, shard: int, tp_group):
    """(label index within this rank's vocabulary shard, or 0; whether the label is in the shard)."""
    tp_rank = dist.get_rank(tp_group) if tp_group is not None and dist.get_world_size(tp_group) > 1 else 0
    local_labels = labels - tp_rank * shard
    in_shard = (local_labels >= 0) & (local_labels < shard)
    return torch.where(in_shard, local_labels, torch.zeros_like(local_labels)), in_shard


def _gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """The output weight the logit GEMMs take. On a CPU every GEMM and the softmax run in fp32 over one reused
    logits buffer: a CPU without 16-bit arithmetic (AVX2 only) runs 16-bit GEMMs 6-50x slower, rounding the logits
    and their gradient to 16 bits and back costs four passes over [tokens, vocab], and a fresh buffer of that size
    costs page faults."""
    return weight if weight.is_cuda else weight.float()


def _chunk_logits(h: torch.Tensor, gemm_weight: torch.Tensor) -> torch.Tensor:
    """h @ W.T for one chunk (h already in gemm_weight's dtype); on a CPU into the reused fp32 buffer."""
    if h.is_cuda:
        return h @ gemm_weight.t()
    return torch.mm(h, gemm_weight.t(), out=_cpu_logits_buffer(h.shape[0], gemm_weight.shape[0]))


def _loss_without_gradients(hidden, weight, labels, token_weight, tp_group, chunk_tokens):
    """The loss alone (evaluation, or no_grad): one GEMM per chunk instead of three, no logit gradients."""
    local_labels, in_shard = _labels_in_shard(labels, weight.shape[0], tp_group)
    gemm_weight = _gemm_weight(weight)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = min(start + chunk_tokens, hidden.shape[0])
        logits = _chunk_logits(hidden[start:end].to(gemm_weight.dtype), gemm_weight)
        loss_sum += _chunk_logsumexp_and_loss(logits, local_labels[start:end], in_shard[start:end],
                                              token_weight[start:end], tp_group)[1]
    return loss_sum


def _add_weight_gradient(grad_weight, grad_logits, h, one_chunk: bool, accumulate_in_gemm: bool):
    """The chunk's output-layer weight gradient, added to the sum (the sum itself when it is the only chunk)."""
    if not h.is_cuda:  # fp32 GEMMs (see _gemm_weight); the fp32 sum is the gradient
        product = grad_logits.t() @ h
        return product if one_chunk else grad_weight.add_(product)
    if one_chunk:  # nothing to sum: the GEMM's output is the gradient, rounded once as in the fp32 sum
        return grad_logits.t() @ h
    if accumulate_in_gemm:
        wgrad_gemm_accum_fp32(h, grad_logits, grad_weight)
    else:
        grad_weight += (grad_logits.t() @ h).float()
    return grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weight, tp_group, chunk_tokens):
        shard = weight.shape[0]
        local_labels, in_shard = _labels_in_shard(labels, shard, tp_group)

        tokens = hidden.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        one_chunk = tokens <= chunk_tokens
        # A frozen output layer (LoRA) takes no weight gradient: neither its GEMMs nor the fp32 sum.
        wants_weight = ctx.needs_input_grad[1]
        grad_weight = None if one_chunk or not wants_weight else \
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # On CUDA the GEMM adds each chunk's bf16 product straight into the fp32 sum (beta = 1): no bf16
        # product, fp32 copy and separate add per chunk (about 60 GB of memory traffic per 1.5B step).
        accumulate_in_gemm = hidden.is_cuda and out_dtype_addmm_available()
        gemm_weight = _gemm_weight(weight)
        chunk_maths = _chunk_maths(hidden.device)
        for start in range(0, tokens, chunk_tokens):
            end = min(start + chunk_tokens, tokens)
            h, target, inside, w = hidden[start:end], local_labels[start:end], in_shard[start:end], token_weight[start:end]
            h = h.to(gemm_weight.dtype)
            chunk_loss, grad_logits = chunk_maths(_chunk_logits(h, gemm_weight), target, inside, w, tp_group)
            loss_sum += chunk_loss
            if hidden.is_cuda:
                torch.matmul(grad_logits, weight, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = grad_logits @ gemm_weight
            if wants_weight:
                grad_weight = _add_weight_gradient(grad_weight, grad_logits, h, one_chunk, accumulate_in_gemm)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if wants_weight else None)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), \
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype), None, None, None, None


def chunk_tokens_for(vocab_shard: int, dtype_bytes: int) -> int:
    return max(64, CHUNK_LOGIT_BYTES // (vocab_shard * dtype_bytes))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, token_weight: torch.Tensor,
                         tp_group=None, chunk_tokens: int | None = None) -> torch.Tensor:
    """sum over tokens of token_weight * cross_entropy(hidden @ weight.T, labels).

    hidden [tokens, h] (the full tokens of this rank), weight [vocab_shard, h], labels and token_weight [tokens].
    """
    if chunk_tokens is None:
        chunk_tokens = chunk_tokens_for(weight.shape[0], hidden.element_size())
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # The forward pass below computes the gradients too, which nothing would read.
        return _loss_without_gradients(hidden, weight, labels, token_weight.to(torch.float32), tp_group,
                                       chunk_tokens)
    return _LinearCrossEntropy.apply(hidden, weight, labels, token_weight.to(torch.float32), tp_group, chunk_tokens)


def output_processor(*, hidden_states, output_layer, output_weight, labels, loss_mask, **_unused):
    """GPTModel's `output_processor` hook: returns the loss-mask-weighted sum of token losses (a scalar)
    instead of logits. hidden_states [s, b, h]; labels and loss_mask [b, s]."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if labels is None or loss_mask is None:
        raise ValueError("the fused linear + cross-entropy needs labels and a loss mask")
    weight = output_layer.weight if output_weight is None else output_weight
    group = output_layer.tp_group
    if output_layer.sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(hidden_states, group=group)
    else:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=group)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    # [b, s] -> [s, b], the order of the hidden states.
    return linear_cross_entropy(hidden, weight, labels.t().reshape(-1), loss_mask.t().reshape(-1), group)
