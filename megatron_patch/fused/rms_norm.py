"""RMSNorm as one fused kernel (forward and backward), with sequence-parallel support.

Same arithmetic as Qwen2's RMSNorm in transformers: normalise in fp32, cast back, scale by the weight. It holds a
single parameter named `weight`, like torch.nn.RMSNorm, so the local spec's key mapping onto TE's
`layer_norm_weight` keeps checkpoints interchangeable with the TE spec.
"""

from __future__ import annotations

import torch

from megatron_patch.fused.compile import compiled_on_cuda


@compiled_on_cuda
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class FusedRMSNorm(torch.nn.Module):
    """Drop-in for the local spec's norm (WrappedTorchNorm's constructor arguments)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"FusedRMSNorm is an RMSNorm; the config asks for {config.normalization}")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism each rank sees part of the sequence: Megatron all-reduces the grads
        # of parameters marked so.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
