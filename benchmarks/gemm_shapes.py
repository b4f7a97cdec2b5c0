"""A training step's GEMMs at a Qwen2.5 size, each timed the ways cuBLAS can be asked for it.

For every linear layer (QKV, attention output, MLP in and out, the output layer in its loss chunks): forward
(x @ W^T), input gradient (g @ W) and weight gradient (main_grad += g^T @ x, bf16 into fp32, as
megatron_patch/fused/grad_accumulation.py does it), in bf16 with tokens = micro-batch x sequence. Ways:

- `default`: as the step calls it (torch picks cuBLASLt on Hopper);
- `cublas`: torch.backends.cuda.preferred_blas_library("cublas");
- `swapped`: the transposed problem into a transposed view of the same output (C^T = B^T A^T), which makes
  cuBLAS pick its kernel for the other operand order.

Prints TFLOP/s per GEMM and way (with the kernel cuBLAS ran as called), and the step's GEMM milliseconds if
every GEMM took its best way. A step runs its GEMMs back to back for about a second; `--reps 300` does the same
per GEMM, to see whether a sustained load (clocks under the power limit) runs them slower than a short burst.

    python -m benchmarks.gemm_shapes [--size 1.5B] [--seq-len 2048] [--micro-batch 16]
"""

from __future__ import annotations

import argparse

import torch


from benchmarks.cuda_timing import kernel_ms_and_names

from megatron_patch.fused.linear_cross_entropy import chunk_tokens_for
from megatron_patch.model_sizes import get_size


def linears(size, tokens: int) -> list[tuple[str, int, int, int, int]]:
    """(name, tokens, in, out, calls per micro-batch) for each of the step's linear layers."""
    q_out = size.num_attention_heads * size.head_dim
    qkv_out = q_out + 2 * size.num_query_groups * size.head_dim
    chunk = min(tokens, chunk_tokens_for(size.vocab_size, 2))
    layers = size.num_layers
    return [("qkv", tokens, size.hidden_size, qkv_out, layers), ("attn out", tokens, q_out, size.hidden_size, layers),
            ("mlp in", tokens, size.hidden_size, 2 * size.ffn_hidden_size, layers),
            ("mlp out", tokens, size.ffn_hidden_size, size.hidden_size, layers),
            ("output", chunk, size.hidden_size, size.vocab_size, -(-tokens // chunk))]


def with_cublas(fn):
    """fn with torch asked for cuBLAS instead of cuBLASLt (the bf16-into-fp32 weight gradient has no such
    choice: only cuBLASLt takes out_dtype)."""
    def call():
        torch.backends.cuda.preferred_blas_library("cublas")
        try:
            fn()
        finally:
            torch.backends.cuda.preferred_blas_library("default")
    return call


def gemm_calls(tokens: int, n_in: int, n_out: int):
    """{pass: {way: callable}} for one linear layer."""
    dev = "cuda"
    x = torch.randn(tokens, n_in, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16)
    g = torch.randn(tokens, n_out, device=dev, dtype=torch.bfloat16)
    y = torch.empty(tokens, n_out, device=dev, dtype=torch.bfloat16)
    dx = torch.empty(tokens, n_in, device=dev, dtype=torch.bfloat16)
    main = torch.zeros(n_out, n_in, device=dev, dtype=torch.float32)
    main_t = torch.zeros(n_in, n_out, device=dev, dtype=torch.float32).t()  # [out, in], column-major
    forward, input_grad = lambda: torch.mm(x, w.t(), out=y), lambda: torch.mm(g, w, out=dx)
    return {
        "forward": {"default": forward, "cublas": with_cublas(forward),
                    "swapped": lambda: torch.mm(w, x.t(), out=y.t())},
        "input grad": {"default": input_grad, "cublas": with_cublas(input_grad),
                       "swapped": lambda: torch.mm(w.t(), g.t(), out=dx.t())},
        "weight grad": {"default": lambda: torch.addmm(main, g.t(), x, out_dtype=torch.float32, out=main),
                        "swapped": lambda: torch.addmm(main_t.t(), x.t(), g, out_dtype=torch.float32,
                                                       out=main_t.t())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.5B")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    size = get_size(args.size)
    tokens = args.seq_len * args.micro_batch
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.size}, {tokens} tokens per "
          f"micro-batch", flush=True)
    default_ms = best_ms = 0.0
    for name, rows, n_in, n_out, calls in linears(size, tokens):
        tflop = 2 * rows * n_in * n_out / 1e12
        for gemm_pass, ways in gemm_calls(rows, n_in, n_out).items():
            timed, kernels = {}, {}
            for way, fn in ways.items():
                timed[way], kernels[way] = kernel_ms_and_names(fn, args.reps)
            kernel = kernels["default"][0] if kernels["default"] else ""
            default_ms += timed["default"] * calls
            best_ms += min(timed.values()) * calls
            cells = "  ".join(f"{way} {tflop / ms * 1e3:6.1f}" for way, ms in timed.items())
            print(f"{name:9s} {gemm_pass:12s} [{rows} x {n_in}] x [{n_in} x {n_out}] x{calls}: TFLOP/s {cells}  "
                  f"({kernel[:60]})", flush=True)
    print(f"GEMM ms per micro-batch: as called {default_ms:.1f}, each at its best way {best_ms:.1f}")


if __name__ == "__main__":
    main()
