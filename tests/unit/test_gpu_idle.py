"""megatron_patch/harness/gpu_idle.py: the GPU's idle time between kernels within a window of host activity."""

from __future__ import annotations

from types import SimpleNamespace

from torch.autograd import DeviceType

from megatron_patch.harness import gpu_idle
from megatron_patch.harness.gpu_idle import Span


def test_busy_union_merges_overlapping_kernels_of_several_streams():
    spans = [Span(0, 10, "a"), Span(5, 12, "b"), Span(20, 30, "c"), Span(30, 31, "d"), Span(40, 41, "e")]
    assert gpu_idle.busy_union(spans) == [(0, 12), (20, 31), (40, 41)]


def test_idle_gaps_inside_the_window_only():
    busy = [(0, 12), (20, 31), (40, 41)]
    assert gpu_idle.idle_gaps(busy, (5, 50)) == [(12, 20), (31, 40), (41, 50)]
    assert gpu_idle.idle_gaps(busy, (-10, 35)) == [(-10, 0), (12, 20), (31, 35)]
    assert gpu_idle.idle_gaps(busy, (5, 50), min_gap_us=9) == [(31, 40), (41, 50)]


def event(start, end, name, device=DeviceType.CPU):
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name, device_type=device)


def test_report_reads_profiler_events():
    events = [event(0, 10_000, "train_step"), event(4_000, 9_000, "aten::item"),
              event(100, 4_000, "gemm", DeviceType.CUDA), event(8_000, 9_800, "adam", DeviceType.CUDA),
              event(9_790, 9_805, "add", DeviceType.CUDA)]
    assert gpu_idle.report(events).splitlines() == [
        "window 10.0 ms: GPU busy 5.7 ms, idle 4.3 ms (3 kernels; idle gaps >= 0.1 ms: 3, 4.3 ms)",
        "longest gaps (ms, at ms into the window): 4.00 at 4.0, 0.20 at 9.8, 0.10 at 0.0"]
    assert gpu_idle.report([event(0, 1, "x")]) == "no GPU kernels or no host events in the window"
