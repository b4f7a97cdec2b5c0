"""Hugging Face transformers training throughput with FSDP2 (`fully_shard`) on N GPUs: the baseline for our
multi-GPU Megatron runs.

    torchrun --nproc-per-node 4 -m benchmarks.hf_fsdp_throughput --size 7B --seq-len 2048 --micro-batch 1 \\
        --global-batch 32 [--steps 4] [--warmup 2] [--variant a|b] [--activation-checkpointing] [--compile]

The loop is megatron_patch/harness/hf_baseline.py's with FSDP2: each decoder layer its own FSDP2 unit, the root
(embeddings, final norm, output layer) one more; variant (a) fp32 master weights with MixedPrecisionPolicy(bf16
params, fp32 reduction), (b) bf16 params and reduction. Gradient accumulation to --global-batch (summed over all
ranks). Without CUDA it runs on CPU with gloo (for smoke tests with --size tiny). MFU as in train_throughput.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patch.harness.hf_baseline import HFRun, hf_throughput
from megatron_patch.harness.throughput import HF_SIDES, NO_FIGURES, append_row, mfu_peak, \
    report, result_row, versions
from megatron_patch.model_sizes import get_size


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7B")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per step, summed over all ranks")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variant", choices=["a", "b"], default="a")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--peak-tflops", type=float, help="MFU peak (dense bf16) for a device not in the table")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="append the result row (or the OOM) to this JSON list, as train_throughput --json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))  # checked before the process group starts, so every rank exits
    if args.global_batch % (args.micro_batch * world):
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by --micro-batch {args.micro_batch} "
                         f"x {world} ranks: pass a --global-batch that is a multiple of {args.micro_batch * world}")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank = dist.get_rank()
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_flops, peak_words = mfu_peak(device_name, args.peak_tflops)
    if rank == 0:
        print(f"device: {device_name} | world size {world} | Qwen2.5-{args.size} | seq {args.seq_len} | micro-batch "
              f"{args.micro_batch} | global batch {args.global_batch} "
              f"({args.global_batch // (args.micro_batch * world)} accumulation steps) | "
              f"{get_size(args.size).training_flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token | {peak_words}",
              flush=True)
    options = f"{' + AC' if args.activation_checkpointing else ''}{' + compile' if args.compile else ''}, " \
        f"{world} {'GPUs' if cuda else 'CPU ranks'}"

    def store(figures: dict, status: str, note: str = "") -> None:
        if args.json and rank == 0:
            append_row(args.json, result_row(HF_SIDES[args.variant], f"FSDP2{options}", args.micro_batch, figures,
                                             status, note, args.size, args.seq_len, args.global_batch, versions()))

    run = HFRun(args.size, args.seq_len, args.micro_batch, args.global_batch, args.variant == "b",
                "default" if args.compile else None, fsdp=True, activation_checkpointing=args.activation_checkpointing)
    try:
        rate, peak, _ = hf_throughput(run, args.steps, args.warmup, device)
    except torch.OutOfMemoryError as error:  # a row of the sweep; torchrun ends the other ranks
        print(f"rank {rank}: out of memory at micro-batch {args.micro_batch}", flush=True)
        store(NO_FIGURES, "OOM", str(error).splitlines()[0])
        raise SystemExit(1) from None
    if rank == 0:
        name = ("HF FSDP2 (b) pure bf16" if run.pure_bf16 else "HF FSDP2 (a) fp32 master + bf16 params") + \
            f"{options}, mb {args.micro_batch}"
        store(report(name, rate, get_size(args.size), args.seq_len, peak, peak_flops), "ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
