"""Where the GPU waits: its idle time from one training step's start to the next one's.

A CUDA-graphed step leaves the GPU idle only where the host has not yet launched the next work: after a sync (a
loss or a gradient norm read on the host), the log line, the next batch. torch.profiler records the kernels (graph
replays included) and the host's calls; this module measures the idle time between them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    start: float  # microseconds, the profiler's clock
    end: float
    name: str


def busy_union(spans: list[Span]) -> list[tuple[float, float]]:
    """The GPU's busy intervals: overlapping kernels (several streams) merged."""
    merged: list[list[float]] = []
    for span in sorted(spans, key=lambda s: s.start):
        if merged and span.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], span.end)
        else:
            merged.append([span.start, span.end])
    return [(start, end) for start, end in merged]


def idle_gaps(busy: list[tuple[float, float]], window: tuple[float, float],
              min_gap_us: float = 0.0) -> list[tuple[float, float]]:
    """Intervals of `window` not covered by `busy`, at least `min_gap_us` long."""
    gaps, cursor = [], window[0]
    for start, end in busy:
        if start > cursor:
            gaps.append((cursor, min(start, window[1])))
        cursor = max(cursor, end)
        if cursor >= window[1]:
            break
    if cursor < window[1]:
        gaps.append((cursor, window[1]))
    return [(s, e) for s, e in gaps if e - s >= min_gap_us]


def report(events, top: int = 8) -> str:
    """Text report from torch.profiler's `prof.events()`: the window (first to last host event), GPU busy and
    idle time, and the longest idle gaps with where in the window they start."""
    from torch.autograd import DeviceType

    kernels = [Span(e.time_range.start, e.time_range.end, e.name) for e in events
               if e.device_type == DeviceType.CUDA]
    host = [e.time_range for e in events if e.device_type == DeviceType.CPU]
    if not kernels or not host:
        return "no GPU kernels or no host events in the window"
    window = (min(r.start for r in host), max(r.end for r in host))
    gaps = idle_gaps(busy_union(kernels), window)
    idle = sum(e - s for s, e in gaps)
    long_gaps = [(s, e) for s, e in gaps if e - s >= 100]
    span_ms = (window[1] - window[0]) / 1e3
    longest = sorted(long_gaps, key=lambda gap: gap[0] - gap[1])[:top]
    return (f"window {span_ms:.1f} ms: GPU busy {span_ms - idle / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms "
            f"({len(kernels)} kernels; idle gaps >= 0.1 ms: {len(long_gaps)}, "
            f"{sum(e - s for s, e in long_gaps) / 1e3:.1f} ms)\n"
            "longest gaps (ms, at ms into the window): "
            + ", ".join(f"{(e - s) / 1e3:.2f} at {(s - window[0]) / 1e3:.1f}" for s, e in longest))
