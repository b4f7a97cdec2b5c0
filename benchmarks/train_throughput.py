"""Training throughput on one machine, best against best: our launcher path against Hugging Face transformers,
same model shape, sequence length and global batch.

    python -m benchmarks.train_throughput --size 1.5B --seq-len 2048 --global-batch 32 --data PREFIX \\
        --tokenizer DIR [--mcore fused:8:graph --mcore plain:4] [--skip-hf] [--json ROWS.json]
    python -m benchmarks.train_throughput --size 1.5B --seq-len 2048 --global-batch 32 --skip-mcore [--hf ab] \\
        [--hf-micro-batches 4,8,16,32] [--hf-compile-modes default,reduce-overhead] [--json ROWS.json]
    python -m benchmarks.train_throughput --table OURS.json HF.json          # Markdown from stored rows, no runs
    python -m benchmarks.train_throughput --data PREFIX --tokenizer DIR --loss-check-iters 50

Each `--mcore KERNELS:MICRO_BATCH[:graph][:fp8-RECIPE[:bf16-ends-N][:e4m3][:fprop-fp32]]` is one launcher run:
KERNELS `fused` (default path) or `plain` (MP_FUSED_KERNELS=false: megatron-core's unfused modules and logits +
cross-entropy; with TE importable, megatron-core + TE with upstream's flags: Pai's stack); `graph` adds
MP_CUDA_GRAPH=true (each iteration's forward and backward replayed from one CUDA graph); `fp8-RECIPE` trains with
PR=fp8 and MP_FP8_RECIPE=RECIPE (TE's fp8, e.g. fp8-tensorwise), else PR=bf16; `bf16-ends-N` keeps N decoder
layers at each end in bf16 (MP_FP8_BF16_LAYERS=N), `e4m3` takes e4m3 for gradients too (MP_FP8_FORMAT=e4m3),
`fprop-fp32` accumulates the forward's fp8 GEMMs in fp32 (MP_FP8_FPROP_ACCUMULATION=fp32). `--loss-check-iters N`
instead trains N iterations of each `--mcore` run (default: the plain path, the fused kernels and fused + graph)
from the same seed and data, with a tenth of them as learning-rate warm-up (`--loss-check-warmup`), and prints
their per-iteration losses against the first run's; `--loss-check-repeats R` runs each R times and reports each
variant's mean and range (one run per variant cannot separate a difference from the run-to-run spread).

HF variants (megatron_patch/harness/hf_baseline.py): (a) fp32 master weights + bf16 autocast + torch.compile (the
numerics of our Megatron bf16 runs), (b) pure bf16 parameters + torch.compile (a speed bound). Both use fused AdamW
and gradient accumulation to the same global batch. Each runs once per `--hf-compile-modes` mode (reduce-overhead
adds CUDA graphs; a row notes graphs inductor ran without them) and `--hf-micro-batches` value, upwards until the
first out-of-memory or failure; a micro-batch that runs out of memory after earlier runs in the same process is run
again alone in a fresh one (the allocator can be fragmented by then), and that run's row is the one kept. An
`--mcore` run is skipped where a smaller micro-batch of its variant ran out of memory.

Both sides' rates are tokens over the synchronized wall time of whole iterations after warm-up (ours: the
launcher's log after its first 5 iterations; HF: after 2 steps). `--json` appends every row, OOM and failures
too, to a JSON list, so two processes (ours on GPU 0, HF on GPU 1) can run at once; `--table` prints each
side's sweep, its best, and ours / HF at best and at each micro-batch both ran. FLOPs per token and MFU:
megatron_patch/harness/throughput.py (against the device's dense bf16 peak; `--peak-tflops` for a device not
listed).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from megatron_patch.harness.hf_baseline import HFRun, hf_throughput, sweep_micro_batches
from megatron_patch.harness.iteration_log import steady_throughput
from megatron_patch.harness.mcore_runs import MCORE_RUN_FORM, McoreRun, check_losses, megatron_run, \
    run_mcore_variants
from megatron_patch.harness.throughput import HF_SIDES, Recorder, append_row, comma_list, device_name, \
    markdown_table, mfu_peak, rows_of_child


def parse_args(argv: list[str] | None = None):
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
    parser.add_argument("--mcore", action="append", default=None, metavar=MCORE_RUN_FORM,
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
    return parser.parse_args(argv)


def run_mcore(args, record: Recorder) -> None:
    def launch(run, out: Path) -> str:
        return megatron_run(args.size, args.seq_len, run.micro, args.global_batch, args.data, args.tokenizer,
                            args.iters, out, run.env, args.tp, args.nproc, run.precision)

    run_mcore_variants(args.mcore or [f"fused:{args.micro_batch}"], launch,
                       Path(args.out) / f"{args.size}-{args.seq_len}", record,
                       lambda log: (*steady_throughput(log), {}), f"TP{args.tp} DP{args.nproc // args.tp}")


def hf_alone(args, letter: str, mode: str, micro: int) -> str:
    """One HF run (variant, compile mode, micro-batch) by this script in a new process; its row goes to --json as
    its own run's would. Returns the row's status."""
    command = [sys.executable, "-m", "benchmarks.train_throughput", "--size", args.size, "--seq-len",
               str(args.seq_len), "--global-batch", str(args.global_batch), "--hf-steps", str(args.hf_steps),
               "--skip-mcore", "--hf", letter, "--hf-compile-modes", mode, "--hf-micro-batches", str(micro)] \
        + (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])
    rows = rows_of_child(command, Path(__file__).resolve().parents[1])
    for row in rows:
        if args.json:
            append_row(args.json, row)
    return rows[-1]["status"] if rows else "failed"


def run_hf(args, record: Recorder, micro_batches: list[int]) -> None:
    ran = False
    for letter in args.hf:
        for mode in args.hf_compile_modes:
            def measure(micro: int):
                run = HFRun(args.size, args.seq_len, micro, args.global_batch, letter == "b", mode)
                return hf_throughput(run, args.hf_steps, 2)

            ran = sweep_micro_batches(
                micro_batches, measure, lambda micro: hf_alone(args, letter, mode, micro),
                lambda micro, *rest, **note: record(HF_SIDES[letter], f"compile {mode}", micro, *rest, **note), ran)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
    record = Recorder(args.size, args.seq_len, args.global_batch, args.json, args.peak_tflops)
    print("versions: " + " | ".join(f"{k} {v}" for k, v in record.stack.items()), flush=True)
    print(f"device: {device_name()} | {mfu_peak(device_name(), args.peak_tflops)[1]} | Qwen2.5-{args.size} | seq "
          f"{args.seq_len} | micro-batch {args.micro_batch} | global batch {args.global_batch} | "
          f"{record.size.training_flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token", flush=True)
    if args.loss_check_iters:
        runs = [McoreRun.parse(text) for text in args.mcore or
                [f"plain:{args.micro_batch}", f"fused:{args.micro_batch}", f"fused:{args.micro_batch}:graph"]]
        check_losses(runs, args.loss_check_repeats, args.loss_check_iters, args.loss_check_warmup,
                     lambda run, label, warmup: megatron_run(
                         args.size, args.seq_len, run.micro, args.global_batch, args.data, args.tokenizer,
                         args.loss_check_iters, Path(args.out) / f"losscheck-{label.replace(' ', '')}", run.env,
                         args.tp, args.nproc, run.precision, warmup))
        return
    if not args.skip_mcore:
        run_mcore(args, record)
    if not args.skip_hf:
        run_hf(args, record, hf_micro_batches)


if __name__ == "__main__":
    main()
