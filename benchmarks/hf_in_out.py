"""HF in, HF out at scale (issue 36), through run_mcore_qwen.sh on this machine (one GPU, or the CPU):

    python -m benchmarks.hf_in_out prepare --size 7B --work /tmp/hf_io    # random HF folder (sharded) and data
    python -m benchmarks.hf_in_out startup --size 7B --work /tmp/hf_io    # HF folder vs convert-then-train
    python -m benchmarks.hf_in_out stall --size 1.5B --work /tmp/hf_io    # MP_SAVE_HF: stall per save
    python -m benchmarks.hf_in_out load --size 3B --work /tmp/hf_io       # the weights' load alone (CPU too)

startup: wall time from the command to iteration 1's line, and the peak host memory of the whole process tree
(summed PSS, sampled), for PRETRAIN_CHECKPOINT_PATH = the HF folder (each rank reads its shards) against
run_8xH20.sh's conversion followed by the same launch from the converted checkpoint. The HF folder was just
written (page cache warm for both; --cold drops the caches before each step, as root).

stall: one run with MP_SAVE_HF=merged (LoRA adapters merged into the base: an export as large as the full
model's) and MP_SAVE_HF_KEEP=1, saving every --save-interval iterations (choose one whose time exceeds an
export's, printed per save) (it deletes the conversion first: at 7B the
HF folder, two exports and the synchronous one take 60 GB). A save's stall is what the iterations that ran while its export
ran (those holding a save left out) took beyond the median iteration without an export; it is
set against the same export run synchronously afterwards (MG2HF of the last checkpoint, the GPU idle).

Both train LoRA adapters (--lora-rank, default 16) so that 7B fits one GPU with its optimizer; --lora-rank 0
trains every weight (7B then needs several GPUs or OPTIMIZER_OFFLOAD, and each checkpoint is 16 bytes a
parameter on disk).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_patch import hardware
from megatron_patch.harness.host_memory import TreeMemory
from megatron_patch.harness.iteration_log import megatron_iteration_times
from megatron_patch.harness.launcher_runs import clean_environ, launcher_argv, start_launcher, stop
from megatron_patch.harness.matrix_assets import CONVERTOR, prepare_assets, write_random_hf_folder

EXPORT_START = re.compile(r"writing the Hugging Face folder of iteration (\d+)")
EXPORT_END = re.compile(r"wrote \S+/iter_(\d{7}) \(([\d.]+) s\)")


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        print(f"(could not drop the page cache: {err})")


def timed(name: str, cmd: list[str], log: Path, env: dict[str, str], until: str | None = None,
          timeout: float = 3600) -> tuple[float, float, str]:
    """Run a command in its own session; (seconds until `until` appears in its output or it ends, peak host GiB
    of its tree, output). A launcher is stopped once `until` is seen."""
    start = time.monotonic()
    proc = start_launcher(cmd[1:], env, log) if cmd[0] == "launcher" else None
    if proc is None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    with TreeMemory(proc.pid) as memory:
        while proc.poll() is None and time.monotonic() - start < timeout:
            if until and until in log.read_text(errors="replace"):
                break
            time.sleep(0.1)
        seconds = time.monotonic() - start
        stop(proc) if cmd[0] == "launcher" else proc.wait()
    text = log.read_text(errors="replace")
    if until and until not in text or not until and proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(text.splitlines()[-30:]))
    print(f"  {name:52s} {seconds:8.1f} s   peak host memory {memory.peak_gib:6.2f} GiB "
          f"(largest process {memory.largest_gib:.2f})", flush=True)
    return seconds, memory.peak_gib, text


def train_args(args, checkpoint: Path, out: Path, iterations: int, save_interval: int) -> list[str]:
    assets = args.work / "assets"
    return ["launcher", *launcher_argv(
        MODEL_SIZE=args.size, BATCH_SIZE=1, GLOBAL_BATCH_SIZE=args.global_batch, LR=1e-5, MIN_LR=1e-6,
        SEQ_LEN=args.seq_len, PR="bf16", SFT=True, SAVE_INTERVAL=save_interval, DATASET_PATH=assets / "sft-train.json",
        PRETRAIN_CHECKPOINT_PATH=checkpoint, iterations=iterations, warmup_iterations=1, OUTPUT_BASEPATH=out,
        DO=hardware.gpu_count() > 0, FL=False)]


def environment(args, **extra: str) -> dict[str, str]:
    lora = {"MP_LORA_RANK": str(args.lora_rank)} if args.lora_rank else {}
    return clean_environ(MP_DATASET_TYPE="raw", MP_TOKENIZER_PATH=str(args.work / "assets" / "tokenizer"), **lora,
                         **extra)


def prepare(args) -> Path:
    assets = prepare_assets(args.work / "assets", [], documents=10, records=2000)
    hf = args.work / f"hf-{args.size}"
    if not (hf / "config.json").is_file():
        start = time.monotonic()
        write_random_hf_folder(args.size, hf, assets.tokenizer)
        print(f"wrote {hf} in {time.monotonic() - start:.0f} s", flush=True)
    return hf


def startup(args) -> None:
    hf = prepare(args)
    device = f"{hardware.gpu_count()} GPU(s)" if hardware.gpu_count() else "the CPU"
    print(f"Qwen2.5-{args.size} start-up on {device} (LoRA rank {args.lora_rank}; 0: full), to iteration 1's line:")
    first = "iteration        1/"
    logs, results = args.work / "logs", {}
    for arm in ("hf", "convert"):
        shutil.rmtree(args.work / f"out-{arm}", ignore_errors=True)
    if args.cold:
        drop_caches()
    results["hf"] = timed("HF folder straight into training", train_args(args, hf, args.work / "out-hf", 2, 10**6),
                          logs / "startup-hf.log", environment(args), until=first)
    mcore = args.work / f"mcore-{args.size}"
    shutil.rmtree(mcore, ignore_errors=True)
    if args.cold:
        drop_caches()
    use_cuda = str(hardware.gpu_count() > 0).lower()
    convert = timed("run_8xH20.sh HF -> Megatron", ["bash", str(CONVERTOR), args.size, str(hf), str(mcore), "false",
                                                   use_cuda, "bf16"], logs / "startup-convert.log", clean_environ())
    if args.cold:
        drop_caches()
    train = timed("training from the converted checkpoint", train_args(args, mcore, args.work / "out-convert", 2,
                                                                        10**6), logs / "startup-mcore.log",
                  environment(args), until=first)
    print(f"  {'convert-then-train':52s} {convert[0] + train[0]:8.1f} s   peak host memory "
          f"{max(convert[1], train[1]):6.2f} GiB")
    for line in results["hf"][2].splitlines():
        if "read from the Hugging Face folder" in line or "base weights read in" in line:
            print("  rank 0:", line.strip()[:200])


def stall(args) -> None:
    hf = prepare(args)
    out = args.work / "out-stall"
    # Disk: the HF folder, two exports at a time (MP_SAVE_HF_KEEP=1) and the synchronous one, not the conversion
    for folder in (out, args.work / f"mcore-{args.size}", args.work / "sync-export"):
        shutil.rmtree(folder, ignore_errors=True)
    saves = args.saves
    iterations = args.save_interval * (saves + 1)  # the last save's export runs after training: not a stall
    print(f"Qwen2.5-{args.size} MP_SAVE_HF=merged, a save every {args.save_interval} of {iterations} iterations:")
    log = args.work / "logs" / "stall.log"
    proc = start_launcher(train_args(args, hf, out, iterations, args.save_interval)[1:],
                          environment(args, MP_SAVE_HF="merged", MP_SAVE_HF_KEEP="1"), log)
    events: dict[tuple[str, int], float] = {}
    while proc.poll() is None:
        text = log.read_text(errors="replace")
        for kind, pattern in (("start", EXPORT_START), ("end", EXPORT_END)):
            for match in pattern.finditer(text):
                events.setdefault((kind, int(match.group(1))), time.time())
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode}); log {log}")
    report_stalls(args, out, log.read_text(errors="replace"), events)


def report_stalls(args, out: Path, text: str, events: dict[tuple[str, int], float]) -> None:
    times = megatron_iteration_times(text)
    saved = list(range(args.save_interval, max(times), args.save_interval))
    windows = {k: (events[("start", k)], events.get(("end", k), float("inf"))) for k in saved if ("start", k) in events}

    def during(i: int, window: tuple[float, float]) -> bool:
        stamp, elapsed = times[i]  # the iteration ran from stamp - elapsed to stamp
        return window[0] < stamp and stamp - elapsed < window[1]

    quiet = [times[i][1] for i in times
             if i > 3 and i - 1 not in saved and not any(during(i, w) for w in windows.values())]
    if not quiet:
        raise SystemExit(f"stall: every iteration after the 3rd ran beside an export or right after a save; raise "
                         f"--save-interval (now {args.save_interval}) above an export's time in iterations")
    base = statistics.median(quiet)
    (ckpt,) = (out / "checkpoint").iterdir()
    last = max(int(p.name[5:]) for p in ckpt.glob("iter_*"))
    command = [sys.executable, "-m", "megatron_patch.convert", "--mg2hf", "--merge-lora", "--model-size", "auto",
               "--load-dir", str(ckpt / f"iter_{last:07d}"), "--save-dir", str(args.work / "sync-export"),
               "--hf-dir", str(ckpt / "hf_source"), "--precision", "bf16", "--overwrite"]
    sync, _, _ = timed("the same export, synchronous (MG2HF --merge-lora)", command, args.work / "logs" / "sync.log",
                       clean_environ())
    print(f"  median iteration without an export: {base * 1000:.0f} ms ({len(quiet)} iterations)")
    for k, window in windows.items():
        stalled = sum(times[i][1] - base for i in times if i - 1 not in saved and during(i, window))
        print(f"  save at iteration {k}: export {window[1] - window[0]:6.1f} s in the background; training "
              f"stalled {stalled:6.2f} s = {100 * stalled / sync:.1f}% of the synchronous export ({sync:.1f} s)")


def load(args) -> None:
    """The model's weights alone, in one process each (Megatron up, the model built without its random init):
    straight from the HF folder, and from its conversion (made here first if missing)."""
    hf = prepare(args)
    mcore = args.work / f"mcore-{args.size}"
    print(f"Qwen2.5-{args.size} weights into the entrypoint's model (one process, TP1/PP1, bf16, no GPU):")
    if not (mcore / "latest_checkpointed_iteration.txt").is_file():
        command = ["bash", str(CONVERTOR), args.size, str(hf), str(mcore), "false", "false", "bf16"]
        timed("run_8xH20.sh HF -> Megatron", command, args.work / "logs" / "load-convert.log", clean_environ())
    for arm, source in (("hf", hf), ("torch_dist", mcore)):
        if args.cold:
            drop_caches()
        text = timed(f"{arm}: Megatron up, model built and loaded", [
            sys.executable, "-m", "benchmarks.hf_in_out", "load-arm", "--arm", arm, "--size", args.size, "--work",
            str(source)], args.work / "logs" / f"load-{arm}.log", clean_environ(CUDA_VISIBLE_DEVICES=""))[2]
        print("   ", next(line for line in text.splitlines() if "weights loaded in" in line))


def load_arm(args) -> None:
    import torch

    from megatron_patch.convert import mcore_runtime
    from megatron_patch.convert.hf_direct import hf_model, load_hf_weights

    size = hf_model(args.work)  # the converted folder keeps the HF config.json too
    mcore_runtime.init_megatron(size, torch.bfloat16)
    model = mcore_runtime.build_model()
    start = time.monotonic()
    load_hf_weights(model, args.work) if args.arm == "hf" else mcore_runtime.load_checkpoint_into(model, args.work)
    print(f"{args.arm}: weights loaded in {time.monotonic() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("prepare", "startup", "stall", "load", "load-arm"))
    parser.add_argument("--arm", choices=("hf", "torch_dist"), help="load-arm: the one measured")
    parser.add_argument("--size", default="7B")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf_in_out"))
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--save-interval", type=int, default=50)
    parser.add_argument("--saves", type=int, default=2, help="stall: saves whose export runs while training goes on")
    parser.add_argument("--cold", action="store_true", help="startup: drop the page cache before each step (root)")
    args = parser.parse_args()
    args.work = args.work.absolute()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"prepare": prepare, "startup": startup, "stall": stall, "load": load, "load-arm": load_arm}[args.what](args)


if __name__ == "__main__":
    main()
