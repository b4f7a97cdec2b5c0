"""Hugging Face transformers training throughput with FSDP2 (`fully_shard`) on N GPUs: the baseline for our
multi-GPU Megatron runs.

    torchrun --nproc-per-node 4 benchmarks/hf_fsdp_throughput.py --size 7B --seq-len 2048 --micro-batch 1 \
        --global-batch 32 [--steps 4] [--warmup 2] [--variant a|b] [--activation-checkpointing] [--compile]

Variants: (a) fp32 master weights, FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (the numerics
of our Megatron bf16 runs); (b) model cast to bf16, params and gradient reduction in bf16 (a speed bound). Each
decoder layer is its own FSDP2 unit, the root (embeddings, final norm, output layer) one more. Random-init
Qwen2ForCausalLM, random tokens, fused AdamW, gradient accumulation to --global-batch (summed over all ranks).
Without CUDA it runs on CPU with gloo (for smoke tests with --size tiny). MFU as in train_throughput.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))  # the report line, FLOP count and JSON rows of train_throughput.py

import train_throughput  # noqa: E402

report, mfu_peak = train_throughput.report, train_throughput.mfu_peak

from megatron_patch.hf_checkpoint import hf_config_for  # noqa: E402
from megatron_patch.model_sizes import get_size  # noqa: E402


def main() -> None:
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
                        help="append the result row (or the OOM) to this JSON list, as train_throughput.py --json")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))  # checked before the process group starts, so every rank exits
    if args.global_batch % (args.micro_batch * world):
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by --micro-batch {args.micro_batch} "
                         f"x {world} ranks: pass a --global-batch that is a multiple of {args.micro_batch * world}")
    accumulation = args.global_batch // (args.micro_batch * world)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank = dist.get_rank()
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_flops, peak_words = mfu_peak(device_name, args.peak_tflops)
    if rank == 0:
        print(f"device: {device_name} | world size {world} | "
              f"Qwen2.5-{args.size} | seq {args.seq_len} | micro-batch {args.micro_batch} | global batch "
              f"{args.global_batch} ({accumulation} accumulation steps) | "
              f"{get_size(args.size).training_flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token | {peak_words}",
              flush=True)

    from transformers import Qwen2ForCausalLM

    pure_bf16 = args.variant == "b"
    size = get_size(args.size)
    config = hf_config_for(size, "bfloat16" if pure_bf16 else "float32")
    config._attn_implementation = "sdpa"
    # On meta: no rank holds the full model; weights are created shard by shard by to_empty below.
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16 if pure_bf16 else torch.float32)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant torch checkpoint around each decoder layer's forward
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16 if pure_bf16 else torch.float32)
    for layer in model.model.layers:
        if args.compile:
            layer.compile()  # in place, so FSDP2's hooks (skipped by dynamo) stay on the module
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)  # embeddings, final norm and lm_head (tied to the embeddings for <= 3B)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.apply(model._init_weights)  # HF's init (normal std 0.02, norms 1, RoPE inv_freq), shard by shard
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if cuda else {"foreach": True}))
    tokens = torch.randint(0, 151643, (args.micro_batch, args.seq_len), device=device)

    def step():
        for i in range(accumulation):
            model.set_requires_gradient_sync(i == accumulation - 1)  # reduce-scatter only after the last micro-batch
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    options = f"{' + AC' if args.activation_checkpointing else ''}{' + compile' if args.compile else ''}, " \
        f"{world} {'GPUs' if cuda else 'CPU ranks'}"
    variant = f"FSDP2{options}"
    side = train_throughput.HF_SIDES[args.variant]

    def store(figures: dict, status: str, note: str = "") -> None:
        if args.json and rank == 0:
            train_throughput.append_row(args.json, train_throughput.result_row(
                side, variant, args.micro_batch, figures, status, note, args.size, args.seq_len, args.global_batch,
                train_throughput.versions()))

    try:
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError as error:  # a row of the sweep; torchrun ends the other ranks
        print(f"rank {rank}: out of memory at micro-batch {args.micro_batch}", flush=True)
        store({"tokens_per_s_per_gpu": None, "tflops": None, "mfu": None, "peak_gib": None}, "OOM",
              str(error).splitlines()[0])
        raise SystemExit(1) from None
    elapsed = time.perf_counter() - start
    if rank == 0:
        peak = torch.cuda.max_memory_allocated() / 1024 ** 3 if cuda else 0.0
        name = ("HF FSDP2 (b) pure bf16" if pure_bf16 else "HF FSDP2 (a) fp32 master + bf16 params") + \
            f"{options}, mb {args.micro_batch}"
        figures = report(name, args.steps * args.global_batch * args.seq_len / elapsed / world, size, args.seq_len,
                         peak, peak_flops)
        store(figures, "ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
