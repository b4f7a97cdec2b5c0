"""The convertor's output is written beside SAVE_DIR and put in place whole, so that a kill at any moment leaves
SAVE_DIR holding a complete checkpoint (the old one or the new one), never a half-written or missing one.

Hidden names beside SAVE_DIR (NAME is SAVE_DIR's own name, PID the converting process):

    .NAME.partial-PID   being written; deleted on failure
    .NAME.done-PID      complete, about to take SAVE_DIR's place
    .NAME.old-PID       what SAVE_DIR held before --overwrite; deleted once the new output is in place

--overwrite swaps SAVE_DIR and .NAME.done-PID in one atomic step (Linux renameat2 RENAME_EXCHANGE). A file
system that cannot exchange two names (NFS, some FUSE mounts) needs two renames, SAVE_DIR -> .NAME.old-PID then
.NAME.done-PID -> SAVE_DIR; a kill between them leaves SAVE_DIR missing with both complete checkpoints beside it.
The next convertor run with that SAVE_DIR finishes the swap first (`recover_interrupted`: the .done folder becomes
SAVE_DIR), and deletes what dead runs left behind; by hand, rename .NAME.done-PID to NAME.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from pathlib import Path

from megatron_patch.errors import UserError, stop_signals_ignored
from megatron_patch.fault_injection import fault_point

STATES = ("partial", "done", "old")


def check_save_dir(save_dir: Path, overwrite: bool, inputs: dict[str, Path]) -> None:
    """SAVE_DIR may neither hold an input nor lie inside one (after resolving symlinks): --overwrite would delete
    the input, and a conversion must never write into the checkpoint it reads."""
    save_dir = save_dir.resolve()
    for what, src in inputs.items():
        src = src.resolve()
        if save_dir == src or src.is_relative_to(save_dir) or save_dir.is_relative_to(src):
            relation = ("is" if save_dir == src else "contains" if src.is_relative_to(save_dir) else "lies inside")
            raise UserError(f"error: SAVE_DIR {save_dir} {relation} {what} {src}, so converting could overwrite or "
                            f"delete its input; choose a SAVE_DIR that is neither inside {what} nor holds it, e.g. "
                            f"a sibling folder {src.parent / (src.name + '-converted')}.")
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())) and not overwrite:
        raise UserError(f"error: SAVE_DIR {save_dir} already exists and is not empty; remove it, choose another "
                        "folder, or pass --overwrite.")


def _sibling(save_dir: Path, state: str, pid: int) -> Path:
    return save_dir.parent / f".{save_dir.name}.{state}-{pid}"


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the C library or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_in(done: Path, save_dir: Path, exchange: bool = True) -> None:
    """Put the complete output `done` at `save_dir`, replacing what is there, and delete the replaced one."""
    pid = int(done.name.rsplit("-", 1)[1])
    old = _sibling(save_dir, "old", pid)
    if not save_dir.exists():
        os.replace(done, save_dir)
        return
    if exchange and _exchange(done, save_dir):
        os.replace(done, old)  # `done` now holds the replaced checkpoint
    else:
        os.replace(save_dir, old)
        fault_point("convert:between-renames")
        os.replace(done, save_dir)
    fault_point("convert:before-cleanup")
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _leftovers(save_dir: Path) -> dict[str, list[Path]]:
    """Hidden folders of conversions into save_dir whose process is gone, by state, newest first."""
    found: dict[str, list[Path]] = {state: [] for state in STATES}
    if not save_dir.parent.is_dir():
        return found
    for state in STATES:
        prefix = f".{save_dir.name}.{state}-"
        for path in save_dir.parent.glob(f"{prefix}*"):
            pid = path.name.removeprefix(prefix)
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                found[state].append(path)
        found[state].sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def recover_interrupted(save_dir: str | Path) -> None:
    """Finish or undo an --overwrite that was killed mid-swap, and delete dead runs' hidden folders."""
    save_dir = Path(save_dir).resolve()
    found = _leftovers(save_dir)
    if not save_dir.exists():
        for state, what in (("done", "finished an interrupted --overwrite"),
                            ("old", "restored the checkpoint an interrupted --overwrite had moved aside")):
            if found[state]:
                os.replace(found[state].pop(0), save_dir)
                print(f"note: {what}: {save_dir} is complete again.", file=sys.stderr)
                break
    for path in (p for paths in found.values() for p in paths):
        shutil.rmtree(path, ignore_errors=True)


class StagedOutput:
    """`with StagedOutput(save_dir) as out:` write into `out`; on success it takes SAVE_DIR's place (replacing
    any earlier content; a stop signal cannot cut that short), on failure or a stop it is deleted."""

    def __init__(self, save_dir: str | Path):
        self.save_dir = Path(save_dir).resolve()
        self.partial = _sibling(self.save_dir, "partial", os.getpid())

    def __enter__(self) -> Path:
        self.save_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir()
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                fault_point("convert:output-written")
                done = _sibling(self.save_dir, "done", os.getpid())
                with stop_signals_ignored():
                    os.replace(self.partial, done)
                    fault_point("convert:before-swap")
                    swap_in(done, self.save_dir)
        finally:
            shutil.rmtree(self.partial, ignore_errors=True)  # on failure or a stop (gone when put in place)
        return False
