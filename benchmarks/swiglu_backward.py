"""SwiGLU backward at Qwen2.5 MLP shapes: megatron-core's torch.compile'd `swiglu_back` against our Triton kernel
(megatron_patch/fused/swiglu.py). Bandwidth counts the bytes each must move at least: read y [tokens, 2n] and the
incoming gradient [tokens, n], write the input gradient [tokens, 2n].

    python -m benchmarks.swiglu_backward [--sizes 0.5B 1.5B 7B] [--tokens 16384]
"""

from __future__ import annotations

import argparse

import torch


from benchmarks.cuda_timing import time_ms

from megatron_patch.fused.swiglu import swiglu_backward
from megatron_patch.model_sizes import get_size


def main() -> None:
    from megatron.core.fusions.fused_bias_swiglu import swiglu_back

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B", "7B"])
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for size_name in args.sizes:
        n = get_size(size_name).ffn_hidden_size
        y = torch.randn(args.tokens, 2 * n, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        moved = 5 * args.tokens * n * 2  # bytes
        difference = (swiglu_backward(grad, y).float() - swiglu_back(grad, y).float()).abs().max().item()
        for name, fn in (("megatron-core swiglu_back (compiled)", lambda: swiglu_back(grad, y)),
                         ("megatron_patch Triton kernel", lambda: swiglu_backward(grad, y))):
            ms = time_ms(fn, reps=20)
            print(f"{size_name:5s} tokens {args.tokens} n {n:6d}  {name:38s} {ms:7.3f} ms  "
                  f"{moved / ms / 1e9:6.2f} TB/s", flush=True)
        print(f"{size_name:5s} max |difference| between the two: {difference:.3g}", flush=True)


if __name__ == "__main__":
    main()
