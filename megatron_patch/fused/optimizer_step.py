"""The optimizer step when neither Apex nor Transformer Engine is installed.

megatron-core then falls back to per-tensor Python: the gradient norm (`local_multi_tensor_l2_norm`) gathers
every parameter's norm into a host list, one device-to-host sync per parameter (about 290 at 0.5B), and
clipping and main-to-model copies scale one tensor at a time; Adam is torch's multi-kernel foreach AdamW. Here
the norm and the scaling are a few `torch._foreach_*` kernels with one sync for the total (Megatron's own
`.item()`), and Adam is torch's single-kernel fused AdamW (CUDA, and CPU since torch 2.4).
"""

from __future__ import annotations

import torch


def multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm (per_tensor=False): the l2 norm of all tensors together, [1] fp32."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for amp_C.multi_tensor_scale: dst = src * scale (in place when they are the same tensors)."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, src if scale == 1.0 else torch._foreach_mul(src, scale))


# Views of at most this many elements: an elementwise kernel over more than 2^31 elements needs 64-bit indexing,
# which torch gives up vectorized loads for.
_SCALE_VIEW_ELEMENTS = 1 << 30


def scale_gradient_buffer(buffer, scaling_factor) -> None:
    """_ParamAndGradBuffer.scale_gradients (the per-token loss's 1 / tokens, once a step) as one foreach kernel.
    megatron-core's `grad_data *= factor` with the factor a device tensor runs torch's unvectorized broadcast
    kernel, split four ways over a 1.5B model's 1.54e9-element buffer: 4.6 ms on an H200 where one pass at
    bandwidth takes about 2.7."""
    views = list(buffer.grad_data.view(-1).split(_SCALE_VIEW_ELEMENTS)) + list(buffer.extra_main_grads)
    torch._foreach_mul_(views, scaling_factor)


def install_gradient_scaling() -> None:
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    _ParamAndGradBuffer.scale_gradients = scale_gradient_buffer


def fused_adam(params, adam_w_mode: bool = True, **kwargs):
    """What megatron-core calls as Apex's/TE's FusedAdam: torch's AdamW (decoupled weight decay) or Adam."""
    adam_class = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    return adam_class(params, fused=True, **kwargs)


def megatron_falls_back_to_per_tensor_maths() -> bool:
    """Neither Apex nor TE filled megatron-core's multi-tensor slots."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    return clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm


def install_multi_tensor_maths() -> None:
    """The gradient norm and the scaling (clipping, main-to-model copies) as foreach kernels."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as base_optimizer

    clip_grads.l2_norm_impl = multi_tensor_l2_norm
    for module in (clip_grads, base_optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = multi_tensor_scale


def megatron_builds_torch_adam(args) -> bool:
    """megatron-core would build torch's foreach Adam(W). Optimizer offload and the precision-aware optimizer
    need TE's FusedAdam, so Adam is left to megatron-core there."""
    from megatron.core import optimizer

    needs_te_adam = getattr(args, "optimizer_cpu_offload", False) or getattr(
        args, "use_precision_aware_optimizer", False)
    return optimizer.USING_PYTORCH_OPTIMIZER and args.optimizer == "adam" and not needs_te_adam


def install_fused_adam() -> None:
    """megatron-core builds torch's foreach AdamW when USING_PYTORCH_OPTIMIZER is set; otherwise it calls `Adam`
    with Apex's signature (adam_w_mode), which fused_adam takes."""
    from megatron.core import optimizer

    optimizer.USING_PYTORCH_OPTIMIZER = False
    optimizer.Adam = fused_adam
