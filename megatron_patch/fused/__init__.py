"""Faster paths for what megatron-core runs without Transformer Engine or Apex: RMSNorm, RoPE and a linear +
cross-entropy that never holds the full fp32 logits (each one torch.compile'd Triton function on the GPU, the
same Python eagerly on the CPU, which is what the parity tests check against megatron-core's plain modules),
weight-gradient GEMMs into the fp32 main_grad, a multi-tensor optimizer step, and (with or without TE) a
one-kernel SwiGLU backward."""


def configure(args) -> None:
    """After parsing Megatron's arguments, before its config is built (the entrypoint and the convertor)."""
    from megatron_patch.fused import grad_accumulation, optimizer_step, rope, swiglu

    rope.configure(args)
    grad_accumulation.configure(args)
    optimizer_step.configure(args)
    swiglu.configure(args)
