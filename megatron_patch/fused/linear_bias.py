"""A linear layer's bias added inside its GEMM (cuBLASLt's bias epilogue, through torch.addmm).

megatron-core's LinearWithGradAccumulationAndAsyncCommunication computes `torch.matmul(input, weight.t())` and
then `output + bias`: one more read and write of the whole output. In Qwen2.5 only the QKV projection has a bias;
on an H200 at 1.5B (65,536 tokens a step) the add took 9.9 ms of the 1.155 s step. torch.addmm with a 1-D bias
hands the bias to cuBLASLt, which adds it while the GEMM writes its output.

Only the forward changes, and only where nothing else happens in it: a bias, no sequence-parallel all-gather
and no GTP weight gather (megatron-core's own forward runs otherwise). The backward is megatron-core's.
"""

from __future__ import annotations

import torch

_megatron_forward = None


def _forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
             grad_output_buffer, wgrad_deferral_limit, tp_group, gtp_remat_size):
    if bias is None or sequence_parallel or gtp_remat_size > 1 or input.dim() < 2:
        return _megatron_forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                 sequence_parallel, grad_output_buffer, wgrad_deferral_limit, tp_group,
                                 gtp_remat_size)
    # The context megatron-core's forward leaves for its backward (tests/unit compares the two).
    ctx.save_for_backward(input, weight)
    ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") else None
    ctx.use_bias = True
    ctx.gradient_accumulation_fusion = gradient_accumulation_fusion
    ctx.allreduce_dgrad = allreduce_dgrad
    ctx.sequence_parallel = sequence_parallel
    ctx.wgrad_deferral_limit = wgrad_deferral_limit
    ctx.grad_output_buffer = grad_output_buffer
    ctx.tp_group = tp_group
    ctx.gtp_remat_size = gtp_remat_size
    output = torch.addmm(bias, input.reshape(-1, input.shape[-1]), weight.t())
    return output.view(*input.shape[:-1], output.shape[-1])


def install() -> None:
    """Route megatron-core's linear forward through _forward (once)."""
    global _megatron_forward
    from megatron.core.tensor_parallel import layers

    linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    if _megatron_forward is None:
        _megatron_forward = linear.forward
        # custom_fwd records the autocast state that megatron-core's custom_bwd backward reads back
        linear.forward = staticmethod(layers.custom_fwd(_forward))
