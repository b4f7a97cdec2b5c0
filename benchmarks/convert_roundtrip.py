"""HF -> Megatron -> HF round trip of a random-init Qwen2.5 through the user-facing convertor scripts, timed
beside a plain safetensors load-and-save of the same weights (the floor for any conversion).

    python -m benchmarks.convert_roundtrip --size 0.5B --use-cuda true --tokenizer DIR --work /tmp/convert

Prints wall time and peak host memory (max RSS of the process tree) of each step, and checks that every
tensor comes back bit-exact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(name: str, cmd: list[str]) -> None:
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - start
    if status != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr.read()[-3000:]}")
    print(f"{name:44s} {seconds:7.1f} s   peak host RSS {usage.ru_maxrss / 1024 ** 2:6.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5B")
    parser.add_argument("--use-cuda", default="true")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--work", default="/tmp/convert_roundtrip")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from megatron_patch.hf_checkpoint import write_random_hf_checkpoint

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    hf, mcore, back, plain = work / "hf", work / "mcore", work / "back", work / "plain"
    write_random_hf_checkpoint(args.size, hf, dtype="bfloat16", tokenizer_dir=args.tokenizer)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"Qwen2.5-{args.size} bf16 round trip on {device}, USE_CUDA={args.use_cuda}")
    plain.mkdir(parents=True)
    measure("plain safetensors load + save (baseline)", [
        sys.executable, "-c",
        "import sys; from safetensors.torch import load_file, save_file; "
        "save_file(load_file(sys.argv[1]), sys.argv[2])", str(hf / "model.safetensors"), str(plain / "model.safetensors")])
    script = "toolkits/distributed_checkpoints_convertor/scripts/qwen2_5/run_8xH20.sh"
    measure("HF -> Megatron (run_8xH20.sh MG2HF=false)",
            ["bash", script, args.size, str(hf), str(mcore), "false", args.use_cuda, "bf16"])
    measure("Megatron -> HF (run_8xH20.sh MG2HF=true)",
            ["bash", script, args.size, str(mcore), str(back), "true", args.use_cuda, "bf16", str(hf)])

    original = load_file(hf / "model.safetensors")
    returned = {}
    for shard in sorted(back.glob("*.safetensors")):
        returned.update(load_file(shard))
    assert set(returned) == set(original), set(original) ^ set(returned)
    mismatched = [k for k in original if not torch.equal(original[k], returned[k])]
    assert not mismatched, f"tensors changed: {mismatched[:5]}"
    print(f"bit-exact round trip: {len(original)} tensors")


if __name__ == "__main__":
    main()
