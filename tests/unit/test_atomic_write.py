"""megatron_patch/atomic_write.py: a file is flushed, renamed over its target and its folder flushed, in that
order; a folder replaced by a process killed at each step of writing and swapping leaves the old content or the
new one whole at the target, or one the next writer's recovery puts there.

The kill is injected at the exact moment with MP_FAULT_INJECT (megatron_patch/fault_injection.py) in a small
writer process (tests/integration/test_convertor.py kills a real conversion, tests/integration/test_eval.py
prepare_data.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_patch import atomic_write
from megatron_patch.atomic_write import atomic_write_text, recover_interrupted
from megatron_patch.fault_injection import FAULT_ENV, KILLED_EXIT_STATUS
from megatron_patch.process_lifetime import writer_alive

# Writes a two-file "checkpoint" through StagedFolder; the second file last, so a complete one has both.
WRITER = """
import sys
from pathlib import Path
from megatron_patch import atomic_write
if sys.argv[3] == "no-exchange":  # a file system that cannot swap two names atomically (NFS)
    atomic_write.exchange = lambda a, b: False
with atomic_write.StagedFolder(Path(sys.argv[1]), "folder") as out:
    (out / "weights").write_text(sys.argv[2])
    (out / "tracker").write_text(sys.argv[2])
"""


def write_checkpoint(save_dir: Path, content: str, fault: str | None = None, exchange: bool = True) -> int:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    proc = subprocess.run([sys.executable, "-c", WRITER, str(save_dir), content,
                           "exchange" if exchange else "no-exchange"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (0, KILLED_EXIT_STATUS), proc.stderr
    return proc.returncode


def checkpoint_in(folder: Path) -> str | None:
    """The content of a complete checkpoint in folder (both files, same content), else None."""
    files = [folder / "weights", folder / "tracker"]
    if not all(f.is_file() for f in files):
        return None
    weights, tracker = (f.read_text() for f in files)
    return weights if weights == tracker else None


def hidden_leftovers(save_dir: Path) -> list[str]:
    return sorted(p.name for p in save_dir.parent.iterdir() if p.name.startswith(f".{save_dir.name}."))


@pytest.mark.parametrize("fault,exchange,at_save_dir,after_recovery", [
    ("folder:output-written", True, "old", "old"),   # killed before the swap: the old checkpoint stays
    ("folder:before-swap", True, "old", "old"),
    ("folder:before-cleanup", True, "new", "new"),   # killed after the swap: the new one is in place
    ("folder:between-renames", False, None, "new"),  # no atomic exchange: the next run finishes the swap
    ("folder:before-cleanup", False, "new", "new"),
])
def test_a_folder_replaced_by_a_process_killed_at_each_step_is_old_or_new_whole(tmp_path, fault, exchange,
                                                                                 at_save_dir, after_recovery):
    save_dir = tmp_path / "ckpt"
    assert write_checkpoint(save_dir, "old") == 0
    assert write_checkpoint(save_dir, "new", fault, exchange) == KILLED_EXIT_STATUS
    assert checkpoint_in(save_dir) == at_save_dir
    if at_save_dir is None:
        assert not save_dir.exists()
        (done,) = [p for p in save_dir.parent.iterdir() if p.name.startswith(".ckpt.done-")]
        assert checkpoint_in(done) == "new"  # what the README's hand recovery (mv .NAME.done-PID NAME) puts back
    assert hidden_leftovers(save_dir)

    recover_interrupted(save_dir)
    assert checkpoint_in(save_dir) == after_recovery
    assert hidden_leftovers(save_dir) == []


def test_a_complete_replacement_leaves_nothing_beside_the_folder(tmp_path):
    save_dir = tmp_path / "ckpt"
    for exchange in (True, False):
        assert write_checkpoint(save_dir, "old") == 0
        assert write_checkpoint(save_dir, f"new-{exchange}", exchange=exchange) == 0
        assert checkpoint_in(save_dir) == f"new-{exchange}"
        assert hidden_leftovers(save_dir) == []


def test_recovery_leaves_a_live_writer_alone(tmp_path):
    save_dir = tmp_path / "ckpt"
    assert write_checkpoint(save_dir, "old") == 0
    live = subprocess.Popen(["sleep", "30"])
    try:
        partial = tmp_path / f".ckpt.partial-{live.pid}"
        partial.mkdir()
        recover_interrupted(save_dir)
        assert partial.is_dir() and checkpoint_in(save_dir) == "old"
    finally:
        live.kill()
        live.wait()
    recover_interrupted(save_dir)
    assert not partial.exists()


def test_a_folder_deleted_whole_is_never_restored_and_a_killed_deletion_is_finished(tmp_path):
    """remove_folder renames the folder aside before deleting it: a kill in between (a dead writer's .gone-PID
    beside a missing target) leaves no half-deleted folder under the name, and recovery finishes the deletion
    where it would restore an .old one."""
    from megatron_patch.atomic_write import leftover_targets, remove_folder

    save_dir = tmp_path / "iter_0000002"
    assert write_checkpoint(save_dir, "old") == 0
    remove_folder(save_dir)
    assert not save_dir.exists() and hidden_leftovers(save_dir) == []
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / f".iter_0000002.gone-{dead.pid}"
    gone.mkdir()
    (gone / "model.safetensors").write_text("half deleted")
    assert leftover_targets(tmp_path) == [save_dir]
    recover_interrupted(save_dir)
    assert not save_dir.exists() and not gone.exists()


def test_a_writer_is_alive_only_while_its_process_runs_and_not_under_a_reused_number():
    process = subprocess.Popen(["sleep", "30"])
    try:
        assert writer_alive(process.pid, time.time())
        # A file last changed an hour before this process started: the number was reused, the writer is gone.
        assert not writer_alive(process.pid, time.time() - 3600)
        process.kill()
        time.sleep(0.2)
        assert not writer_alive(process.pid, time.time())  # a zombie, not yet reaped, is no writer either
    finally:
        process.kill()
        process.wait()
    assert not writer_alive(process.pid, time.time())


def test_a_file_is_flushed_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text("old")
    steps = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(atomic_write.os, "fsync",
                        lambda fd: steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd))
    monkeypatch.setattr(atomic_write.os, "replace",
                        lambda a, b: steps.append(("replace", str(b))) or replace(a, b))
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    temporary = steps[0][1]
    assert Path(temporary).parent == tmp_path and Path(temporary).name.startswith(".state.json.tmp-")
    assert steps == [("fsync", temporary), ("replace", str(target)), ("fsync", str(tmp_path))]


def test_a_file_write_killed_before_its_rename_keeps_the_old_content(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    script = ("import sys; from megatron_patch.atomic_write import atomic_write_text; "
              "atomic_write_text(sys.argv[1], 'new', fault='state:before-rename')")
    done = subprocess.run([sys.executable, "-c", script, target], capture_output=True, text=True, timeout=60,
                          env={**os.environ, FAULT_ENV: "state:before-rename"})
    assert done.returncode == KILLED_EXIT_STATUS, done.stderr
    assert target.read_text() == "old"
    (temporary,) = [p for p in tmp_path.iterdir() if p != target]
    assert temporary.read_text() == "new"  # complete on disk, but never in the target's place
