"""The QKV projection's epilogue at Qwen2.5 shapes, forward + backward, GPU time per call:

- split + RoPE: megatron-core's split path (torch.split, q reshaped across the groups, our compiled RoPE on q and
  k, the gradients concatenated back by autograd) against the one-kernel split + RoPE
  (megatron_patch/fused/rope.py, megatron-core's --fused-single-qkv-rope slot), with the kernel's rows per program and warps swept;
- the bias: `matmul` then `+ bias` (megatron-core's linear) against `addmm` (cuBLASLt's bias epilogue), forward.

Each row gives the GPU time per call (CUDA events around the calls, launch gaps included when the host is the
slower side) and the kernel time (torch.profiler's sum over the kernels: what a CUDA-graphed step pays).
Bandwidth counts what the split + RoPE must move at least, over the kernel time: read the projection output and
write q, k, v forward; the same backward.

    python -m benchmarks.qkv_projection [--sizes 0.5B 1.5B 7B] [--seq-len 2048] [--batch 16]
"""

from __future__ import annotations

import argparse

import torch


from benchmarks.cuda_timing import kernel_ms, time_ms

from megatron_patch.fused import rope
from megatron_patch.model_sizes import get_size


def _forward_backward(fn, mixed, freqs, sizes, upstream):
    def step():
        q, k, v = fn(mixed, freqs, freqs, sizes)
        torch.autograd.backward((q, k, v), upstream)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B", "7B"])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    seq, batch = args.seq_len, args.batch
    for size_name in args.sizes:
        size = get_size(size_name)
        head_dim = size.head_dim
        groups, q_per_group = size.num_query_groups, size.num_attention_heads // size.num_query_groups
        width = (q_per_group + 2) * head_dim
        mixed = torch.randn(seq, batch, groups, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        inv_freq = 1.0 / (size.rope_theta ** (torch.arange(0, head_dim, 2, device="cuda") / head_dim))
        angles = torch.outer(torch.arange(seq, device="cuda", dtype=torch.float32), inv_freq)
        freqs = torch.cat((angles, angles), -1)[:, None, None, :]
        sizes = [q_per_group * head_dim, head_dim, head_dim]
        upstream = [torch.randn(seq, batch, n, head_dim, device="cuda", dtype=torch.bfloat16)
                    for n in (groups * q_per_group, groups, groups)]
        moved = 2 * 2 * mixed.numel() * 2  # bytes: read + write, forward and backward
        split = rope.split_qkv_unfused(mixed, freqs, freqs, sizes)
        fused = rope.fused_qkv_split_rope(mixed, freqs, freqs, sizes)
        difference = max((a.float() - b.float()).abs().max().item() for a, b in zip(split, fused))
        print(f"{size_name}: [{seq}, {batch}, {groups}, {width}] bf16; largest q/k/v difference {difference:.3g}")
        def report(name, fn):
            step = _forward_backward(fn, mixed, freqs, sizes, upstream)
            gpu, kernels = time_ms(step, reps=20), kernel_ms(step, reps=20)
            print(f"  {name:42s} {gpu:7.3f} ms, kernels {kernels:7.3f} ms  {moved / kernels / 1e9:6.2f} TB/s")

        report("split path + compiled RoPE", rope.split_qkv_unfused)
        chosen = rope.ROWS, rope.NUM_WARPS
        for rows in (16, 32, 64):
            for warps in (2, 4, 8):
                rope.ROWS, rope.NUM_WARPS = rows, warps
                report(f"one kernel each way, {rows} rows x {warps} warps", rope.fused_qkv_split_rope)
        rope.ROWS, rope.NUM_WARPS = chosen
        x = torch.randn(seq * batch, size.hidden_size, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(groups * width, size.hidden_size, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(groups * width, device="cuda", dtype=torch.bfloat16)
        add = time_ms(lambda: torch.matmul(x, weight.t()) + bias, reps=20)
        addmm = time_ms(lambda: torch.addmm(bias, x, weight.t()), reps=20)
        gemm = time_ms(lambda: torch.matmul(x, weight.t()), reps=20)
        print(f"  QKV GEMM alone {gemm:.3f} ms; + bias add {add:.3f} ms; addmm {addmm:.3f} ms")


if __name__ == "__main__":
    main()
