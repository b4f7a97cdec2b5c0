"""No process of a training job outlives the process that started it; and whether the process that left a file
behind is still alive.

Linux's PR_SET_PDEATHSIG asks the kernel to signal a process when its parent dies. The launcher sets it on
torchrun, each rank sets it on itself, and every multiprocessing child a rank starts (megatron-core's checkpoint
writers, data-loader workers) sets it first thing, so a kill -9 anywhere in the chain ends everything below.
A process that owns a tree (the launcher, run_eval.py) finds what is left below it through /proc and kills it.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

from megatron_patch.errors import children_ignore_interrupts, default_stop_signals_in_child
from megatron_patch.fault_injection import fault_point

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies; exit now if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if parent == 1 or os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def children_die_with_this_process() -> None:
    """Every multiprocessing child started from now on (fork, spawn or forkserver) dies with its parent.

    megatron-core's torch_dist writer starts helper processes at the first save; without this they outlived a
    killed rank, kept the launcher's output pipe open (a hang) and held ~0.9 GB each (GPU memory on a GPU node).
    The child's target is wrapped, not the class: a spawned child is a fresh interpreter that never sees a patch
    made here, but it unpickles and runs its target. Children also leave stop signals to their parent (Ctrl-C
    reaches the whole foreground process group): see megatron_patch.errors."""
    import multiprocessing.process as mp_process

    start = mp_process.BaseProcess.start
    if getattr(start, "dies_with_parent", False):
        return

    def start_dying_with_parent(self):
        if self._target is not None:
            self._target = functools.partial(_run_dying_with_parent, self._target)
        with children_ignore_interrupts():
            return start(self)

    start_dying_with_parent.dies_with_parent = True
    mp_process.BaseProcess.start = start_dying_with_parent
    # Registered after multiprocessing's own exit hook, so it runs first (atexit is last in, first out).
    atexit.register(end_children_left)


def _run_dying_with_parent(target, *args, **kwargs):
    die_with_parent()
    default_stop_signals_in_child()
    return target(*args, **kwargs)


CHILD_JOIN_SECONDS = 10


def end_children_left() -> None:
    """At exit, end the multiprocessing children still alive instead of waiting on them forever.

    multiprocessing's exit hook SIGTERMs daemonic children and then joins every child. Megatron's
    --exit-signal-handler makes SIGTERM only set a flag, and forked data-loader workers inherit that handler, so a
    rank that exits on an error (a failed checkpoint write on a full disk, say) hung in that join for good."""
    import multiprocessing

    # torch's data loader raises from its SIGCHLD handler when a worker dies: that would abort this hook.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        if not child.daemon:  # megatron-core's checkpoint writers: let them finish what they write
            child.join(timeout=CHILD_JOIN_SECONDS)
    for child in children:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
    for child in children:
        child.join(timeout=CHILD_JOIN_SECONDS)


def exit_without_teardown(code: int) -> None:
    """End the process after its exit handlers (logging, multiprocessing's children, finalizers) but without the
    interpreter's teardown of torch and megatron's modules: 2 s of a CPU per process that writes nothing. For
    the end of a finished run only: whatever the process writes must be complete and flushed by then."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# psutil's start times come from boot time plus clock ticks, and file times from another clock: within this much of
# each other, a process counts as the writer (kept alive: a leftover is only deleted when its writer surely died).
START_TIME_SLACK_S = 2.0


def writer_alive(pid: int, changed_at: float) -> bool:
    """Whether process `pid` is alive and may be the one that last changed a file at `changed_at` (its st_ctime).
    A process started after that moment holds a reused number: the writer is gone."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= changed_at + START_TIME_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's live process
        return True


# ------------------------------------------------------------------------------------ owning a tree of processes

def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(option, value)


def become_subreaper() -> None:
    """Orphans below this process (a rank's helpers whose rank died) are re-parented here, not to PID 1."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _children_by_parent() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        found.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    return _children_by_parent().get(pid, [])


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler of its own for `signum` (the SigCgt mask of its /proc status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(mask, 16) >> (signum - 1) & 1)


def descendants(pid: int, spare: Collection[int] = ()) -> list[int]:
    """Every live process below `pid` (found through /proc's parent links), but those in `spare` and theirs."""
    by_parent = _children_by_parent()
    found, todo = [], [child for child in by_parent.get(pid, []) if child not in spare]
    while todo:
        child = todo.pop()
        found.append(child)
        todo += by_parent.get(child, [])
    return found


def kill_everything_below(pid: int, spare: Collection[int] = ()) -> None:
    """SIGKILL every process below `pid` (but the trees of `spare`: processes this one still waits on), until
    none is left, reaping what was killed."""
    for _ in range(50):
        left = descendants(pid, spare)
        if not left:
            return
        for child in left:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap(left)
        time.sleep(0.1)


def _reap(pids: list[int]) -> None:
    """Collect the exit status of those of `pids` that are our children (the rest are another's to collect)."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def kill_when_parent_dies() -> None:
    """For a child's preexec_fn (the parent is alive then): SIGKILL when its parent dies."""
    _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def run_owned_child(command: list[str], env: dict[str, str]) -> int:
    """Run `command` as this process's one child, in its own session (the terminal's Ctrl-C reaches only this
    process) with the same output, and wait for it. Whatever is left below this process afterwards is killed:
    its tree when this process is stopped (Interrupted) meanwhile, and dies with this process if it is killed.
    Returns its exit status, 128 + the signal when a signal ended it."""
    become_subreaper()
    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=kill_when_parent_dies)
    try:
        fault_point("owned-child:started")
        code = child.wait()
    finally:
        kill_everything_below(os.getpid())
    return 128 - code if code < 0 else code
