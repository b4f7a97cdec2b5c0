"""Launch the real training entrypoint on the CPU (ranks started as torchrun starts them, forked from a warm
process) and read back its per-iteration losses."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from megatron_patch.harness.iteration_log import tensorboard_scalars
from megatron_patch.hardware import free_port, omp_threads  # noqa: F401  (tests import free_port from here)

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
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),  # = TP2_PP2
    "dp2": (2, []),  # without the distributed optimizer
    "tp1_bf16": (1, ["--bf16"]),
    # AC=sel and AC=full with MP_AC_METHOD=block (uniform: test_context_parallel's cp2_pp2_do_ac_full)
    "tp1_recompute_selective": (1, ["--recompute-activations"]),
    "tp1_recompute_block": (1, ["--recompute-granularity", "full", "--recompute-method", "block",
                                "--recompute-num-layers", "1"]),
}
LAYOUT_ITERS = 3
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
UNTIED = ["--untie-embeddings-and-output-weights"]
# Training straight from a Hugging Face folder against convert-then-train (the `hf_layout_runs` fixture):
# name -> (processes, flags, the conftest fixture of the starting weights: a converted checkpoint is passed as
# --pretrained-checkpoint, a HF folder as --pretrained-hf). The tied single-file model's convert-then-train runs
# are LAYOUTS' tp1 and tp2_pp2; the untied model is sharded.
HF_LAYOUTS = {
    "hf_tp1": (1, [], "tiny_hf_checkpoint"),
    "hf_tp2_pp2": (4, TP2_PP2, "tiny_hf_checkpoint"),
    "untied_hf_tp1": (1, UNTIED, "tiny_untied_hf_sharded"),
    "untied_hf_tp2_pp2": (4, TP2_PP2 + UNTIED, "tiny_untied_hf_sharded"),
    "untied_tp1": (1, UNTIED, "converted_tiny_untied"),
    "untied_tp2_pp2": (4, TP2_PP2 + UNTIED, "converted_tiny_untied"),
}


def starting_weights(folder: Path) -> list[str]:
    """The entrypoint's flag for a layout's starting weights: a HF folder or a converted checkpoint."""
    from megatron_patch.hf_checkpoint import is_hf_checkpoint

    return ["--pretrained-hf" if is_hf_checkpoint(folder) else "--pretrained-checkpoint", str(folder)]


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


class WarmRanks:
    """The harness's side of tests/warm_ranks.py: one warm process per test session that forks ranks."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("warm_ranks.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT,
                                     env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
        self.changed = threading.Condition()
        self.started: dict[int, int] = {}  # request id -> pid
        self.ended: dict[int, int] = {}  # pid -> return code
        self.requests = itertools.count()
        threading.Thread(target=self._read_replies, daemon=True).start()
        atexit.register(self.proc.stdin.close)  # its end once the tests are done

    def _read_replies(self) -> None:
        for line in self.proc.stdout:
            reply = json.loads(line)
            with self.changed:
                if "pid" in reply:
                    self.started[reply["id"]] = reply["pid"]
                else:
                    self.ended[reply["exit"]] = reply["code"]
                self.changed.notify_all()
        with self.changed:  # the warm process ended: no rank of it will be reported again
            self.proc.wait()
            self.changed.notify_all()

    def start(self, argv: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path) -> int:
        request = next(self.requests)
        with self.changed:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the warm rank process ended (exit {self.proc.returncode}); see the test's stderr")
            self.proc.stdin.write(json.dumps({"id": request, "argv": argv, "env": env, "cwd": str(cwd),
                                              "stdout": str(stdout), "stderr": str(stderr)}).encode() + b"\n")
            self.proc.stdin.flush()
            self.changed.wait_for(lambda: request in self.started or self.proc.poll() is not None, timeout=60)
            if request not in self.started:
                raise RuntimeError("the warm rank process did not fork the rank")
            return self.started.pop(request)

    def returncode(self, pid: int) -> int | None:
        with self.changed:
            return self.ended.get(pid)

    def wait(self, pid: int, timeout: float = 60) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.ended or self.proc.poll() is not None, timeout=timeout)
            return self.ended.pop(pid, None)


_warm_ranks: list[WarmRanks] = []
_warm_ranks_lock = threading.Lock()


def warm_ranks() -> WarmRanks:
    """The session's warm process, started by the first launch (tests start launches from two threads at once)."""
    with _warm_ranks_lock:
        if not _warm_ranks:
            _warm_ranks.append(WarmRanks())
        return _warm_ranks[0]


def run_entrypoint(workdir: Path, nproc: int, args: list[str], timeout: int = 600, check: bool = True,
                   env: dict[str, str] | None = None):
    """The entrypoint's ranks (megatron_patch.pretrain_qwen's entry) with TensorBoard under workdir/tb; returns a
    CompletedProcess of all ranks' output. Started as torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR/PORT; rank 0 hosts the store), each forked from the session's warm process (tests/warm_ranks.py:
    the imports every rank repeats are done once), without torchrun's own process. As torchrun does, a rank that
    fails ends the others. The launcher's tests start ranks through real torchrun. `env`: more environment for
    this launch's ranks only (os.environ is every launch's)."""
    import signal
    import tempfile
    import time

    workdir.mkdir(parents=True, exist_ok=True)
    argv, env = _entrypoint_argv(workdir, args), _ranks_env(nproc) | (env or {})
    server = warm_ranks()
    with tempfile.TemporaryDirectory() as outputs:
        out, err = Path(outputs) / "stdout", Path(outputs) / "stderr"
        ranks, deadline, returncode = [], time.monotonic() + timeout, 0
        try:
            for rank in range(nproc):
                ranks.append(server.start(argv, dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), workdir, out, err))
            while any(server.returncode(pid) is None for pid in ranks):
                failed = [code for code in map(server.returncode, ranks) if code not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    returncode = failed[0] if failed else -signal.SIGKILL
                    break
                time.sleep(0.1)
        finally:
            for pid in ranks:
                if server.returncode(pid) is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
            codes = [server.wait(pid) for pid in ranks]
        returncode = returncode or next((code for code in codes if code), 0)
        proc = subprocess.CompletedProcess(["megatron_patch.pretrain_qwen", *argv], returncode,
                                           out.read_text() if out.exists() else "",
                                           err.read_text() if err.exists() else "")
    return _kept(workdir, proc, check)


def run_fresh_rank(workdir: Path, args: list[str], timeout: int = 600, check: bool = True):
    """One rank of the entrypoint in a fresh `python -m megatron_patch.pretrain_qwen`, as run_entrypoint's ranks
    see it otherwise (TensorBoard under workdir/tb, train.log). On a GPU: a rank forked from a process that has
    imported torch and megatron-core may find CUDA already initialised."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(_ranks_env(1), RANK="0", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-m", "megatron_patch.pretrain_qwen", *_entrypoint_argv(workdir, args)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    return _kept(workdir, proc, check)


def worker_cores() -> int:
    """The cores this test process may keep busy: its pytest-xdist worker's share of the host (conftest.py sets
    OMP_NUM_THREADS). Every process a test starts sizes its threads from it: ranks of two workers that each ran as
    many threads as the host has cores spent half their time spinning against each other."""
    return omp_threads() or os.cpu_count() or 1


def _entrypoint_argv(workdir: Path, args: list[str]) -> list[str]:
    return [*args, "--tensorboard-dir", str(workdir / "tb"), "--tensorboard-log-interval", "1"]


def _ranks_env(nproc: int) -> dict[str, str]:
    """torchrun's variables for a one-node job of nproc ranks (each rank adds its RANK and LOCAL_RANK). The
    repository goes first on PYTHONPATH, which keeps what was there (a GPU machine's carried packages)."""
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS=str(max(1, worker_cores() // nproc)),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))


def _kept(workdir: Path, proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    """The run's output in workdir/train.log; a failed run is an AssertionError with the log's tail (check)."""
    (workdir / "train.log").write_text(proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"training failed (exit {proc.returncode}); log tail:\n{tail}")
    return proc


def run_tool(cmd: list, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A toolkit script or CLI in a subprocess (Megatron keeps its setup in process globals)."""
    # The caller's PYTHONPATH stays behind the repository's (where a test dependency such as peft may live).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                       if p), OMP_NUM_THREADS=str(worker_cores()))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_stopped(cmd: list, point: str, workdir: Path, signal_name: str = "SIGINT", **env: str) -> str:
    """A tool run as a user runs it, in its own session, whose process group gets `signal_name` at the named
    fault point of our code (MP_FAULT_INJECT=SIGINT@point: as a terminal's Ctrl-C signals every process of its
    foreground group, the tool's workers and helpers included). Checks what every stopped tool must do: exit
    status 128 + the signal, no traceback, the `stopped by SIGNAL; ...` line last and once, and no process of its
    group left. `env`: more environment variables. Returns that line."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(worker_cores()),
               MP_FAULT_INJECT=f"{signal_name}@{point}", **env)
    console = workdir / f"stopped-at-{point.replace(':', '-')}.console"
    with open(console, "w") as out:  # a file, not a pipe: a process left behind cannot hang the test
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        code = proc.wait(timeout=600)
    text = console.read_text(errors="replace")
    assert code == 128 + signal.Signals[signal_name], (code, text[-3000:])
    assert "Traceback" not in text, text[-5000:]
    stop_lines = [line for line in text.splitlines() if line.startswith(f"stopped by {signal_name}; ")]
    assert len(stop_lines) == 1 and text.rstrip().splitlines()[-1] == stop_lines[0], text[-3000:]
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return stop_lines[0]
        assert time.monotonic() < deadline, "a process of the stopped tool is left"
        time.sleep(0.1)


def tensorboard_losses(workdir: Path, tag: str = "lm loss") -> dict[int, float]:
    """{iteration: loss} from the TensorBoard events the run wrote under workdir/tb (full float precision)."""
    return tensorboard_scalars(workdir / "tb", tag)
