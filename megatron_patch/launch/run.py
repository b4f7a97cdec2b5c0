"""The launcher's main: parse, probe, settle, check, then torchrun as a process tree the launcher owns.

Ownership: torchrun starts in its own process group with PR_SET_PDEATHSIG (it gets SIGKILL if the launcher dies),
each rank and every helper process a rank starts die with their parent (megatron_patch.process_lifetime), and
the launcher is a child subreaper, so anything orphaned below it comes back to it. When torchrun ends everything
left below the launcher is killed, so no process outlives the run. Writing the log never takes the job down: on a
full disk it goes on without it.

Stops: Ctrl-C (SIGINT), a scheduler's SIGTERM or SIGHUP reach the launcher, which sends SIGTERM to each rank:
Megatron's --exit-signal-handler saves the iteration in progress and exits 0. torchrun and the ranks ignore the
stop signals themselves (torchrun would print a SignalException traceback and end ranks that cannot save yet),
so a signal sent to every process of the job changes nothing. The launcher then says in one line what was
saved (from the run folder's tracker) and exits with 128 + the signal; ranks still alive 30 s on are killed.

MP_SAVE_HF's exports (launch/hf_export.py) are the launcher's children too, each in its own process group (a
terminal's Ctrl-C is the launcher's to act on) and dying with the launcher; they outlive torchrun, and the launcher
waits for them before it exits. A stop ends them (they delete what they wrote) and says what was not exported.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from megatron_patch import process_lifetime
from megatron_patch.checkpoint_state import prepare_resume, resume_state
from megatron_patch.errors import STOP_SIGNALS, UserError, dry_run_requested, report_user_errors, signal_name, \
    stop_signals_handled_by, stop_signals_ignored, stopped_status
from megatron_patch.launch.positional import Launch, parse
from megatron_patch.launch.flags import launch_env, torchrun_command
from megatron_patch.launch.hf_export import HFExports, export_bytes, export_folder, export_source
from megatron_patch.launch.machine import detect_machine
from megatron_patch.launch.validate import problems, settle

STOP_GRACE_SECONDS = 30  # after SIGTERM, how long ranks get to save and exit before SIGKILL


def tokenizer_dir(launch: Launch, write: bool = True) -> str:
    """MP_TOKENIZER_PATH, else the checkpoint's own tokenizer, else the embedded default Qwen2.5 tokenizer (written
    into the cache on first use; `write=False`, for dry runs, only names the folder)."""
    if launch.tokenizer_path:
        return launch.tokenizer_path
    if launch.pretrain_checkpoint and (Path(launch.pretrain_checkpoint) / "tokenizer_config.json").is_file():
        return launch.pretrain_checkpoint
    from megatron_patch.tokenizer import DEFAULT_TOKENIZER_FOLDER, cache_dir, cached_default_tokenizer

    return str(cached_default_tokenizer() if write else cache_dir() / DEFAULT_TOKENIZER_FOLDER)


# ---------------------------------------------------------------------------------------------- the run folder lock

class RunFolderLock:
    """One live launch per run folder and node: an flock'ed file naming its holder. The kernel drops an flock when
    its holder dies, so a lock left by a dead launch is simply taken over."""

    def __init__(self, checkpoint_dir: Path, node_rank: int):
        # Inside the run's own folder: OUTPUT_BASEPATH/checkpoint/ keeps holding run folders only.
        self.path = checkpoint_dir / f".launch.node{node_rank}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"error: another launch is training into this run folder ({holder}); two runs would "
                            f"overwrite each other's checkpoints. Wait for it to end, stop it, or pass another "
                            f"OUTPUT_BASEPATH. Lock file: {self.path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                      f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------------------------------------------------------ the log

class Log:
    """torchrun's output to the terminal and to the log file. A failed write to the file (full disk, lost mount)
    stops the copy to the file with one warning; the terminal copy and the job go on."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)
        except OSError as err:
            self._warn(err)

    def _warn(self, err: OSError) -> None:
        self._file = None
        self.terminal(f"warning: cannot write the log {self.path} ({err.strerror or err}); training goes on, "
                      "its output only on this terminal.\n", stream=sys.stderr)

    @staticmethod
    def terminal(text: str, stream=None) -> None:
        try:
            (stream or sys.stdout).write(text)
            (stream or sys.stdout).flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not stop training either

    def write(self, text: str) -> None:
        self.terminal(text)
        if self._file is not None:
            try:
                self._file.write(text)
            except OSError as err:
                self._close_quietly()
                self._warn(err)

    def _close_quietly(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass

    def close(self) -> None:
        if self._file is not None:
            self._close_quietly()
            self._file = None


# ------------------------------------------------------------------------------------------- owning the process tree

def _torchrun_preexec() -> None:
    """In the forked child before exec: its own process group; SIGKILL when the launcher dies abruptly; and the
    stop signals ignored, which its ranks inherit. torchrun would turn a stop signal into a SignalException
    traceback and pass it on to ranks that may not save yet; the launcher stops the ranks itself, and Megatron's
    --exit-signal-handler takes SIGTERM over in each rank once it can save."""
    os.setpgid(0, 0)
    process_lifetime.kill_when_parent_dies()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class OwnedTorchrun:
    """torchrun and everything below it; `wait` returns its exit status once nothing of it is left. `exports`
    (MP_SAVE_HF's background exports) are polled meanwhile and outlive it."""

    def __init__(self, command: list[str], env: dict[str, str], log: Log, exports: HFExports | None = None):
        self.log = log
        self.exports = exports
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_torchrun_preexec)
        self._reader = threading.Thread(target=self._copy_output, daemon=True)
        self._reader.start()
        self.stopped_by: int | None = None  # the stop signal the launcher got
        self.killed = False  # the ranks outlived the grace period
        self._stop_requested_at = 0.0
        self._signalled: set[int] = set()  # ranks sent SIGTERM

    def _copy_output(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.log.write(raw.decode("utf-8", errors="replace"))

    def request_stop(self, signum: int) -> None:
        """The launcher got SIGINT/SIGTERM/SIGHUP: each rank gets SIGTERM (Megatron's --exit-signal-handler saves
        the iteration it is in and exits 0); `wait` SIGKILLs whatever is left after the grace period."""
        if self.stopped_by is None:
            self.stopped_by = signum
            self._stop_requested_at = time.monotonic()
            self.log.terminal(f"run_mcore_qwen: {signal_name(signum)}: saving the iteration in progress, then "
                              f"stopping (killed after {STOP_GRACE_SECONDS} s)\n", stream=sys.stderr)
            self._keep_stopping()

    def _keep_stopping(self) -> None:
        """SIGTERM to each rank (torchrun's children) once it can take it: a rank still starting up ignores it
        until Megatron's handler is in place, and one signalled again while it exits would die of it (Python's
        shutdown puts the default action back). After the grace period everything is killed."""
        if time.monotonic() - self._stop_requested_at > STOP_GRACE_SECONDS:
            self.killed = True
            process_lifetime.kill_everything_below(os.getpid(), self.spared())
            return
        for rank in process_lifetime.children(self.proc.pid):
            if rank not in self._signalled and process_lifetime.catches(rank, signal.SIGTERM):
                self._signalled.add(rank)
                try:
                    os.kill(rank, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def spared(self) -> list[int]:
        return self.exports.pids() if self.exports else []

    def wait(self) -> int:
        while True:
            try:
                code = self.proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self.stopped_by is not None:
                    self._keep_stopping()
                if self.exports:
                    self.exports.poll(stopping=self.stopped_by is not None)
        # torchrun is gone: nothing of this run may outlive it (e.g. a killed rank's checkpoint writers, which
        # would also hold our output pipe open and hang the reader), but a running export.
        process_lifetime.kill_everything_below(os.getpid(), self.spared())
        self._reader.join(timeout=10)
        return code


def run_owned(command: list[str], env: dict[str, str], log: Log, exports: HFExports | None = None) -> OwnedTorchrun:
    """torchrun, to its end; a stop signal meanwhile (even while torchrun starts) stops the ranks."""
    process_lifetime.become_subreaper()
    started: list[OwnedTorchrun] = []
    early: list[int] = []

    def stop(signum, _frame):
        started[0].request_stop(signum) if started else early.append(signum)

    try:
        with stop_signals_handled_by(stop):
            started.append(OwnedTorchrun(command, env, log, exports))
            for signum in early[:1]:
                started[0].request_stop(signum)
            started[0].wait()
    finally:
        process_lifetime.kill_everything_below(os.getpid(), started[0].spared() if started else ())
    return started[0]


def stop_report(checkpoint_dir: Path, owned: OwnedTorchrun, resumed_from: int | None, log: Path) -> str:
    """The one line a stopped run ends with: what stopped it, what it saved, what the same command does next."""
    name = signal_name(owned.stopped_by)
    newest = resume_state(checkpoint_dir).iteration  # the newest complete checkpoint, as the next launch finds it
    code = owned.proc.returncode
    if owned.killed:
        how = f"stopped by {name}: the ranks had not stopped {STOP_GRACE_SECONDS} s later and were killed"
    elif code != 0:
        how = f"stopped by {name}, but torchrun ended with exit status {code} (see {log})"
    elif newest is not None and newest != resumed_from:
        return f"run_mcore_qwen: stopped by {name} after saving iteration {newest}; run the same command to resume"
    else:
        how = f"stopped by {name} before it saved a checkpoint"
    if newest is None:
        return f"run_mcore_qwen: {how}; nothing is saved, so the same command starts from the beginning"
    return f"run_mcore_qwen: {how}; run the same command to resume from iteration {newest}"


# ---------------------------------------------------------------------------------------------------------- main

def _print_findings(lines: list[str], kind: str) -> None:
    for line in lines:
        print(f"{kind}: {line}", file=sys.stderr)


@report_user_errors(stopped="training had not started; run the same command to start it")
def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    try:
        launch = parse(argv, environ)
        machine = detect_machine(launch, environ)
        launch, changes = settle(launch, machine)
        found = problems(launch, machine)
        dry_run = dry_run_requested(environ)
    except UserError as err:
        print(str(err), file=sys.stderr)
        return 2
    if found.errors:
        _print_findings(found.errors, "error")
        return 2
    _print_findings(changes + found.warnings, "warning")
    _print_findings(found.notes, "note")
    env = launch_env(machine, environ)
    if dry_run:
        try:
            prepare_resume(launch.checkpoint_dir, dry_run=True)
        except UserError as err:
            print(str(err), file=sys.stderr)
            return 2
        command = torchrun_command(launch, machine, tokenizer_dir(launch, write=False))
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
        return 0
    return _launch(launch, machine, env)


def _launch(launch: Launch, machine, env: dict[str, str]) -> int:
    lock = RunFolderLock(launch.checkpoint_dir, machine.node_rank)
    try:
        _check_writable(launch.output_basepath)
        _check_free_space(launch)
        lock.acquire()
        # The run folder is ours now: decide what it resumes from (and repair a damaged tracker) before any rank
        # reads it.
        resumes_from = prepare_resume(launch.checkpoint_dir)
        tokenizer = tokenizer_dir(launch)
        command = torchrun_command(launch, machine, tokenizer)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        log_prefix = launch.output_basepath / "log" / f"{stamp}_{launch.run_name}_node{machine.node_rank}"
        log = Log(log_prefix.with_name(log_prefix.name + ".log"))
        exports = _exports(launch, machine.node_rank, env, tokenizer, log_prefix, log)
        Log.terminal(f"run_mcore_qwen: {launch.run_name}\n  checkpoints: {launch.checkpoint_dir}\n  log: {log.path}\n"
                     + (f"  Hugging Face folders: {export_folder(launch)}\n" if exports else ""))
        log.write(f"# {datetime.datetime.now().isoformat()} {shlex.join(command)}\n")
        with stop_signals_ignored():  # once torchrun has ended a stop is too late to change anything
            owned = run_owned(command, {**os.environ, **env}, log, exports)
            return _end_of_run(launch, owned, resumes_from, log, exports)
    except UserError as err:
        print(str(err), file=sys.stderr)
        return 2
    finally:
        lock.release()


def _exports(launch: Launch, node_rank: int, env: dict[str, str], tokenizer: str, log_prefix: Path,
             log: Log) -> HFExports | None:
    """MP_SAVE_HF's exports (node 0 only: its tracker is the run's), their side files written now."""
    if launch.save_hf == "false" or node_rank != 0:
        return None
    try:
        return HFExports(launch, export_source(launch, tokenizer), env, log_prefix, log.write)
    except OSError as err:
        raise UserError(f"error: MP_SAVE_HF: cannot write the Hugging Face side files (config.json, tokenizer) into "
                        f"{launch.checkpoint_dir} ({err.strerror or err}). Free some space, or unset MP_SAVE_HF.") \
            from None


def _end_of_run(launch: Launch, owned: OwnedTorchrun, resumes_from: int | None, log: Log,
                exports: HFExports | None) -> int:
    """The pending exports, then the lines that end the run, last the one saying how it ended; its exit status."""
    code = owned.proc.returncode
    code = 128 - code if code < 0 else code  # killed by a signal: reported the way a shell does
    unexported, stopped_exporting = exports.finish(owned.stopped_by) if exports else ([], None)
    for line in unexported:
        Log.terminal(line + "\n", stream=sys.stderr)
    if owned.stopped_by is not None:
        Log.terminal(stop_report(launch.checkpoint_dir, owned, resumes_from, log.path) + "\n", stream=sys.stderr)
        code = stopped_status(owned.stopped_by)
    elif code != 0:
        Log.terminal(f"run_mcore_qwen: training failed (torchrun exit status {code}); see {log.path}\n",
                     stream=sys.stderr)
    elif stopped_exporting is not None:
        Log.terminal(f"run_mcore_qwen: stopped by {signal_name(stopped_exporting)} after training ended, while "
                     "exporting to Hugging Face (what was not exported is listed above)\n", stream=sys.stderr)
        code = stopped_status(stopped_exporting)
    log.close()
    return code


def checkpoint_bytes(launch: Launch) -> int:
    """About what one checkpoint takes: the trained weights (fp32 master copies when training in 16 bits) and
    Adam's two fp32 moments, 12 or 16 bytes per parameter (a LoRA run trains and saves its adapters only)."""
    per_parameter = 12 if launch.precision == "fp32" else 16
    return launch.trained_parameters * per_parameter


def _check_free_space(launch: Launch) -> None:
    """Room for one checkpoint and, with MP_SAVE_HF, one export (OUTPUT_BASEPATH/hf may be another disk); none
    with MP_SAVE=false, which writes nothing but the log and TensorBoard's events."""
    if not launch.save_checkpoints:
        return
    hf = export_folder(launch)
    needs = [(launch.output_basepath, checkpoint_bytes(launch), 0),
             (hf if hf.is_dir() else launch.output_basepath, 0, export_bytes(launch))]
    by_disk: dict[int, list] = {}
    for folder, checkpoint, export in needs:
        disk = by_disk.setdefault(os.stat(folder).st_dev, [folder, 0, 0])
        disk[1] += checkpoint
        disk[2] += export
    for folder, checkpoint, export in by_disk.values():
        free = shutil.disk_usage(folder).free
        if free >= checkpoint + export:
            continue
        model = f"Qwen2.5-{launch.model_name}"
        takes = [f"one checkpoint of {model} takes about {checkpoint / 2**30:.2f} GiB (weights and optimizer state)"
                 ] if checkpoint else []
        if export:
            takes.append(f"its Hugging Face export (MP_SAVE_HF) about {export / 2**30:.2f} GiB more" if checkpoint
                         else f"one Hugging Face export (MP_SAVE_HF) of {model} takes about {export / 2**30:.2f} GiB")
        raise UserError(f"error: {'OUTPUT_BASEPATH ' if folder == launch.output_basepath else ''}{folder} has "
                        f"{free / 2**30:.2f} GiB free, but {' and '.join(takes)}. Free some space"
                        + (", unset MP_SAVE_HF," if export else "") + " or pass an OUTPUT_BASEPATH on a larger disk; a run "
                        "that needs no checkpoint (a throughput measurement) can set MP_SAVE=false instead.")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"error: OUTPUT_BASEPATH {folder} is not writable ({err.strerror or err}). Pass a folder "
                        "this user can write, with free space for checkpoints.") from None
