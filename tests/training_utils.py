"""Launch the real training entrypoint on the CPU (ranks started as torchrun starts them) and read back its
per-iteration losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron_patch.hardware import free_port  # noqa: F401  (tests import it from here)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONVERTOR = REPO_ROOT / "toolkits" / "distributed_checkpoints_convertor"
OLD_CONVERTOR_SCRIPT = CONVERTOR / "hf2mcore_qwen2.5_convertor.sh"

# Layouts that train from one converted checkpoint (the `layout_runs` fixture): name -> (processes, flags).
LAYOUTS = {
    "tp1": (1, []),
    "tp1_plain_kernels": (1, ["--plain-kernels"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2_distributed_optimizer": (2, ["--use-distributed-optimizer"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "dp2": (2, []),  # without the distributed optimizer
    "tp1_bf16": (1, ["--bf16"]),
    # AC=sel and AC=full with MP_AC_METHOD=block (uniform: test_context_parallel's cp2_pp2_do_ac_full)
    "tp1_recompute_selective": (1, ["--recompute-activations"]),
    "tp1_recompute_block": (1, ["--recompute-granularity", "full", "--recompute-method", "block",
                                "--recompute-num-layers", "1"]),
}
LAYOUT_ITERS = 3


def tiny_mock_args(iters: int, seq_length: int = 64, micro_batch: int = 2, global_batch: int = 4) -> list[str]:
    return [
        "--model-size", "tiny",
        "--micro-batch-size", str(micro_batch), "--global-batch-size", str(global_batch),
        "--seq-length", str(seq_length),
        "--train-iters", str(iters), "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--dataset-type", "mock", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "151643",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100000",
        "--seed", "1234", "--calculate-per-token-loss", "--ckpt-format", "torch_dist",
    ]


def run_entrypoint(workdir: Path, nproc: int, args: list[str], timeout: int = 600, check: bool = True):
    """The entrypoint's ranks (python -m megatron_patch.pretrain_qwen) with TensorBoard under workdir/tb; returns
    a CompletedProcess of all ranks' output. Started as torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR/PORT; rank 0 hosts the store) without torchrun's own process: its torch import is 3-4 s of a
    CPU per run. As torchrun does, a rank that fails ends the others. The launcher's tests use real torchrun."""
    import signal
    import tempfile
    import time

    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "megatron_patch.pretrain_qwen", *args,
           "--tensorboard-dir", str(workdir / "tb"), "--tensorboard-log-interval", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)),
               WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        ranks = [subprocess.Popen(cmd, cwd=workdir, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                  stdout=out, stderr=err, text=True, start_new_session=True)
                 for rank in range(nproc)]
        deadline, returncode = time.monotonic() + timeout, 0
        try:
            while any(rank.poll() is None for rank in ranks):
                failed = [rank.returncode for rank in ranks if rank.returncode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    returncode = failed[0] if failed else -signal.SIGKILL
                    break
                time.sleep(0.1)
        finally:
            for rank in ranks:
                if rank.poll() is None:
                    os.killpg(rank.pid, signal.SIGKILL)
                rank.wait()
        returncode = returncode or next((rank.returncode for rank in ranks if rank.returncode), 0)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    (workdir / "train.log").write_text(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"training failed (exit {proc.returncode}); log tail:\n{tail}")
    return proc


def run_tool(cmd: list, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A toolkit script or CLI in a subprocess (Megatron keeps its setup in process globals)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="2")
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def tensorboard_losses(workdir: Path, tag: str = "lm loss") -> dict[int, float]:
    """{iteration: loss} from the TensorBoard events the run wrote under workdir/tb (full float precision)."""
    from gpu_matrix import tensorboard_losses as read_events

    return read_events(workdir / "tb", tag)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without the launcher's knobs or a scheduler's variables, plus `extra`."""
    knobs = ("MP_", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "KUBERNETES_CONTAINER_RESOURCE_GPU")
    env = {k: v for k, v in os.environ.items() if not k.startswith(knobs)}
    env.update(extra)
    return env
