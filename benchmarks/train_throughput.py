"""Training throughput on one machine: our launcher path against Hugging Face transformers, same model shape,
sequence length and global batch.

    python benchmarks/train_throughput.py --size 0.5B --seq-len 2048 --micro-batch 4 --global-batch 32 \
        --data PREFIX --tokenizer DIR [--mcore fused:8:graph --mcore plain:4] [--skip-hf] [--loss-check-iters 50]

Each `--mcore KERNELS:MICRO_BATCH[:graph]` is one launcher run: KERNELS `fused` (default path) or `plain`
(MP_FUSED_KERNELS=false: megatron-core's unfused modules and logits + cross-entropy); `graph` adds
MP_CUDA_GRAPH=true (each iteration's forward and backward replayed from one CUDA graph). `--loss-check-iters N`
instead trains N iterations of the plain path, the fused kernels and fused + graph (same seed, same data) and
prints their per-iteration losses.

HF variants: (a) fp32 master weights + bf16 autocast + torch.compile (the numerics of our Megatron bf16 runs),
(b) pure bf16 parameters + torch.compile (a speed bound). Both use fused AdamW and gradient accumulation to
the same global batch.

FLOP count (per token, forward + backward): 6 * (parameters in the transformer layers and the output layer)
+ 6 * layers * hidden * seq_len (causal attention scores and context: 12 * L * h * s halved by the mask).
MFU is against 989 TFLOP/s dense bf16 for an H100 SXM.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_patch.hardware import flash_attn_importable  # noqa: E402
from megatron_patch.model_sizes import get_size  # noqa: E402

H100_BF16_DENSE = 989e12


def flops_per_token(size, seq_len: int) -> float:
    layer_params = size.num_layers * (
        size.hidden_size * (size.hidden_size + 2 * size.num_query_groups * size.head_dim)  # q, k, v
        + size.hidden_size * size.hidden_size  # o
        + 3 * size.hidden_size * size.ffn_hidden_size  # gate, up, down
    )
    output_params = size.vocab_size * size.hidden_size
    return 6 * (layer_params + output_params) + 6 * size.num_layers * size.hidden_size * seq_len


def report(name: str, tokens_per_s: float, size, seq_len: int, peak_gib: float) -> None:
    tflops = tokens_per_s * flops_per_token(size, seq_len) / 1e12
    print(f"{name:58s} {tokens_per_s:10,.0f} tokens/s/GPU  {tflops:6.1f} TFLOP/s/GPU  "
          f"MFU {100 * tflops * 1e12 / H100_BF16_DENSE:5.1f}%  peak {peak_gib:5.1f} GiB", flush=True)


def hf_throughput(size_name: str, seq_len: int, micro: int, global_batch: int, pure_bf16: bool,
                  steps: int, warmup: int) -> tuple[float, float]:
    from transformers import Qwen2ForCausalLM

    from megatron_patch.hf_checkpoint import hf_config_for

    size = get_size(size_name)
    torch.manual_seed(0)
    config = hf_config_for(size, "bfloat16" if pure_bf16 else "float32")
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).cuda()
    if pure_bf16:
        model = model.to(torch.bfloat16)
    model.gradient_checkpointing_disable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    compiled = torch.compile(model)
    accumulation = global_batch // micro
    tokens = torch.randint(0, 151643, (micro, seq_len), device="cuda")

    def step():
        for _ in range(accumulation):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not pure_bf16):
                loss = compiled(input_ids=tokens, labels=tokens).loss / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1024 ** 3
    torch.cuda.empty_cache()
    return steps * global_batch * seq_len / elapsed, peak


def megatron_run(size_name: str, seq_len: int, micro: int, global_batch: int, data: str, tokenizer: str,
                 iters: int, out: Path, extra_env: dict[str, str], tp: int = 1, nproc: int = 1) -> str:
    """Our launcher path (random init, pre-training on an idxmap); returns its log."""
    # FL: flash attention; with TE it needs flash-attn, else TE's cuDNN fused attention (FL=false).
    flash = flash_attn_importable() or not importlib.util.find_spec("transformer_engine")
    args = ["dsw", size_name, str(micro), str(global_batch), "1e-4", "1e-5", str(seq_len), str(seq_len), "bf16",
            str(tp), "1", "1", str(tp > 1).lower(), "true", str(flash).lower(), "false", "false", "false",
            "100000", data, data, "none",
            str(iters * global_batch * seq_len), "0", str(out)]
    env = {**os.environ, "MP_TOKENIZER_PATH": tokenizer, "MP_NPROC_PER_NODE": str(nproc), **extra_env}
    out.mkdir(parents=True, exist_ok=True)
    last_iteration = f"[qwen] iteration {iters:8d}"
    # Written as it runs, so a run cut short still leaves its log. Stopped once the last iteration is logged:
    # the final checkpoint save (tens of seconds at 1.5B) measures the disk, not training.
    with open(out / "megatron.log", "w") as log_file:
        proc = subprocess.Popen(["sh", str(REPO / "examples/qwen2_5/run_mcore_qwen.sh"), *args], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
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
        raise SystemExit("megatron run failed:\n" + "\n".join(log.splitlines()[-30:]))
    return log


def throughput_from_log(log: str) -> tuple[float, float]:
    """Mean tokens/s/GPU after the first 5 iterations, and peak memory."""
    rates = [float(v.replace(",", "")) for v in re.findall(r"tokens/s/GPU: ([0-9,]+)", log)]
    peaks = [float(v) for v in re.findall(r"memory allocated/peak/reserved \(GiB\): [0-9.]+/([0-9.]+)", log)]
    steady = rates[5:] or rates
    return sum(steady) / len(steady), max(peaks or [0.0])


def kernel_env(kernels: str, graph: bool = False) -> dict[str, str]:
    """fused: our kernels (the default path); plain: megatron-core's modules; graph: MP_CUDA_GRAPH=true."""
    if kernels not in ("fused", "plain"):
        raise SystemExit(f"--mcore: unknown kernels {kernels!r} (fused or plain)")
    return {"MP_FUSED_KERNELS": str(kernels == "fused").lower(), "MP_CUDA_GRAPH": str(graph).lower()}


def losses_from_log(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"lm loss: ([0-9.E+-]+)", log)]


def check_losses(args) -> None:
    """The plain path, the fused kernels and fused + CUDA graph from the same seed: per-iteration loss
    differences against the plain path over the first N iterations."""
    curves = {}
    for name, env in (("plain", kernel_env("plain")), ("fused", kernel_env("fused")),
                      ("fused+graph", kernel_env("fused", graph=True))):
        log = megatron_run(args.size, args.seq_len, args.micro_batch, args.global_batch, args.data, args.tokenizer,
                           args.loss_check_iters, Path(args.out) / f"losscheck-{name.replace('+', '-')}", env)
        curves[name] = losses_from_log(log)
    plain = curves["plain"]
    print(f"loss check, {len(plain)} iterations: plain {plain[0]:.4f} -> {plain[-1]:.4f}", flush=True)
    for name in ("fused", "fused+graph"):
        diffs = [abs(a - b) for a, b in zip(curves[name], plain)]
        print(f"  {name:12s} {curves[name][0]:.4f} -> {curves[name][-1]:.4f}; max |difference| from plain "
              f"{max(diffs):.4f} (iteration {diffs.index(max(diffs)) + 1}), mean {sum(diffs) / len(diffs):.4f}",
              flush=True)
    for name, curve in curves.items():
        print(f"{name}:", " ".join(f"{v:.4f}" for v in curve), flush=True)


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
    parser.add_argument("--mcore", action="append", default=None, metavar="KERNELS:MICRO_BATCH[:graph]",
                        help="a launcher run: fused|plain and its micro-batch (default fused:<--micro-batch>)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=1, help="GPUs for the Megatron runs (DP = nproc / tp)")
    parser.add_argument("--loss-check-iters", type=int, default=0)
    args = parser.parse_args()
    # SIGTERM (timeout, a scheduler) as an exception, so the launcher runs' process sessions are ended too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    size = get_size(args.size)
    print(f"device: {torch.cuda.get_device_name()} | Qwen2.5-{args.size} | seq {args.seq_len} | micro-batch "
          f"{args.micro_batch} | global batch {args.global_batch} | {flops_per_token(size, args.seq_len) / 1e9:.2f} "
          "GFLOP/token", flush=True)
    if args.loss_check_iters:
        check_losses(args)
        return
    te = "TE spec" if importlib.util.find_spec("transformer_engine") else "local spec"
    for run in [] if args.skip_mcore else args.mcore or [f"fused:{args.micro_batch}"]:
        kernels, micro, *graph = run.split(":")
        if graph not in ([], ["graph"]):
            raise SystemExit(f"--mcore {run}: expected KERNELS:MICRO_BATCH or KERNELS:MICRO_BATCH:graph")
        try:
            log = megatron_run(args.size, args.seq_len, int(micro), args.global_batch, args.data, args.tokenizer,
                               args.iters, Path(args.out) / f"mcore-{args.size}-{args.seq_len}-{run.replace(':', '-')}",
                               kernel_env(kernels, bool(graph)), args.tp, args.nproc)
        except SystemExit as failed:  # report it and go on with the other runs
            print(f"--mcore {run}: {failed}", flush=True)
            continue
        rate, peak = throughput_from_log(log)
        report(f"megatron_patch {te}, {kernels}{' + CUDA graph' if graph else ''}, TP{args.tp} "
               f"DP{args.nproc // args.tp}, mb {micro}", rate, size, args.seq_len, peak)
    if not args.skip_hf:
        for pure in [variant == "b" for variant in args.hf]:
            rate, peak = hf_throughput(args.size, args.seq_len, args.micro_batch, args.global_batch, pure,
                                       args.hf_steps, warmup=2)
            name = "HF (b) pure bf16 + compile" if pure else "HF (a) fp32 master + bf16 autocast + compile"
            report(name, rate, size, args.seq_len, peak)


if __name__ == "__main__":
    main()
