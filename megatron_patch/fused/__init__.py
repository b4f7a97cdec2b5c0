"""Faster paths for what megatron-core runs without Transformer Engine or Apex: RMSNorm, RoPE and a linear +
cross-entropy that never holds the full fp32 logits (each one torch.compile'd Triton function on the GPU, the
same Python eagerly on the CPU, which is what the parity tests check against megatron-core's plain modules),
weight-gradient GEMMs into the fp32 main_grad, a multi-tensor optimizer step, and (with or without TE) a
one-kernel SwiGLU backward. Where each goes into megatron-core is an entry of megatron_patch.patches' manifest
(kind "fused": none of them under --plain-kernels)."""
