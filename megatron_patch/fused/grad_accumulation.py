"""Weight-gradient GEMMs that accumulate straight into Megatron's fp32 `main_grad`, in place of Apex's
`fused_weight_gradient_mlp_cuda` (megatron-core's --gradient-accumulation-fusion).

Without it every linear layer's backward writes a bf16 weight gradient and Megatron's grad hook then adds it to
the fp32 `main_grad`: one extra read and write of every weight per micro-batch (about 5% of a 0.5B step on an
H100). cuBLAS can accumulate a bf16 x bf16 product into an fp32 output directly (beta = 1); torch exposes it as
`torch.addmm(..., out_dtype=torch.float32)` on CUDA, which is all Apex's extension does.
"""

from __future__ import annotations

import importlib.util
import sys

import torch


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad[out, in] += grad_output[tokens, out]^T @ total_input[tokens, in], accumulated in fp32."""
    if total_input.dtype == torch.float32:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for a bf16/fp16 `main_grad` (--grad-reduce-in-bf16)."""
    main_grad.addmm_(grad_output.t(), total_input)


def apex_available() -> bool:
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def out_dtype_addmm_available() -> bool:
    """torch's addmm takes out_dtype (2.8 and later): a bf16 GEMM accumulating into an fp32 output."""
    return "dtype_out" in torch.ops.aten.addmm.overloads()


def supported_here() -> bool:
    """A CUDA device and a torch whose addmm takes out_dtype (2.8 and later). Asked of torch, not of the GPU:
    this runs before Megatron picks each rank's device, so touching CUDA here would open every rank's context
    on GPU 0."""
    return torch.cuda.is_available() and out_dtype_addmm_available()


def install() -> None:
    """Make megatron-core's --gradient-accumulation-fusion call these GEMMs (where Apex is missing)."""
    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = sys.modules[__name__]
    layers._grad_accum_fusion_available = True
