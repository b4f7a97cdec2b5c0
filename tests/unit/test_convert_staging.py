"""The convertor's output swap (megatron_patch/convert/staging.py): a process killed at each step of writing and
replacing SAVE_DIR leaves a complete checkpoint there, or one that the next run's recovery puts there.

The kill is injected at the exact moment with MP_FAULT_INJECT (megatron_patch/fault_injection.py) in a small
writer process; no model is involved (tests/integration/test_convertor.py kills a real conversion).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patch.convert.staging import recover_interrupted
from megatron_patch.fault_injection import FAULT_ENV, KILLED_EXIT_STATUS

# Writes a two-file "checkpoint" through StagedOutput; the second file last, so a complete one has both.
WRITER = """
import sys
from pathlib import Path
from megatron_patch.convert import staging
if sys.argv[3] == "no-exchange":  # a file system that cannot swap two names atomically (NFS)
    staging._exchange = lambda a, b: False
with staging.StagedOutput(Path(sys.argv[1])) as out:
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
    ("convert:output-written", True, "old", "old"),   # killed before the swap: the old checkpoint stays
    ("convert:before-swap", True, "old", "old"),
    ("convert:before-cleanup", True, "new", "new"),   # killed after the swap: the new one is in place
    ("convert:between-renames", False, None, "new"),  # no atomic exchange: the next run finishes the swap
    ("convert:before-cleanup", False, "new", "new"),
])
def test_overwrite_killed_at_each_step_leaves_or_recovers_a_complete_checkpoint(tmp_path, fault, exchange,
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


def test_a_complete_overwrite_replaces_the_checkpoint_and_leaves_nothing_beside_it(tmp_path):
    save_dir = tmp_path / "ckpt"
    for exchange in (True, False):
        assert write_checkpoint(save_dir, "old") == 0
        assert write_checkpoint(save_dir, f"new-{exchange}", exchange=exchange) == 0
        assert checkpoint_in(save_dir) == f"new-{exchange}"
        assert hidden_leftovers(save_dir) == []


def test_recovery_leaves_a_live_conversion_alone(tmp_path):
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
