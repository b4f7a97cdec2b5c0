"""Fused kernels for the local (non-Transformer-Engine) spec: RMSNorm, RoPE and a linear + cross-entropy that
never holds the full fp32 logits. On the GPU each is one torch.compile'd (Triton) function; on the CPU the same
Python runs eagerly, which is what the parity tests check against megatron-core's plain modules."""


def configure(args) -> None:
    """After parsing Megatron's arguments, before its config is built (the entrypoint and the convertor)."""
    from megatron_patch.fused import grad_accumulation, rope

    rope.configure(args)
    grad_accumulation.configure(args)
