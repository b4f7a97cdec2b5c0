"""Our side of the throughput benchmarks: a launcher run variant (`--mcore KERNELS:MICRO_BATCH[:graph][:fp8-...]`),
its launch from random init on an idxmap, and the loss check that trains several variants from the same seed and
data and compares their per-iteration losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from megatron_patch.harness.iteration_log import logged_losses
from megatron_patch.harness.launcher_runs import launcher_argv, run_launcher
from megatron_patch.harness.throughput import OURS
from megatron_patch.hardware import flash_attn_importable, transformer_engine_importable

MCORE_RUN_FORM = "KERNELS:MICRO_BATCH[:graph][:fp8-RECIPE[:bf16-ends-N][:e4m3][:fprop-fp32]]"


def kernel_env(kernels: str, graph: bool = False) -> dict[str, str]:
    """fused: our kernels (the default path); plain: megatron-core's modules; graph: MP_CUDA_GRAPH=true."""
    if kernels not in ("fused", "plain"):
        raise SystemExit(f"--mcore: unknown kernels {kernels!r} (fused or plain)")
    return {"MP_FUSED_KERNELS": str(kernels == "fused").lower(), "MP_CUDA_GRAPH": str(graph).lower()}


@dataclasses.dataclass(frozen=True)
class McoreRun:
    """One --mcore KERNELS:MICRO_BATCH[:graph][:fp8-RECIPE[:bf16-ends-N][:e4m3][:fprop-fp32]]."""
    kernels: str
    micro: int
    graph: bool = False
    fp8_recipe: str = ""  # "" = bf16
    bf16_ends: int = 0  # fp8: decoder layers kept in bf16 at each end (MP_FP8_BF16_LAYERS)
    e4m3: bool = False  # fp8: e4m3 gradients too (MP_FP8_FORMAT=e4m3; else hybrid)
    fprop_fp32: bool = False  # fp8: forward GEMMs accumulate in fp32 (MP_FP8_FPROP_ACCUMULATION=fp32)

    @classmethod
    def parse(cls, text: str) -> "McoreRun":
        kernels, micro, *options = text.split(":")
        recipes = [o.removeprefix("fp8-") for o in options if o.startswith("fp8-")]
        ends = [o.removeprefix("bf16-ends-") for o in options if o.startswith("bf16-ends-")]
        flags = {o for o in options if o in ("graph", "e4m3", "fprop-fp32")}
        fp8_only = bool(ends) or bool(flags - {"graph"})
        if not micro.isdigit() or len(recipes) > 1 or len(ends) > 1 or (fp8_only and not recipes) \
                or not all(n.isdigit() for n in ends) or len(options) != len(flags) + len(recipes) + len(ends) \
                or len(set(options)) != len(options):
            raise SystemExit(f"--mcore {text}: expected {MCORE_RUN_FORM}, e.g. fused:8:graph, "
                             "fused:2:fp8-tensorwise or fused:2:fp8-tensorwise:bf16-ends-1:fprop-fp32")
        kernel_env(kernels)  # refuses unknown kernels
        return cls(kernels, int(micro), "graph" in flags, recipes[0] if recipes else "", int(ends[0]) if ends else 0,
                   "e4m3" in flags, "fprop-fp32" in flags)

    @property
    def env(self) -> dict[str, str]:
        fp8 = {"MP_FP8_RECIPE": self.fp8_recipe} if self.fp8_recipe else {}
        if self.bf16_ends:
            fp8["MP_FP8_BF16_LAYERS"] = str(self.bf16_ends)
        if self.e4m3:
            fp8["MP_FP8_FORMAT"] = "e4m3"
        if self.fprop_fp32:
            fp8["MP_FP8_FPROP_ACCUMULATION"] = "fp32"
        return {**kernel_env(self.kernels, self.graph), **fp8}

    @property
    def precision(self) -> str:
        return "fp8" if self.fp8_recipe else "bf16"

    def label(self) -> str:
        graph = " + CUDA graph" if self.graph else ""
        fp8 = f", fp8 {self.fp8_recipe}" if self.fp8_recipe else ""
        fp8 += f", bf16 ends {self.bf16_ends}" if self.bf16_ends else ""
        fp8 += ", e4m3" if self.e4m3 else ""
        fp8 += ", fp32 forward accumulation" if self.fprop_fp32 else ""
        return f"{self.kernels}{graph}{fp8}"


def megatron_run(size: str, seq_len: int, micro: int, global_batch: int, data: str, tokenizer: str, iters: int,
                 out: Path, extra_env: dict[str, str], tp: int = 1, nproc: int = 1, precision: str = "bf16",
                 warmup_iters: int = 0, **positionals) -> str:
    """Our launcher path (by default random init, pre-training on an idxmap, the distributed optimizer; other
    `positionals`, e.g. SFT=True, AC="full", override those); no checkpoint saved (MP_SAVE=false). Returns its
    log."""
    # FL: flash attention; with TE it needs flash-attn, else TE's cuDNN fused attention (FL=false).
    flash = flash_attn_importable() or not transformer_engine_importable()
    values = dict(MODEL_SIZE=size, BATCH_SIZE=micro, GLOBAL_BATCH_SIZE=global_batch, LR=1e-4, MIN_LR=1e-5,
                  SEQ_LEN=seq_len, PR=precision, TP=tp, SP=tp > 1, DO=True, FL=flash, DATASET_PATH=data,
                  OUTPUT_BASEPATH=out)
    args = launcher_argv(**{**values, **positionals}, iterations=iters, warmup_iterations=warmup_iters)
    env = {"MP_TOKENIZER_PATH": tokenizer, "MP_NPROC_PER_NODE": str(nproc), "MP_SAVE": "false", **extra_env}
    try:
        return run_launcher(args, env, out, iters)
    except RuntimeError as failed:
        raise SystemExit(f"megatron {failed}") from None


def mcore_side(run: McoreRun, te: bool) -> str:
    """The table's side of a launcher run: ours is the fused path in bf16; megatron-core's plain modules (with
    TE: upstream's flags on megatron-core + TE, Pai's stack) and fp8 runs are sides of their own, so a bf16
    comparison never picks them as ours."""
    base = OURS if run.kernels == "fused" else "Pai: megatron-core + TE" if te else "megatron-core plain"
    return f"{base}, fp8" if run.fp8_recipe else base


def launch_failure(out: Path, failed: BaseException) -> tuple[str, str]:
    """("OOM" or "failed", the line that says why) of a launcher run into `out` that failed: from its whole log and
    the launcher's per-node logs (where the ranks' own errors are: torchrun's summary of the failed ranks can push
    a rank's error out of the tail)."""
    logs = [out / "megatron.log", *sorted(out.glob("log/*.log"))]
    lines = [line for log in logs if log.is_file() for line in log.read_text(errors="replace").splitlines()]
    lines = lines or [str(failed)]
    oom = next((line for line in lines if "out of memory" in line), None)
    cause = oom or next((line for line in reversed(lines) if "Error" in line and "ChildFailedError" not in line),
                        lines[-1])
    return ("OOM" if oom else "failed"), cause.strip()


def run_mcore_variants(texts: list[str], launch: Callable[[McoreRun, Path], str], out_root: Path,
                       record: Callable[..., None], measure: Callable[[str], tuple[float, float, dict]], layout: str,
                       graph_fallback: bool = False, may_start: Callable[[], bool] = lambda: True) -> None:
    """Each `--mcore` run text through `launch(run, out) -> log` (a SystemExit when it failed; out: a folder of
    its own under out_root), recorded as ok (`measure(log)` -> rate, peak GiB, more fields), OOM or failed. A run
    is skipped where a smaller micro-batch of its variant ran out of memory, and none starts once `may_start()`
    says no (a time budget); `graph_fallback`: a CUDA-graphed run that fails (not OOM) runs again without it, and
    so do the graphed runs after it."""
    te = transformer_engine_importable()
    oom_at: dict[str, int] = {}  # variant -> micro-batch that ran out of memory
    pending, graph_failed = list(texts), False
    while pending:
        text = pending.pop(0)
        text = text.replace(":graph", "") if graph_failed else text
        run = McoreRun.parse(text)
        variant = f"{run.label()}, {'TE' if te else 'local'} spec, {layout}"
        if run.micro > oom_at.get(variant, run.micro) or not may_start():
            why = f"out of memory at micro-batch {oom_at[variant]}" if variant in oom_at else "out of time"
            print(f"--mcore {text}: skipped, {why}", flush=True)
            continue
        out = out_root / f"mcore-{text.replace(':', '-')}"
        try:
            log = launch(run, out)
        except SystemExit as failed:  # report it and go on with the other runs
            if failed.code == 143:  # SIGTERM (main): this benchmark is stopping, not the run failing
                raise
            status, cause = launch_failure(out, failed)
            oom_at.update({variant: run.micro} if status == "OOM" else {})
            record(mcore_side(run, te), variant, run.micro, status, note=cause)
            if status == "failed" and graph_fallback and run.graph:
                graph_failed = True
                pending.insert(0, text)
            continue
        rate, peak, extra = measure(log)
        record(mcore_side(run, te), variant, run.micro, "ok", rate, peak, **extra)


def repeat_label(label: str, taken) -> str:
    """The same run twice is a control (the run-to-run spread): the repeats are numbered, not overwritten."""
    earlier = sum(1 for name in taken if name == label or name.startswith(f"{label} (run "))
    return f"{label} (run {earlier + 1})" if earlier else label


def tail_mean(curve: list[float]) -> float:
    """The mean loss of a curve's last 10 iterations."""
    return sum(curve[-10:]) / len(curve[-10:])


def variant_summary(runs_by_variant: dict[str, list[list[float]]]) -> list[str]:
    """Per variant (the curves of its repeats): how many runs, their last-10 means' mean and range, and the mean's
    difference from the first variant's, with whether the two ranges overlap. One run per variant cannot tell
    a difference from the run-to-run spread (docs/benchmarks.md: up to 1.8% between runs of one variant at 1.5B
    over 200 iterations)."""
    tails = {name: [tail_mean(curve) for curve in curves] for name, curves in runs_by_variant.items()}
    (first, reference), *_ = tails.items()
    lines = []
    for name, values in tails.items():
        mean = sum(values) / len(values)
        line = (f"  {name:28s} {len(values)} run(s), last 10 iterations' mean {mean:.4f} "
                f"({min(values):.4f}-{max(values):.4f})")
        if name != first:
            apart = min(values) > max(reference) or max(values) < min(reference)
            line += (f"; {100 * (mean / (sum(reference) / len(reference)) - 1):+.2f}% against {first}, "
                     + ("ranges apart" if apart else "ranges overlap"))
        lines.append(line)
    return lines


def check_losses(runs: list[McoreRun], repeats: int, iterations: int, warmup: int | None,
                 launch: Callable[[McoreRun, str, int], str]) -> None:
    """Each run `repeats` times (interleaved, so a drifting machine touches every variant alike) through
    `launch(run, label, warmup) -> log`: per-iteration loss differences against the first run, absolute and
    relative, the relative difference of the last 10 iterations' mean loss, and per variant the mean and range over
    its repeats. A linear warm-up of `warmup` iterations (default a tenth of them), as real runs have: from random
    init without one a run can spike in its first iterations and the curves then compare two trajectories
    (docs/benchmarks.md)."""
    warmup = iterations // 10 if warmup is None else warmup
    curves: dict[str, list[float]] = {}
    runs_by_variant: dict[str, list[list[float]]] = {}
    print(f"loss check: {iterations} iterations, learning rate 1e-4 after {warmup} of warm-up", flush=True)
    for run in runs * repeats:
        label = repeat_label(run.label(), curves)
        curves[label] = logged_losses(launch(run, label, warmup))
        runs_by_variant.setdefault(run.label(), []).append(curves[label])
        # Printed as each run ends: a call cut short by its time limit keeps the runs that finished.
        print(f"{label}:", " ".join(f"{v:.4f}" for v in curves[label]), flush=True)
    (first, reference), *others = curves.items()
    print(f"loss check, {len(reference)} iterations: {first} {reference[0]:.4f} -> {reference[-1]:.4f}", flush=True)
    for name, curve in others:
        diffs = [abs(a - b) for a, b in zip(curve, reference)]
        relative = [d / b for d, b in zip(diffs, reference)]
        tail = tail_mean(curve) / tail_mean(reference) - 1
        print(f"  {name:24s} {curve[0]:.4f} -> {curve[-1]:.4f}; max |difference| from {first} {max(diffs):.4f} "
              f"(iteration {diffs.index(max(diffs)) + 1}, {100 * max(relative):.2f}%), "
              f"mean {sum(diffs) / len(diffs):.4f}; last 10 iterations' mean {100 * tail:+.2f}%", flush=True)
    print("per variant:", flush=True)
    for line in variant_summary(runs_by_variant):
        print(line, flush=True)
