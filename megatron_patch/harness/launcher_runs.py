"""Runs of examples/qwen2_5/run_mcore_qwen.sh as a user starts them: the 25 positional arguments, an environment
without the caller's launcher knobs, and one runner (start in its own session, poll the log, stop the whole process
group), with the launcher's refusal and a rank's error read back from the output."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.harness.iteration_log import last_iteration_mark
from megatron_patch.launch.arguments import POSITIONAL

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "qwen2_5" / "run_mcore_qwen.sh"
# What a one-node pre-training run without extras passes; the caller gives the rest.
DEFAULTS = dict(ENV="dsw", TP=1, PP=1, CP=1, SP=False, DO=False, FL=False, SFT=False, AC="false",
                OPTIMIZER_OFFLOAD="false", SAVE_INTERVAL=100000, PRETRAIN_CHECKPOINT_PATH=None,
                WARMUP_TOKENS_OR_ITERS=0)
SCHEDULER_VARIABLES = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "KUBERNETES_CONTAINER_RESOURCE_GPU")


def _word(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def launcher_argv(iterations: int | None = None, warmup_iterations: int | None = None, **values) -> list[str]:
    """run_mcore_qwen.sh's 25 positional arguments in order, from values named as POSITIONAL names them (bools as
    true/false, None as none, floats as %g) over DEFAULTS; PAD_LEN defaults to SEQ_LEN and VALID_DATASET_PATH to
    DATASET_PATH. `iterations` / `warmup_iterations` fill TRAIN_TOKENS_OR_ITERS / WARMUP_TOKENS_OR_ITERS in the
    unit upstream reads them in: iterations for SFT, tokens (iterations x global batch x sequence) otherwise."""
    unknown = sorted(set(values) - set(POSITIONAL))
    if unknown:
        raise TypeError(f"launcher_argv: unknown argument(s) {', '.join(unknown)}; the 25 are {' '.join(POSITIONAL)}")
    args = {**DEFAULTS, **values}
    args.setdefault("PAD_LEN", args.get("SEQ_LEN"))
    args.setdefault("VALID_DATASET_PATH", args.get("DATASET_PATH"))
    tokens = 1 if args["SFT"] in (True, "true") else int(args["GLOBAL_BATCH_SIZE"]) * int(args["SEQ_LEN"])
    for count, name in ((iterations, "TRAIN_TOKENS_OR_ITERS"), (warmup_iterations, "WARMUP_TOKENS_OR_ITERS")):
        if count is not None:
            args[name] = count * tokens
    missing = [name for name in POSITIONAL if args.get(name) is None and name != "PRETRAIN_CHECKPOINT_PATH"]
    if missing:
        raise TypeError(f"launcher_argv: no value for {', '.join(missing)}")
    return [_word(args[name]) for name in POSITIONAL]


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without launcher knobs (MP_*) or a scheduler's variables, plus `extra`; output
    unbuffered, so a log read while the run goes is up to date."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MP_", *SCHEDULER_VARIABLES))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Launched:
    returncode: int
    output: str
    seconds: float
    stopped: bool = False  # ended by us once the awaited line was logged
    timed_out: bool = False


LIVE_LAUNCHERS: set[subprocess.Popen] = set()  # stopped by stop_live_launchers when this process ends early


def start_launcher(args: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    """The launcher with these arguments in its own session (the launcher, torchrun and the ranks are stopped
    together), its output in log_path, its working folder `cwd` (default log_path's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["sh", str(SCRIPT), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd or log_path.parent, start_new_session=True)
    LIVE_LAUNCHERS.add(proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """The launcher's whole session, at once: SIGTERM would make Megatron save a checkpoint first."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    LIVE_LAUNCHERS.discard(proc)


def stop_live_launchers() -> None:
    """Every launcher still running (those of other threads, when the main thread ends on SIGTERM)."""
    for proc in list(LIVE_LAUNCHERS):
        stop(proc)


def wait_launchers(procs: list[subprocess.Popen], logs: list[Path], last_line: str | None,
                   timeout_s: float | None) -> list[Launched]:
    """Waits for every launcher; stops them all once `last_line` is in the last log (if given) or at the timeout."""
    start = time.time()
    stopped = timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            if last_line and last_line in logs[-1].read_text(errors="replace"):
                stopped = True
                break
            if timeout_s is not None and time.time() - start > timeout_s:
                timed_out = True
                break
            time.sleep(0.5)
    finally:  # stopped, timed out, or this process is ending (SIGTERM, Ctrl-C): the launchers go too
        for proc in procs:
            stop(proc)
    seconds = time.time() - start
    return [Launched(p.returncode, log.read_text(errors="replace"), seconds, stopped, timed_out)
            for p, log in zip(procs, logs)]


def run_launcher(args: list[str], extra_env: dict[str, str], out: Path, iterations: int) -> str:
    """One launcher run from this working folder (relative paths in `args` read as the caller means them) in an
    empty `out` (a run stopped during its final save leaves a partial checkpoint there, which the launcher rightly
    refuses to resume from), with this environment less its launcher knobs plus `extra_env`; its output in
    out/megatron.log, stopped once its last iteration is logged (the final save measures the disk, not training).
    Returns the log; raises RuntimeError with the log's tail if it failed first."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proc = start_launcher(args, clean_environ(**extra_env), out / "megatron.log", cwd=Path.cwd())
    (launched,) = wait_launchers([proc], [out / "megatron.log"], last_iteration_mark(iterations), None)
    if not launched.stopped and launched.returncode != 0:
        raise RuntimeError("run failed:\n" + "\n".join(launched.output.splitlines()[-30:]))
    return launched.output


_ERROR_LINE = re.compile(r"((?:[A-Za-z_][\w.]*)?(?:Error|Exception)\b:? .*|error: .*)")


def last_error_line(output: str) -> str:
    """The rank's own exception line (torchrun's ChildFailedError summary is not it), else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "ChildFailedError" in line or "elastic" in line or line.startswith("warning"):
            continue
        match = _ERROR_LINE.search(line)
        if match:
            return match.group(1)[:300]
    return lines[-1][:300] if lines else "(no output)"


def refusal_message(launched: Launched) -> str | None:
    """The launcher's own message when it stopped before torchrun (exit 2, `error:` lines, no banner)."""
    if launched.returncode != 2 or "run_mcore_qwen: " in launched.output:
        return None
    lines = launched.output.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    return " ".join(line.strip() for line in lines[first:]) if first is not None else None


def command_text(args: list[str], env: dict[str, str], short_names: dict[str, str]) -> str:
    """The command as a user types it, with machine-specific folders shortened to names like $WORK."""
    knobs = {k: v for k, v in env.items() if k.startswith("MP_") or k in (*SCHEDULER_VARIABLES, "CUDA_VISIBLE_DEVICES")}
    text = shlex.join([f"{k}={v}" for k, v in sorted(knobs.items())]
                      + ["sh", "examples/qwen2_5/run_mcore_qwen.sh", *args])
    for path, name in sorted(short_names.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return text
