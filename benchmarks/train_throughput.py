"""Training throughput on one machine, best against best: our launcher path against Hugging Face transformers,
same model shape, sequence length and global batch.

    python benchmarks/train_throughput.py --size 1.5B --seq-len 2048 --global-batch 32 --data PREFIX \\
        --tokenizer DIR [--mcore fused:8:graph --mcore plain:4] [--skip-hf] [--json ROWS.json]
    python benchmarks/train_throughput.py --size 1.5B --seq-len 2048 --global-batch 32 --skip-mcore [--hf ab] \\
        [--hf-micro-batches 4,8,16,32] [--hf-compile-modes default,reduce-overhead] [--json ROWS.json]
    python benchmarks/train_throughput.py --table OURS.json HF.json          # Markdown from stored rows, no runs
    python benchmarks/train_throughput.py --data PREFIX --tokenizer DIR --loss-check-iters 50

Each `--mcore KERNELS:MICRO_BATCH[:graph][:fp8-RECIPE[:bf16-ends-N][:e4m3][:fprop-fp32]]` is one launcher run: KERNELS `fused` (default
path) or `plain` (MP_FUSED_KERNELS=false: megatron-core's unfused modules and logits + cross-entropy; with TE
importable, megatron-core + TE with upstream's flags: Pai's stack); `graph` adds MP_CUDA_GRAPH=true (each
iteration's forward and backward replayed from one CUDA graph); `fp8-RECIPE` trains with PR=fp8 and
MP_FP8_RECIPE=RECIPE (TE's fp8, e.g. fp8-tensorwise), else PR=bf16; `bf16-ends-N` keeps N decoder layers at each end
in bf16 (MP_FP8_BF16_LAYERS=N), `e4m3` takes e4m3 for gradients too (MP_FP8_FORMAT=e4m3), `fprop-fp32` accumulates
the forward's fp8 GEMMs in fp32 (MP_FP8_FPROP_ACCUMULATION=fp32). `--loss-check-iters N` instead trains N iterations of each `--mcore` run (default:
the plain path, the fused kernels and fused + graph) from the same seed and data, with a tenth of them as
learning-rate warm-up (`--loss-check-warmup`), and prints their per-iteration losses against the first run's;
`--loss-check-repeats R` runs each R times and reports each variant's mean and range (one run per variant cannot
separate a difference from the run-to-run spread).

HF variants: (a) fp32 master weights + bf16 autocast + torch.compile (the numerics of our Megatron bf16 runs),
(b) pure bf16 parameters + torch.compile (a speed bound). Both use fused AdamW and gradient accumulation to
the same global batch. Each runs once per `--hf-compile-modes` mode (reduce-overhead adds CUDA graphs; a row
notes graphs inductor ran without them) and `--hf-micro-batches` value, upwards until the first out-of-memory or
failure; a micro-batch that runs out of memory after earlier runs in the same process is run again alone in a
fresh one (the allocator can be fragmented by then), and that run's row is the one kept. An `--mcore` run is
skipped where a smaller micro-batch of its variant ran out of memory.

Both sides' rates are tokens over the synchronized wall time of whole iterations after warm-up (ours: the
launcher's log after its first 5 iterations; HF: after 2 steps). `--json` appends every row, OOM and failures
too, to a JSON list, so two processes (ours on GPU 0, HF on GPU 1) can run at once; `--table` prints each
side's sweep, its best, and ours / HF at best and at each micro-batch both ran.

FLOP count (per token, forward + backward): Qwen25Size.training_flops_per_token, megatron-core's own count for the
TFLOP/s it logs (6 * the GEMM weights + 6 * layers * hidden * seq_len for the causal attention).
MFU is against the device's dense bf16 peak (PEAK_BF16_DENSE; `--peak-tflops` for a device not listed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import functools
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_patch.hardware import flash_attn_importable, transformer_engine_importable  # noqa: E402
from megatron_patch.model_sizes import get_size  # noqa: E402

# torch is imported where a GPU is used: --table and its unit test do without its 3-5 s import.

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s. The first key found in torch.cuda.get_device_name() wins:
# PCIe and NVL cards before their SXM siblings, and "H200" before "H20" (its substring).
PEAK_BF16_DENSE = (
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe datasheet"),
    ("H100 NVL", 835e12, "NVIDIA H100 NVL datasheet"),
    ("H100", 989e12, "NVIDIA H100 SXM datasheet"),
    ("H200 NVL", 835e12, "NVIDIA H200 NVL datasheet"),
    ("H200", 989e12, "NVIDIA H200 SXM datasheet"),
    ("H800", 989e12, "NVIDIA H800 SXM datasheet"),
    ("H20", 148e12, "NVIDIA H20 datasheet"),
    ("A100", 312e12, "NVIDIA A100 datasheet"),
    ("L40S", 362e12, "NVIDIA L40S datasheet"),
)
OURS, HF_SIDES = "megatron_patch", {"a": "HF (a)", "b": "HF (b)"}  # the rows' "side" (--hf a|b for HF)


@functools.cache
def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def mfu_peak(device: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """The MFU peak in FLOP/s for device (None if not in PEAK_BF16_DENSE) and the header's words for it."""
    if override_tflops:
        return override_tflops * 1e12, f"MFU against {override_tflops:g} TFLOP/s (--peak-tflops)"
    for key, flops, source in PEAK_BF16_DENSE:
        if key in device:
            return flops, f"MFU against {flops / 1e12:.0f} TFLOP/s dense bf16 ({source})"
    return None, f"MFU peak unknown for {device}; pass --peak-tflops"


def versions() -> dict[str, str]:
    """What both sides run on: printed first and stored with every row."""
    import torch

    found = {"torch": torch.__version__}
    for distribution in ("transformers", "megatron-core"):
        try:
            found[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[distribution] = "not installed"
    if transformer_engine_importable():
        try:
            found["transformer_engine"] = metadata.version("transformer_engine")
        except metadata.PackageNotFoundError:  # carried as a bare folder: no package metadata
            import transformer_engine

            found["transformer_engine"] = getattr(transformer_engine, "__version__", "version unknown")
    found["CUDA runtime"] = torch.version.cuda or "none"
    return found


def report(name: str, tokens_per_s: float, size, seq_len: int, peak_gib: float,
           peak_flops: float | None = None) -> dict[str, float | None]:
    """Prints one result line and returns its figures. peak_flops: the MFU peak, by default this device's."""
    if peak_flops is None:
        peak_flops = mfu_peak(device_name())[0]
    tflops = tokens_per_s * size.training_flops_per_token(seq_len) / 1e12
    mfu = tflops * 1e12 / peak_flops if peak_flops else None
    print(f"{name:58s} {tokens_per_s:10,.0f} tokens/s/GPU  {tflops:6.1f} TFLOP/s/GPU  "
          f"MFU {f'{100 * mfu:5.1f}%' if mfu is not None else '  n/a '}  peak {peak_gib:5.1f} GiB", flush=True)
    return {"tokens_per_s_per_gpu": tokens_per_s, "tflops": tflops, "mfu": mfu, "peak_gib": peak_gib}


def free_cuda_memory() -> None:
    """Drops what an earlier run left: compiled graphs and CUDA graph pools (held by dynamo's caches), then the
    model and optimizer once nothing refers to them."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def hf_throughput(size_name: str, seq_len: int, micro: int, global_batch: int, pure_bf16: bool,
                  steps: int, warmup: int, compile_mode: str = "default") -> tuple[float, float, int]:
    """Tokens/s, peak GiB, and how many compiled graphs ran without the CUDA graphs their mode asked for."""
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import list_mode_options
    from transformers import Qwen2ForCausalLM

    from megatron_patch.hf_checkpoint import hf_config_for

    # Each run starts on a clean GPU and compiles afresh: after a second shape dynamo would otherwise compile the
    # batch dimension as symbolic. Freed here, not on the way out: after an OOM the caller's traceback still
    # holds this run's frames (model, activations) until its except block ends.
    free_cuda_memory()
    cudagraph_skips = counters["inductor"]["cudagraph_skips"]
    size = get_size(size_name)
    torch.manual_seed(0)
    config = hf_config_for(size, "bfloat16" if pure_bf16 else "float32")
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).cuda()
    if pure_bf16:
        model = model.to(torch.bfloat16)
    model.gradient_checkpointing_disable()
    # Under CUDA graphs (reduce-overhead, max-autotune) a .grad left None would be the backward graph's own
    # output, overwritten at the next replay: there gradients live in persistent buffers, as in Megatron's grad
    # buffer. Elsewhere they are freed after each step, HF's default and the lower peak.
    cuda_graphs = list_mode_options(compile_mode).get("triton.cudagraphs", False)
    for param in model.parameters() if cuda_graphs else ():
        param.grad = torch.zeros_like(param)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    compiled = torch.compile(model, mode=compile_mode)
    accumulation = global_batch // micro
    tokens = torch.randint(0, 151643, (micro, seq_len), device="cuda")

    def step():
        for _ in range(accumulation):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not pure_bf16):
                loss = compiled(input_ids=tokens, labels=tokens).loss / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not cuda_graphs)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return (steps * global_batch * seq_len / elapsed, torch.cuda.max_memory_allocated() / 1024 ** 3,
            counters["inductor"]["cudagraph_skips"] - cudagraph_skips)


def out_of_memory(error: BaseException) -> BaseException | None:
    """The out-of-memory error in error's chain, if any: torch.compile's backend wraps one raised while it
    compiles or captures a CUDA graph."""
    import torch

    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return next((e for e in chain if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)), None)


def failure_status_and_note(error: BaseException) -> tuple[str, str]:
    """("OOM" or "failed", the error's type and first line) as strings only: a variable still holding the error
    after its except block would keep the failed run's frames, model and activations on the GPU."""
    oom = out_of_memory(error)
    cause = oom or error
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return "OOM" if oom else "failed", f"{type(cause).__name__}: {first_line}"


def megatron_run(size_name: str, seq_len: int, micro: int, global_batch: int, data: str, tokenizer: str,
                 iters: int, out: Path, extra_env: dict[str, str], tp: int = 1, nproc: int = 1,
                 precision: str = "bf16", warmup_iters: int = 0) -> str:
    """Our launcher path (random init, pre-training on an idxmap); returns its log."""
    # FL: flash attention; with TE it needs flash-attn, else TE's cuDNN fused attention (FL=false).
    flash = flash_attn_importable() or not transformer_engine_importable()
    args = ["dsw", size_name, str(micro), str(global_batch), "1e-4", "1e-5", str(seq_len), str(seq_len), precision,
            str(tp), "1", "1", str(tp > 1).lower(), "true", str(flash).lower(), "false", "false", "false",
            "100000", data, data, "none",
            str(iters * global_batch * seq_len), str(warmup_iters * global_batch * seq_len), str(out)]
    env = {"MP_TOKENIZER_PATH": tokenizer, "MP_NPROC_PER_NODE": str(nproc), **extra_env}
    try:
        return run_launcher(args, env, out, iters)
    except RuntimeError as failed:
        raise SystemExit(f"megatron {failed}") from None


def run_launcher(positional: list[str], extra_env: dict[str, str], out: Path, iters: int) -> str:
    """run_mcore_qwen.sh with these arguments and extra environment, its output in out/megatron.log, stopped once
    its last iteration is logged; returns the log. Raises RuntimeError with the log's tail if it failed first.
    Starts from an empty `out`: a run stopped during its final save leaves a partial checkpoint there, which the
    launcher (rightly) refuses to resume from."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    last_iteration = f"[qwen] iteration {iters:8d}"
    # Written as it runs, so a run cut short still leaves its log. Stopped once the last iteration is logged:
    # the final checkpoint save (tens of seconds at 1.5B) measures the disk, not training.
    with open(out / "megatron.log", "w") as log_file:
        proc = subprocess.Popen(["sh", str(REPO / "examples/qwen2_5/run_mcore_qwen.sh"), *positional],
                                env={**os.environ, **extra_env}, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        trained = False
        try:
            while not trained and proc.poll() is None:
                time.sleep(1)
                trained = last_iteration in (out / "megatron.log").read_text(errors="replace")
        finally:  # trained, or this benchmark stopped (e.g. by `timeout`): the run's own session goes too
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # SIGTERM would make Megatron save first
                proc.wait()
    log = (out / "megatron.log").read_text(errors="replace")
    if not trained and proc.returncode != 0:
        raise RuntimeError("run failed:\n" + "\n".join(log.splitlines()[-30:]))
    return log


def throughput_from_log(log: str) -> tuple[float, float]:
    """Tokens/s/GPU over the iterations after the first 5, and peak memory. Each logged rate is one iteration's
    tokens over its wall time, synchronized (megatron's interval timer syncs the GPU at every log), and all
    iterations train the same tokens: the rates' harmonic mean is total tokens over total time (0 if a rate
    was logged as 0, under half a token per second)."""
    rates = [float(v.replace(",", "")) for v in re.findall(r"tokens/s/GPU: ([0-9,]+)", log)]
    peaks = [float(v) for v in re.findall(r"memory allocated/peak/reserved \(GiB\): [0-9.]+/([0-9.]+)", log)]
    steady = rates[5:] or rates
    return len(steady) / sum(1 / rate for rate in steady) if all(steady) else 0.0, max(peaks or [0.0])


def kernel_env(kernels: str, graph: bool = False) -> dict[str, str]:
    """fused: our kernels (the default path); plain: megatron-core's modules; graph: MP_CUDA_GRAPH=true."""
    if kernels not in ("fused", "plain"):
        raise SystemExit(f"--mcore: unknown kernels {kernels!r} (fused or plain)")
    return {"MP_FUSED_KERNELS": str(kernels == "fused").lower(), "MP_CUDA_GRAPH": str(graph).lower()}


MCORE_RUN_FORM = "KERNELS:MICRO_BATCH[:graph][:fp8-RECIPE[:bf16-ends-N][:e4m3][:fprop-fp32]]"


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


def losses_from_log(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"lm loss: ([0-9.E+-]+)", log)]


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
    a difference from the run-to-run spread (1.5B, 200 iterations on an H200, 2026-12-01: up to 1.8% between runs
    of one variant: nondeterministic kernels' sums round differently each run and training grows it)."""
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


def check_losses(args) -> None:
    """Each --mcore run (default: the plain path, the fused kernels, fused + CUDA graph) from the same seed and
    data, --loss-check-repeats times (interleaved, so a drifting machine touches every variant alike):
    per-iteration loss differences against the first run over N iterations, absolute and relative, the relative
    difference of the last 10 iterations' mean loss, and per variant the mean and range over its repeats."""
    runs = [McoreRun.parse(text) for text in args.mcore or
            [f"plain:{args.micro_batch}", f"fused:{args.micro_batch}", f"fused:{args.micro_batch}:graph"]]
    runs = runs * args.loss_check_repeats
    curves = {}
    runs_by_variant: dict[str, list[list[float]]] = {}
    # A linear warm-up, as real runs have: from random init without one, a run can spike in its first iterations
    # (bf16 at 1.5B, 2026-12-01: 11.0 -> 13.1 at iteration 4) and the curves then compare two trajectories.
    warmup = args.loss_check_iters // 10 if args.loss_check_warmup is None else args.loss_check_warmup
    print(f"loss check: {args.loss_check_iters} iterations, learning rate 1e-4 after {warmup} of warm-up",
          flush=True)
    for run in runs:
        label = repeat_label(run.label(), curves)
        log = megatron_run(args.size, args.seq_len, run.micro, args.global_batch, args.data, args.tokenizer,
                           args.loss_check_iters, Path(args.out) / f"losscheck-{label.replace(' ', '')}",
                           run.env, args.tp, args.nproc, run.precision, warmup)
        curves[label] = losses_from_log(log)
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


# ---- result rows (--json) and the table (--table) ----

def append_row(path: Path, row: dict) -> None:
    """Adds row to the JSON list in path; the lock lets two processes write one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        rows = json.loads(file.read() or "[]")
        rows.append(row)
        file.seek(0)
        file.truncate()
        json.dump(rows, file, indent=1)


def hf_in_fresh_process(args, letter: str, mode: str, micro: int) -> str:
    """One HF run (variant, compile mode, micro-batch) by this script in a new process; its row goes to --json as
    its own run's would. Returns the row's status."""
    with tempfile.TemporaryDirectory() as scratch:
        rows_path = Path(scratch) / "rows.json"
        command = [sys.executable, __file__, "--size", args.size, "--seq-len", str(args.seq_len), "--global-batch",
                   str(args.global_batch), "--hf-steps", str(args.hf_steps), "--skip-mcore", "--hf", letter,
                   "--hf-compile-modes", mode, "--hf-micro-batches", str(micro), "--json", str(rows_path)]
        if args.peak_tflops:
            command += ["--peak-tflops", str(args.peak_tflops)]
        subprocess.run(command, check=False)
        rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    for row in rows:
        if args.json:
            append_row(args.json, row)
    return rows[-1]["status"] if rows else "failed"


def result_row(side: str, variant: str, micro: int, figures: dict, status: str, note: str, size: str, seq_len: int,
               global_batch: int, stack: dict[str, str]) -> dict:
    """One --json row: figures as report() returns them (None where the run failed)."""
    return {"side": side, "variant": variant, "micro_batch": micro, **figures, "status": status, "note": note,
            "size": size, "seq_len": seq_len, "global_batch": global_batch, "device": device_name(),
            "versions": stack, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def mcore_side(run: "McoreRun", te: bool) -> str:
    """The table's side of a launcher run: ours is the fused path in bf16; megatron-core's plain modules (with
    TE: upstream's flags on megatron-core + TE, Pai's stack) and fp8 runs are sides of their own, so a bf16
    comparison never picks them as ours."""
    base = OURS if run.kernels == "fused" else "Pai: megatron-core + TE" if te else "megatron-core plain"
    return f"{base}, fp8" if run.fp8_recipe else base


def best_row(rows: list[dict]) -> dict | None:
    return max((r for r in rows if r["status"] == "ok"), key=lambda r: r["tokens_per_s_per_gpu"], default=None)


def comparisons(rows: list[dict]) -> list[tuple[str, dict | None, dict | None, dict | None]]:
    """(label, ours, HF (a), HF (b)): each side's best row, then the best at each micro-batch ours and an HF
    side both ran."""
    def best_of(side: str, micro: int | None = None) -> dict | None:
        return best_row([r for r in rows if r["side"] == side and micro in (None, r["micro_batch"])])

    def micro_batches(sides) -> set[int]:
        return {r["micro_batch"] for r in rows if r["side"] in sides and r["status"] == "ok"}

    hf_sides = HF_SIDES.values()
    found = [("each side's best", best_of(OURS), *(best_of(side) for side in hf_sides))]
    for micro in sorted(micro_batches([OURS]) & micro_batches(hf_sides)):
        found.append((f"micro-batch {micro}", best_of(OURS, micro), *(best_of(side, micro) for side in hf_sides)))
    return found


def ratio(ours: dict | None, hf: dict | None) -> float | None:
    return ours["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"] if ours and hf else None


def markdown_table(rows: list[dict]) -> str:
    shapes = {(r["size"], r["seq_len"], r["global_batch"]) for r in rows}
    if len(shapes) != 1:
        raise SystemExit(f"--table: the rows mix shapes (size, sequence, global batch) {sorted(shapes)}: "
                         "pass the files of one shape")
    (size, seq_len, global_batch), = shapes
    devices = sorted({r["device"] for r in rows})
    stacks = sorted({" | ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in rows})
    dates = sorted(r["date"] for r in rows)
    lines = [f"Qwen2.5-{size}, sequence {seq_len}, global batch {global_batch}; {', '.join(devices)}; "
             f"{dates[0]} to {dates[-1]}", *(f"versions: {stack}" for stack in stacks)]
    if len(devices) > 1:
        lines.append("WARNING: rows from more than one device; rates compare only on one machine")

    micros = sorted({r["micro_batch"] for r in rows})
    lines += ["", "| side | variant | " + " | ".join(f"mb {m}" for m in micros) + " | best |",
              "|---|---|" + "---|" * (len(micros) + 1)]
    order = {side: i for i, side in enumerate((OURS, *HF_SIDES.values()))}
    for side, variant in sorted(dict.fromkeys((r["side"], r["variant"]) for r in rows),
                                key=lambda key: order.get(key[0], len(order))):
        mine = [r for r in rows if (r["side"], r["variant"]) == (side, variant)]
        cells = []
        for micro in micros:
            at = [r for r in mine if r["micro_batch"] == micro]
            fastest = best_row(at)
            cells.append(f"{fastest['tokens_per_s_per_gpu']:,.0f}" if fastest else at[-1]["status"] if at else "-")
        fastest = best_row(mine)
        cells.append(f"**{fastest['tokens_per_s_per_gpu']:,.0f}** ({describe(fastest)})" if fastest else "-")
        lines.append(f"| {side} | {variant} | " + " | ".join(cells) + " |")
    notes = [f"- {r['side']} {r['variant']}, mb {r['micro_batch']} {r['status']}: {r['note']}"
             for r in rows if r["note"] and r["status"] != "OOM"]
    lines += ["", *notes] if notes else []

    lines += ["", "| compared at | ours | HF (a) | ours / HF (a) | HF (b) | ours / HF (b) |",
              "|---|---|---|---|---|---|"]
    for label, ours, hf_a, hf_b in comparisons(rows):
        cells = [label, rate_cell(ours)]
        for hf in (hf_a, hf_b):
            quotient = ratio(ours, hf)
            cells += [rate_cell(hf), f"**{quotient:.3f}x**" if quotient else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(row: dict) -> str:
    mfu = f", {100 * row['mfu']:.1f}% MFU" if row["mfu"] is not None else ""
    return f"mb {row['micro_batch']}{mfu}, {row['peak_gib']:.0f} GiB"


def rate_cell(row: dict | None) -> str:
    return f"{row['tokens_per_s_per_gpu']:,.0f} ({row['variant']}, mb {row['micro_batch']})" if row else "-"


def comma_list(item_type):
    def parse(text: str) -> list:
        return [item_type(item) for item in text.split(",")]
    parse.__name__ = f"comma-separated {item_type.__name__}"  # argparse names it in its error
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5B")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--data", help="idxmap prefix for the Megatron run")
    parser.add_argument("--tokenizer", help="tokenizer folder for the Megatron run")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--hf-steps", type=int, default=5)
    parser.add_argument("--out", default="/tmp/throughput")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-mcore", action="store_true")
    parser.add_argument("--hf", default="ab", choices=["a", "b", "ab"], help="HF variants to run")
    parser.add_argument("--hf-micro-batches", type=comma_list(int), metavar="MB,MB,...",
                        help="HF micro-batches, swept upwards until the first OOM (default --micro-batch)")
    parser.add_argument("--hf-compile-modes", type=comma_list(str), default=["default"], metavar="MODE,...",
                        help="torch.compile modes for the HF runs, e.g. default,reduce-overhead (default: default)")
    parser.add_argument("--mcore", action="append", default=None,
                        metavar=MCORE_RUN_FORM,
                        help="a launcher run: fused|plain and its micro-batch (default fused:<--micro-batch>)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1, help="GPUs for the Megatron runs (DP = nproc / tp)")
    parser.add_argument("--loss-check-iters", type=int, default=0)
    parser.add_argument("--loss-check-repeats", type=int, default=1,
                        help="runs of each --mcore variant in the loss check (their spread is the yardstick)")
    parser.add_argument("--loss-check-warmup", type=int, default=None,
                        help="warm-up iterations of the loss check's runs (default: a tenth of them)")
    parser.add_argument("--peak-tflops", type=float, help="MFU peak (dense bf16) for a device not in the table")
    parser.add_argument("--json", type=Path, metavar="PATH", help="append every result row to this JSON list")
    parser.add_argument("--table", type=Path, nargs="+", metavar="PATH",
                        help="print the Markdown table of these --json files and exit (no runs)")
    args = parser.parse_args()
    if args.table:
        print(markdown_table([row for path in args.table for row in json.loads(path.read_text())]))
        return
    hf_micro_batches = sorted(set(args.hf_micro_batches or [args.micro_batch]))
    for micro in [] if args.skip_hf else hf_micro_batches:
        if args.global_batch % micro:
            raise SystemExit(f"--hf-micro-batches: {micro} does not divide --global-batch {args.global_batch}: "
                             "pass divisors of the global batch")
    # SIGTERM (timeout, a scheduler) as an exception, so the launcher runs' process sessions are ended too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    size = get_size(args.size)
    stack = versions()
    peak_flops, peak_words = mfu_peak(device_name(), args.peak_tflops)
    print("versions: " + " | ".join(f"{k} {v}" for k, v in stack.items()), flush=True)
    print(f"device: {device_name()} | {peak_words} | Qwen2.5-{args.size} | seq {args.seq_len} | micro-batch "
          f"{args.micro_batch} | global batch {args.global_batch} | "
          f"{size.training_flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token", flush=True)
    if args.loss_check_iters:
        check_losses(args)
        return

    def record(side: str, variant: str, micro: int, status: str, rate: float = 0.0, peak_gib: float = 0.0,
               note: str = "") -> None:
        """Prints one row and appends it to --json. note: why it failed, or what an "ok" row lacked."""
        name = f"{side} {variant}, mb {micro}"
        if status == "ok":
            figures = report(name, rate, size, args.seq_len, peak_gib, peak_flops)
        else:
            figures = {"tokens_per_s_per_gpu": None, "tflops": None, "mfu": None, "peak_gib": None}
        if status != "ok" or note:
            print(f"{name:58s} {status}{': ' + note if note else ''}", flush=True)
        if args.json:
            append_row(args.json, result_row(side, variant, micro, figures, status, note, args.size, args.seq_len,
                                             args.global_batch, stack))

    te_spec = transformer_engine_importable()
    te = "TE spec" if te_spec else "local spec"
    oom_at = {}  # variant -> micro-batch that ran out of memory: larger ones of that variant are not launched
    for run in [] if args.skip_mcore else args.mcore or [f"fused:{args.micro_batch}"]:
        parsed = McoreRun.parse(run)
        micro, env = parsed.micro, parsed.env
        variant = f"{parsed.label()}, {te}, TP{args.tp} DP{args.nproc // args.tp}"
        if micro > oom_at.get(variant, micro):
            print(f"--mcore {run}: skipped, out of memory at micro-batch {oom_at[variant]}", flush=True)
            continue
        out = Path(args.out) / f"mcore-{args.size}-{args.seq_len}-{run.replace(':', '-')}"
        try:
            log = megatron_run(args.size, args.seq_len, micro, args.global_batch, args.data, args.tokenizer,
                               args.iters, out, env, args.tp, args.nproc, parsed.precision)
        except SystemExit as failed:  # report it and go on with the other runs
            if failed.code == 143:  # SIGTERM (above): this benchmark is stopping, not the run failing
                raise
            print(f"--mcore {run}: {failed}", flush=True)
            # The whole log, and the launcher's per-node logs (where the ranks' own errors are): torchrun's summary
            # of the failed ranks can push a rank's error out of the tail.
            logs = [out / "megatron.log", *sorted(out.glob("log/*.log"))]
            lines = [line for log in logs for line in log.read_text(errors="replace").splitlines()] or [str(failed)]
            oom = next((line for line in lines if "out of memory" in line), None)
            if oom:
                oom_at[variant] = micro
            cause = oom or next((line for line in reversed(lines) if "Error" in line and "ChildFailedError" not in line),
                                lines[-1])
            record(mcore_side(parsed, te_spec), variant, micro, "OOM" if oom else "failed", note=cause.strip())
            continue
        rate, peak = throughput_from_log(log)
        record(mcore_side(parsed, te_spec), variant, micro, "ok", rate, peak)

    ran_in_this_process = False
    for letter in [] if args.skip_hf else args.hf:
        for mode in args.hf_compile_modes:
            for micro in hf_micro_batches:
                try:
                    rate, peak, skips = hf_throughput(args.size, args.seq_len, micro, args.global_batch,
                                                      letter == "b", args.hf_steps, 2, mode)
                except Exception as error:  # an OOM or a mode that fails is a row of the table
                    status, note = failure_status_and_note(error)
                    if status == "OOM" and ran_in_this_process:
                        # Earlier runs can leave the allocator fragmented (1.5B mb 16 after mb 8: 10.9 GiB reserved
                        # but unallocated): the micro-batch gets a fresh process before it counts as out of memory.
                        print(f"{HF_SIDES[letter]} compile {mode}, mb {micro}: out of memory after earlier runs in "
                              "this process; again in a fresh one", flush=True)
                        status = hf_in_fresh_process(args, letter, mode, micro)
                    else:
                        record(HF_SIDES[letter], f"compile {mode}", micro, status, note=note)
                    if status != "ok":
                        break  # larger micro-batches would fail the same way; hf_throughput frees what it left
                    continue
                ran_in_this_process = True
                record(HF_SIDES[letter], f"compile {mode}", micro, "ok", rate, peak,
                       f"CUDA graphs skipped in {skips} compiled graphs (inductor's warning says why)" if skips else "")


if __name__ == "__main__":
    main()
