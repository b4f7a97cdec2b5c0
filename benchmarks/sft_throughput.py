"""Fine-tuning throughput on one GPU, best against best: our packed SFT (full or LoRA) against Hugging Face
transformers (+ peft for LoRA), on real instruction data packed to the sequence length. Rates are REAL tokens per
second: every sample token, the rows' padding left out, counted the same way on both sides.

    python -m benchmarks.sft_throughput --prepare-only       # here: records, tokenizer, packed rows into --assets
    python -m benchmarks.sft_throughput --size 1.5B [--lora 16] [--micro-batches 2,4,8] [--global-batch 8] \\
        [--mcore fused:4:graph ...] [--hf a:liger ...] [--ac full] [--optimizer-offload static] [--budget-s 420] \\
        [--json ROWS.json] [--skip-mcore | --skip-hf]
    python -m benchmarks.sft_throughput --table ROWS.json    # the Markdown table of stored rows, no runs

Data: LLaMA-Factory's alpaca_en_demo and alpaca_zh_demo records (its PyPI sdist, 2,000 records), through our chat
template and packer as `MP_DATASET_TYPE=raw MP_SFT_PACKING=true` reads them (megatron_patch/harness/sft_rows.py);
the HF side trains the very same rows in the same order, padding-free (position ids restarting in every sample,
no cache: transformers 5 then masks each sample off, block-diagonally), so both count the same real tokens.

Ours: each `--mcore KERNELS:MICRO_BATCH[:graph][:fp8-RECIPE...]` (megatron_patch/harness/mcore_runs.py) is one
launcher run from random init (LoRA: from a random HF folder written once into --out), no checkpoint saved;
default `fused:MB` (variable-length flash attention, eager) and `fused:MB:graph` (one CUDA graph replaying the
samples' boundaries in fixed-size buffers) for each --micro-batches value, and with Transformer Engine `fused:MB:fp8-tensorwise` too
(packed SFT in fp8: TE takes the samples' boundaries). A graphed run that fails (not out of memory) runs again
without the graph. Its rate: the real tokens of the iterations after the first --skip logged ones over their time.

HF: each `--hf LETTER[:flex][:liger]` sweeps --micro-batches upwards to the first OOM, in a process of its own
(Liger patches transformers for the process): (a) fp32 master weights + bf16 autocast, (b) pure bf16 (LoRA: a
bf16 base, fp32 or bf16 adapters); torch.compile; `flex` asks transformers for flex_attention (a block mask that
skips the blocks between samples) instead of SDPA, `liger` adds Liger's Qwen2 kernels (fused linear +
cross-entropy, RMSNorm, SwiGLU, RoPE). Default: a:liger, b:liger. MFU counts attention over the samples' lengths.

--budget-s starts no run (and no HF micro-batch) after that many seconds, the one under way finishing, so one
command fits a time limit; the table of what ran is printed at the end, and every row goes to --json as it ends.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from megatron_patch.hardware import transformer_engine_importable
from megatron_patch.harness.hf_baseline import HFRun, hf_throughput, sweep_micro_batches
from megatron_patch.harness.iteration_log import host_peak_gib, steady_throughput
from megatron_patch.harness.mcore_runs import MCORE_RUN_FORM, McoreRun, megatron_run, run_mcore_variants
from megatron_patch.harness.sft_rows import PackedRows, SFTAssets, prepare_sft_assets, real_tokens_per_s
from megatron_patch.harness.throughput import HF_SIDES, Recorder, comma_list, device_name, markdown_table, \
    mfu_peak, rows_of_child

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = REPO / "output" / "sft-bench-assets"  # /output/ is git-ignored; carry it to the device
HF_FORM = "LETTER[:flex][:liger]"


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare-only", action="store_true", help="write the records, tokenizer and rows, stop")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    parser.add_argument("--size", default="1.5B")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=8, help="rows per step, both sides")
    parser.add_argument("--micro-batches", type=comma_list(int), default=[2, 4, 8], metavar="MB,MB,...")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK", help="LoRA rank on every linear layer "
                        "(alpha 2 x rank) on both sides; 0: full fine-tuning")
    parser.add_argument("--ac", default="false", choices=["false", "sel", "full"],
                        help="activation recompute: ours AC=..., HF gradient checkpointing for sel/full")
    parser.add_argument("--optimizer-offload", default="false", choices=["false", "static", "auto"])
    parser.add_argument("--mcore", action="append", metavar=MCORE_RUN_FORM, help="one of our runs (repeatable)")
    parser.add_argument("--hf", action="append", metavar=HF_FORM, help="one HF variant's sweep (repeatable)")
    parser.add_argument("--skip-mcore", action="store_true")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--iters", type=int, default=12, help="our runs' iterations")
    parser.add_argument("--skip", type=int, default=5, help="our logged iterations left out of the rate")
    parser.add_argument("--hf-steps", type=int, default=4)
    parser.add_argument("--hf-warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=420, help="start no run after this many seconds")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sft_throughput"), help="run folders, LoRA's base")
    parser.add_argument("--peak-tflops", type=float, help="MFU peak (dense bf16) for a device not in the table")
    parser.add_argument("--json", type=Path, metavar="PATH", help="append every result row to this JSON list")
    parser.add_argument("--table", type=Path, nargs="+", metavar="PATH", help="print the table of these rows")
    parser.add_argument("--hf-alone", metavar=HF_FORM, help=argparse.SUPPRESS)  # one HF sweep, this process
    return parser.parse_args(argv)


def hf_variant(text: str) -> tuple[str, dict, str]:
    """--hf LETTER[:flex][:liger] -> (letter, HFRun fields, the table's variant name)."""
    letter, *options = text.split(":")
    if letter not in HF_SIDES or not set(options) <= {"flex", "liger"} or len(set(options)) != len(options):
        raise SystemExit(f"--hf {text}: expected {HF_FORM}, e.g. a:liger or b:flex:liger")
    fields = {"attention": "flex_attention" if "flex" in options else "sdpa", "liger": "liger" in options}
    return letter, fields, fields["attention"] + (" + Liger" if fields["liger"] else "") + ", compile"


def common_flags(args) -> list[str]:
    """What a child process of this benchmark needs to measure what this one would."""
    flags = ["--assets", str(args.assets), "--size", args.size, "--seq-len", str(args.seq_len), "--global-batch",
             str(args.global_batch), "--lora", str(args.lora), "--ac", args.ac, "--hf-steps", str(args.hf_steps),
             "--hf-warmup", str(args.hf_warmup)]
    return flags + (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])


def hf_sweep(args, record: Recorder, text: str) -> None:
    """One HF variant over --micro-batches, in this process (the --hf-alone child)."""
    letter, fields, name = hf_variant(text)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke test of the command
    data = PackedRows(SFTAssets(args.assets).rows_file(args.seq_len), args.global_batch, device)
    name += f", LoRA r{args.lora}" if args.lora else ""
    deadline = time.time() + args.budget_s  # the parent's budget left when it started this process

    def measure(micro: int):
        if time.time() > deadline:
            raise TimeoutError("not run: the --budget-s was spent")
        run = HFRun(args.size, args.seq_len, micro, args.global_batch, letter == "b",
                    activation_checkpointing=args.ac != "false", lora_rank=args.lora, **fields)
        return hf_throughput(run, args.hf_steps, args.hf_warmup, data=data)

    def alone(micro: int) -> str:
        rows = rows_of_child([sys.executable, "-m", "benchmarks.sft_throughput", *common_flags(args),
                              "--hf-alone", text, "--micro-batches", str(micro)], REPO)
        for row in rows:
            record.keep(row)
        return rows[-1]["status"] if rows else "failed"

    sweep_micro_batches(args.micro_batches, measure, alone,
                        lambda micro, *rest, **note: record(HF_SIDES[letter], name, micro, *rest, **note), False)


def run_hf(args, record: Recorder, may_start, started: float) -> None:
    for text in args.hf or ["a:liger", "b:liger"]:
        if not may_start():
            print(f"--hf {text}: skipped, out of time", flush=True)
            continue
        left = args.budget_s - (time.time() - started)
        rows = rows_of_child([sys.executable, "-m", "benchmarks.sft_throughput", *common_flags(args), "--hf-alone",
                              text, "--micro-batches", ",".join(map(str, args.micro_batches)), "--budget-s",
                              f"{left:.0f}"], REPO)
        for row in rows:
            record.keep(row)
        if not rows:  # it died before its first row (an import, a crash): still a row of the table
            letter, _, name = hf_variant(text)
            record(HF_SIDES[letter], name, args.micro_batches[0], "failed",
                   note="the HF process ended without a result; its output above says why")


def lora_base(args, assets: SFTAssets) -> str:
    """A random Qwen2.5 HF folder of --size (5 GB bf16 shards, written once per --out): LoRA's frozen base, which
    each rank reads straight from the safetensors files (PRETRAIN_CHECKPOINT_PATH = the folder)."""
    from megatron_patch.harness.matrix_assets import write_random_hf_folder

    folder = args.out / f"hf-{args.size}"
    if not (folder / "config.json").is_file():
        start = time.time()
        write_random_hf_folder(args.size, folder, assets.tokenizer)
        print(f"LoRA base: random HF Qwen2.5-{args.size} written in {time.time() - start:.0f} s", flush=True)
    return str(folder)


def run_ours(args, assets: SFTAssets, rows: PackedRows, record: Recorder, may_start) -> None:
    te = transformer_engine_importable()
    # Eager and graphed both: the graph saves host time, its fixed-size boundaries cost the kernel empty samples
    texts = args.mcore or [f"fused:{mb}{graph}" for mb in args.micro_batches for graph in ("", ":graph")] + \
        [f"fused:{mb}:fp8-tensorwise" for mb in args.micro_batches if te and not args.lora]
    if not te and not args.mcore:
        print("packed SFT in fp8: not run, Transformer Engine is not importable here", flush=True)
    env = {"MP_DATASET_TYPE": "raw", "MP_SFT_PACKING": "true"}
    if args.lora:
        env.update(MP_LORA_RANK=str(args.lora), MP_LORA_ALPHA=str(2 * args.lora))
    base = lora_base(args, assets) if args.lora else None

    def launch(run, out: Path) -> str:
        return megatron_run(args.size, args.seq_len, run.micro, args.global_batch, str(assets.records),
                            str(assets.tokenizer), args.iters, out, {**env, **run.env}, precision=run.precision,
                            SFT=True, LR=1e-5, MIN_LR=1e-6, AC=args.ac, OPTIMIZER_OFFLOAD=args.optimizer_offload,
                            PRETRAIN_CHECKPOINT_PATH=base)

    def measure(log: str) -> tuple[float, float, dict]:
        return real_tokens_per_s(log, rows, args.skip), steady_throughput(log)[1], {"host_peak_gib": host_peak_gib(log)}

    layout = "packed SFT" + (f", LoRA r{args.lora}" if args.lora else "") + \
        (f", AC={args.ac}" if args.ac != "false" else "") + \
        (f", optimizer offload {args.optimizer_offload}" if args.optimizer_offload != "false" else "")
    run_mcore_variants(texts, launch, args.out / f"{args.size}-{args.seq_len}", record, measure, layout,
                       graph_fallback=True, may_start=may_start)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(markdown_table([row for path in args.table for row in json.loads(path.read_text())]))
        return
    assets = SFTAssets(args.assets)
    if any(args.global_batch % micro for micro in args.micro_batches):
        raise SystemExit(f"--micro-batches {args.micro_batches}: each must divide --global-batch {args.global_batch}")
    if args.prepare_only:
        from examples.qwen2_5.sample_corpora import alpaca_en_demo_path, alpaca_zh_demo_path

        prepare_sft_assets(args.assets, [alpaca_en_demo_path(), alpaca_zh_demo_path()], [args.seq_len])
        print(f"sft_throughput: records, tokenizer and packed rows ready in {args.assets}")
        return
    if not assets.rows_file(args.seq_len).is_file():
        raise SystemExit(f"sft_throughput: no packed rows in {args.assets} for sequence {args.seq_len}: run "
                         f"`python -m benchmarks.sft_throughput --prepare-only --seq-len {args.seq_len}` where the "
                         "package index is, and carry that folder here.")
    for text in args.hf or []:
        hf_variant(text)  # a bad variant is refused before any run
    for text in args.mcore or []:
        McoreRun.parse(text)
    rows = PackedRows(assets.rows_file(args.seq_len), args.global_batch)
    record = Recorder(args.size, args.seq_len, args.global_batch, args.json, args.peak_tflops, rows.attention_span,
                      frozen_weights=bool(args.lora))
    if args.hf_alone:
        hf_sweep(args, record, args.hf_alone)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the launchers' sessions end with this process
    print("versions: " + " | ".join(f"{k} {v}" for k, v in record.stack.items()), flush=True)
    print(f"device: {device_name()} | {mfu_peak(device_name(), args.peak_tflops)[1]} | Qwen2.5-{args.size} "
          f"{'LoRA r%d' % args.lora if args.lora else 'full'} SFT | rows of {args.seq_len}, {100 * rows.fill:.1f}% "
          f"real tokens, attention over {rows.attention_span:.0f} tokens on average | global batch "
          f"{args.global_batch} rows", flush=True)
    start = time.time()

    def may_start() -> bool:
        return time.time() - start < args.budget_s

    if not args.skip_mcore:
        run_ours(args, assets, rows, record, may_start)
    if not args.skip_hf:
        run_hf(args, record, may_start, start)
    print(f"sft_throughput: {time.time() - start:.0f} s", flush=True)
    if record.rows:
        print(markdown_table(record.rows), flush=True)


if __name__ == "__main__":
    main()
