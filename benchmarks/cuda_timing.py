"""What the kernel benchmarks share: GPU time of a callable, and the sweep over Qwen2.5 sizes and sequence
lengths."""

from __future__ import annotations

import argparse
import time

import torch

from megatron_patch.model_sizes import get_size


def gpu_and_host_ms(fn, reps: int, warmup: int = 3) -> tuple[float, float]:
    """Mean milliseconds per call of `fn` over `reps` calls after `warmup`: GPU time (CUDA events) and host
    (launch) time, the loop's wall time before the GPU is waited for. At small micro-batches a step is bound by
    the host time, not by the kernels."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    host_start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = time.perf_counter() - host_start
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, host * 1e3 / reps


def time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Mean GPU milliseconds per call (see gpu_and_host_ms)."""
    return gpu_and_host_ms(fn, reps, warmup)[0]


def kernel_ms(fn, reps: int, warmup: int = 3) -> float:
    """Mean milliseconds of GPU kernel time per call of `fn` (torch.profiler's sum over the kernels it ran):
    what a CUDA-graphed training step pays for it, without the launch gaps that time_ms counts when the host is
    slower than the kernels."""
    return kernel_ms_and_names(fn, reps, warmup)[0]


def kernel_ms_and_names(fn, reps: int, warmup: int = 3) -> tuple[float, list[str]]:
    """kernel_ms and the names of the kernels that ran, longest total first (which cuBLAS kernel, say)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = sorted((event for event in prof.key_averages() if event.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda event: -event.self_device_time_total)
    return sum(event.self_device_time_total for event in kernels) / 1e3 / reps, [event.key for event in kernels]


def attention_shape_sweep(description: str):
    """Parses --sizes, --seq-lens and --tokens, prints the device, then yields (size name, ModelSize, sequence
    length, batch) with batch x sequence about --tokens."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B", "7B"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--tokens", type=int, default=16384, help="batch x sequence per call")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for size_name in args.sizes:
        for seq in args.seq_lens:
            yield size_name, get_size(size_name), seq, max(1, args.tokens // seq)
