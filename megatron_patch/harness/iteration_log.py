"""The lines a run logs per iteration, written and read in one place: our `[qwen] iteration` line (tokens/s/GPU and
memory, written by patches/megatron_fixes.py), megatron's own iteration line (loss, grad norm, loss scale,
skipped iterations) and the TensorBoard events the launcher asks for (the same values at full precision)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

QWEN_MARK = "[qwen] iteration"
_QWEN_LINE = re.compile(
    r"\[qwen\] iteration\s+(\d+) \| tokens/s/GPU: ([\d,]+)"
    r"(?: \| memory allocated/peak/reserved \(GiB\): ([\d.]+)/([\d.]+)/([\d.]+))?"
    r"(?: \| host peak RSS \(GiB\): ([\d.]+))?")
_MEGATRON_LINE = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|(.*)")
_MEGATRON_FIELD = re.compile(r"([a-z][a-z ]+): +([-0-9.E+]+)")


def qwen_iteration_line(iteration: int, tokens_per_s_per_gpu: float,
                        gpu_memory_gib: tuple[float, float, float] | None = None,
                        host_peak_rss_gib: float | None = None) -> str:
    """The line training prints after each logged iteration: GPU memory (allocated, peak, reserved) on a GPU,
    and the host's peak RSS (of the rank that prints)."""
    line = f" {QWEN_MARK} {iteration:8d} | tokens/s/GPU: {tokens_per_s_per_gpu:,.0f}"
    if gpu_memory_gib is not None:
        line += " | memory allocated/peak/reserved (GiB): " + "/".join(f"{v:.2f}" for v in gpu_memory_gib)
    if host_peak_rss_gib is not None:
        line += f" | host peak RSS (GiB): {host_peak_rss_gib:.2f}"
    return line


def last_iteration_mark(iteration: int) -> str:
    """What the `[qwen]` line of `iteration` starts with: a runner polls the log for it."""
    return f"{QWEN_MARK} {iteration:8d}"


@dataclass(frozen=True)
class QwenIteration:
    iteration: int
    tokens_per_s_per_gpu: float
    gpu_peak_gib: float | None  # peak allocated GPU memory (a GPU run)
    host_peak_rss_gib: float | None


def qwen_iterations(log: str) -> list[QwenIteration]:
    found = []
    for match in _QWEN_LINE.finditer(log):
        peak, rss = match.group(4), match.group(6)
        found.append(QwenIteration(int(match.group(1)), float(match.group(2).replace(",", "")),
                                   float(peak) if peak else None, float(rss) if rss else None))
    return found


def steady_throughput(log: str, skip: int = 5) -> tuple[float, float]:
    """Tokens/s/GPU over the iterations after the first `skip`, and the peak GPU memory (GiB). Each logged rate is
    one iteration's tokens over its wall time, synchronized (megatron's interval timer syncs the GPU at every log),
    and all iterations train the same tokens: the rates' harmonic mean is total tokens over total time (0 if a rate
    was logged as 0, under half a token per second)."""
    lines = qwen_iterations(log)
    rates = [line.tokens_per_s_per_gpu for line in lines]
    steady = rates[skip:] or rates
    rate = len(steady) / sum(1 / r for r in steady) if steady and all(steady) else 0.0
    return rate, max([line.gpu_peak_gib for line in lines if line.gpu_peak_gib is not None] or [0.0])


def host_peak_gib(log: str) -> float | None:
    """The largest host peak RSS the `[qwen]` lines logged (None if they logged none)."""
    peaks = [line.host_peak_rss_gib for line in qwen_iterations(log) if line.host_peak_rss_gib is not None]
    return max(peaks, default=None)


def megatron_iterations(log: str) -> dict[int, dict[str, float | None]]:
    """{iteration: {"lm loss", "grad norm", "loss scale", "skipped"}} from megatron's per-iteration lines. An
    iteration the fp16 loss scaler skipped has no grad norm; the log rounds the grad norm to 3 decimals."""
    found = {}
    for match in _MEGATRON_LINE.finditer(log):
        fields = dict(_MEGATRON_FIELD.findall(match.group(2)))

        def number(name: str) -> float | None:
            return float(fields[name]) if name in fields else None

        found[int(match.group(1))] = {"lm loss": number("lm loss"), "grad norm": number("grad norm"),
                                      "loss scale": number("loss scale"),
                                      "skipped": int(fields.get("number of skipped iterations", 0))}
    return found


_TIMED_LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)\] iteration\s+(\d+)/\s*\d+ \|.*?"
                         r"elapsed time per iteration \(ms\): ([\d.]+)")


def megatron_iteration_times(log: str) -> dict[int, tuple[float, float]]:
    """{iteration: (when its line was written, as a POSIX time; its elapsed seconds)} from megatron's lines (the
    elapsed time of the iteration after a save includes the save)."""
    from datetime import datetime

    return {int(it): (datetime.fromisoformat(stamp).timestamp(), float(ms) / 1000)
            for stamp, it, ms in _TIMED_LINE.findall(log)}


def logged_losses(log: str) -> list[float]:
    """The lm loss of every logged iteration, in order."""
    return [v["lm loss"] for _, v in sorted(megatron_iterations(log).items()) if v["lm loss"] is not None]


def tensorboard_scalars(tb_dir: Path, tag: str = "lm loss") -> dict[int, float]:
    """{iteration: value} at full precision from the TensorBoard events under tb_dir ({} without the package)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    values: dict[int, float] = {}
    for events in sorted(Path(tb_dir).glob("**/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return values


def run_curves(tb_dir: Path, log: str, iterations: int) -> tuple[dict[int, float], dict[int, float]]:
    """(losses, grad norms) by iteration: TensorBoard's when it has every iteration's loss (full precision), else
    the log's (7 digits for the loss, 3 decimals for the grad norm)."""
    losses = tensorboard_scalars(tb_dir, "lm loss")
    if sorted(losses) == list(range(1, iterations + 1)):
        return losses, tensorboard_scalars(tb_dir, "grad-norm")
    logged = megatron_iterations(log)
    return ({it: v["lm loss"] for it, v in logged.items() if v["lm loss"] is not None},
            {it: v["grad norm"] for it, v in logged.items() if v["grad norm"] is not None})
