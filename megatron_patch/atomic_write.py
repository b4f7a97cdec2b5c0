"""Replacing a file or a folder whole: a reader, or a relaunch after a kill at any instant, finds the old content
or the new one, never a mix, an empty file or nothing.

The new content is written beside its target under a hidden name, flushed to disk (fsync), renamed over the
target, and the folder holding both is fsync'd, so that the rename itself survives a power loss.

A folder cannot be renamed over a non-empty one: Linux swaps the two names in one step (renameat2
RENAME_EXCHANGE). `StagedFolder` names what it writes beside TARGET (NAME is TARGET's own name, PID the writing
process):

    .NAME.partial-PID   being written; deleted on failure
    .NAME.done-PID      complete, about to take TARGET's place
    .NAME.old-PID       what TARGET held before; deleted once the new content is in place
    .NAME.gone-PID      TARGET being deleted (`remove_folder`): never restored

A file system that cannot exchange two names (NFS, some FUSE mounts) needs two renames, TARGET -> .NAME.old-PID
then .NAME.done-PID -> TARGET; a kill between them leaves TARGET missing with both complete versions beside it.
`recover_interrupted`, which every writer of TARGET runs first, finishes that swap (the .done folder becomes
TARGET) and deletes what dead writers left behind; by hand, rename .NAME.done-PID to NAME.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import sys
from pathlib import Path

from megatron_patch.errors import stop_signals_ignored
from megatron_patch.fault_injection import fault_point
from megatron_patch.process_lifetime import writer_alive

STATES = ("partial", "done", "old", "gone")


# ---------------------------------------------------------------- files

def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(temporary: str | os.PathLike, target: str | os.PathLike, fault: str | None = None) -> None:
    """Put the complete file `temporary` (in `target`'s folder) in `target`'s place. `fault`: a fault-injection
    point between the flush and the rename."""
    fsync_path(temporary)
    if fault:
        fault_point(fault)
    os.replace(temporary, target)
    fsync_path(Path(target).parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fault: str | None = None) -> None:
    path = Path(path)
    # Named by host and process: on a shared file system several nodes may write the same file at once.
    temporary = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(data)
    replace_file(temporary, path, fault)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", fault: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(encoding), fault)


# ---------------------------------------------------------------- folders

def fsync_tree(folder: Path) -> None:
    """Every file and folder under `folder`, and `folder` itself, flushed to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def exchange(a: Path, b: Path) -> bool:
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


def _sibling(target: Path, state: str, pid: int) -> Path:
    return target.parent / f".{target.name}.{state}-{pid}"


def _leftovers(target: Path) -> dict[str, list[Path]]:
    """Hidden folders of writers of `target` whose process is gone, by state, newest first."""
    found: dict[str, list[Path]] = {state: [] for state in STATES}
    if not target.parent.is_dir():
        return found
    for state in STATES:
        prefix = f".{target.name}.{state}-"
        for path in target.parent.glob(f"{prefix}*"):
            pid = path.name.removeprefix(prefix)
            if pid.isdigit() and int(pid) != os.getpid() and not writer_alive(int(pid), path.lstat().st_ctime):
                found[state].append(path)
        found[state].sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found


def recover_interrupted(target: str | Path) -> None:
    """Finish or undo a replacement of `target` that was killed mid-swap, and delete dead writers' hidden folders."""
    target = Path(target).resolve()
    found = _leftovers(target)
    if not target.exists():
        for state, what in (("done", "finished an interrupted replacement"),
                            ("old", "restored what an interrupted replacement had moved aside")):
            if found[state]:
                os.replace(found[state].pop(0), target)
                fsync_path(target.parent)
                print(f"note: {what}: {target} is complete again.", file=sys.stderr)
                break
    for path in (p for paths in found.values() for p in paths):
        shutil.rmtree(path, ignore_errors=True)


def remove_folder(target: str | Path) -> None:
    """Delete a folder whole: it is renamed aside first, so a kill during the deletion leaves no half-deleted
    folder under its name (`recover_interrupted` deletes the rest)."""
    target = Path(target).resolve()
    gone = _sibling(target, "gone", os.getpid())
    os.replace(target, gone)
    fsync_path(target.parent)
    shutil.rmtree(gone, ignore_errors=True)


def leftover_targets(folder: Path) -> list[Path]:
    """The targets in `folder` with a hidden folder of some writer beside them (for `recover_interrupted`)."""
    found = set()
    for path in folder.glob(".*.*-*") if folder.is_dir() else ():
        name, _, state_pid = path.name[1:].rpartition(".")
        if state_pid.split("-")[0] in STATES:
            found.add(folder / name)
    return sorted(found)


class StagedFolder:
    """`with StagedFolder(target, "convert") as out:` write into `out`; on success it is flushed to disk and takes
    `target`'s place (replacing what was there; a stop signal cannot cut that short), on failure or a stop it is
    deleted. The second argument names the fault
    points (LABEL:output-written, LABEL:before-swap, LABEL:between-renames, LABEL:before-cleanup)."""

    def __init__(self, target: str | Path, fault_label: str):
        self.target = Path(target).resolve()
        self.fault_label = fault_label
        self.partial = _sibling(self.target, "partial", os.getpid())

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir()
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                fsync_tree(self.partial)
                fault_point(f"{self.fault_label}:output-written")
                done = _sibling(self.target, "done", os.getpid())
                with stop_signals_ignored():  # Ctrl-C cannot leave the old content moved aside, the new not in place
                    os.replace(self.partial, done)
                    fault_point(f"{self.fault_label}:before-swap")
                    self._swap_in(done)
        finally:
            shutil.rmtree(self.partial, ignore_errors=True)  # on failure or a stop (gone when put in place)
        return False

    def _swap_in(self, done: Path) -> None:
        """Put the complete `done` at the target, replacing what is there, and delete the replaced one."""
        old = _sibling(self.target, "old", os.getpid())
        if not self.target.exists():
            os.replace(done, self.target)
        elif exchange(done, self.target):
            os.replace(done, old)  # `done` now holds what the target held
        else:
            os.replace(self.target, old)
            fault_point(f"{self.fault_label}:between-renames")
            os.replace(done, self.target)
        fsync_path(self.target.parent)
        fault_point(f"{self.fault_label}:before-cleanup")
        shutil.rmtree(old, ignore_errors=True)
