"""Checkpoint integrity (issue 19): megatron_patch.checkpoint_state decides what a run folder resumes from before
torchrun starts; the entrypoint refuses a folder that needs that decision; the tracker is written atomically.

The end-to-end cases share one interrupted run: the dp2_distributed_optimizer layout of conftest.layout_runs (two
ranks, the distributed optimizer sharding Adam's state between them; same flags, same pretrained checkpoint) saving
every iteration, killed by MP_FAULT_INJECT at the exact moment it writes the tracker for iteration 2. The layout
run itself is the uninterrupted reference for the losses and grad norms. Each case then damages a hard-linked copy
of that folder as a user's disk would, and resumes it the way run_mcore_qwen.sh does (prepare_resume, then
torchrun).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from megatron_patch import checkpoint_state
from megatron_patch.checkpoint_state import TRACKER, prepare_resume, resume_state
from megatron_patch.errors import UserError
from megatron_patch.harness.matrix_table import tolerance
from training_utils import LAYOUT_ITERS, LAYOUTS, run_entrypoint, tensorboard_losses, tiny_mock_args

pytestmark = pytest.mark.timeout(900)
INTERRUPTED = "dp2_distributed_optimizer"  # the layout run interrupted and resumed (conftest.layout_runs)


# ---------------------------------------------------------------- resume_state on small folders (no training)

def _save_torch_dist(folder: Path, values: int = 1000) -> None:
    """A torch_dist checkpoint as megatron-core leaves it: torch's shards and .metadata, then metadata.json."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"weight": torch.arange(float(values)), "bias": torch.ones(10)}, checkpoint_id=str(folder))
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                      "sharded_backend_version": 1}))


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """iter_0000001 and iter_0000002 complete, tracker at 2."""
    for iteration in (1, 2):
        _save_torch_dist(tmp_path / f"iter_{iteration:07d}")
    (tmp_path / TRACKER).write_text("2")
    return tmp_path


def test_a_fresh_folder_or_a_tracked_complete_checkpoint_needs_nothing(tmp_path, run_folder):
    assert resume_state(tmp_path / "not_there") == checkpoint_state.ResumeState(tmp_path / "not_there", None)
    state = resume_state(run_folder)
    assert (state.iteration, state.warnings, state.error, state.needs_repair) == (2, [], None, False)


@pytest.mark.parametrize("tracker_bytes,what", [(b"", "is empty"), (None, "is missing"),
                                                (b"\xff\xfe", "is unreadable"), (b"iter 2", "does not hold")])
def test_a_bad_tracker_beside_checkpoints_resumes_from_the_newest_complete_one(run_folder, tracker_bytes, what):
    tracker = run_folder / TRACKER
    tracker.unlink()
    if tracker_bytes is not None:
        tracker.write_bytes(tracker_bytes)
    state = resume_state(run_folder)
    assert (state.iteration, state.error, state.tracker_text) == (2, None, "2")
    (warning,) = state.warnings
    assert warning.startswith(f"warning: {tracker} {what}") and "Resuming from the newest complete checkpoint, " \
        "iteration 2 (the tracker is rewritten to say so)." in warning
    assert prepare_resume(run_folder) == 2
    assert tracker.read_text() == "2" and resume_state(run_folder).needs_repair is False


@pytest.mark.parametrize("damage", ["truncated shard", "missing .metadata", "missing metadata.json", "no folder"])
def test_a_damaged_tracked_checkpoint_falls_back_to_the_previous_one_naming_the_file(run_folder, damage):
    newest = run_folder / "iter_0000002"
    (shard,) = newest.glob("*.distcp")
    if damage == "truncated shard":
        os.truncate(shard, shard.stat().st_size - 1)
        named = f"{shard} is truncated ({shard.stat().st_size} bytes, {shard.stat().st_size + 1} expected)"
    elif damage == "missing .metadata":
        (newest / ".metadata").unlink()
        named = f"{newest / '.metadata'} is missing"
    elif damage == "missing metadata.json":
        (newest / "metadata.json").unlink()
        named = f"{newest / 'metadata.json'} is missing (the save did not finish)"
    else:
        shutil.rmtree(newest)
        named = f"{newest} is missing"
    state = resume_state(run_folder)
    assert (state.iteration, state.tracker_text, state.error) == (1, "1", None)
    assert state.warnings == [f"warning: {run_folder / TRACKER} names iteration 2, but {named}. Resuming from the "
                              "newest complete checkpoint, iteration 1 (the tracker is rewritten to say so)."]


def test_no_complete_checkpoint_is_an_error_naming_every_damaged_file(run_folder):
    shards = [next((run_folder / f"iter_{i:07d}").glob("*.distcp")) for i in (1, 2)]
    for shard in shards:
        os.truncate(shard, 10)
    (run_folder / TRACKER).write_text("")
    state = resume_state(run_folder)
    assert state.iteration is None and not state.needs_repair
    assert state.error.startswith(f"error: no complete checkpoint to resume from in {run_folder}: ")
    assert all(f"{shard} is truncated" in state.error for shard in shards)
    assert "move the folder away" in state.error
    with pytest.raises(UserError, match="no complete checkpoint to resume from"):
        prepare_resume(run_folder)
    assert (run_folder / TRACKER).read_text() == ""  # nothing written


def test_a_bad_tracker_alone_is_removed_and_the_run_starts_fresh(tmp_path):
    (tmp_path / TRACKER).write_text("")
    state = resume_state(tmp_path)
    assert (state.iteration, state.tracker_text) == (None, "")
    assert prepare_resume(tmp_path) is None and not (tmp_path / TRACKER).exists()


def test_an_unfinished_newer_save_is_named_and_overwritten_later(run_folder):
    (run_folder / TRACKER).write_text("1")
    state = resume_state(run_folder)
    assert (state.iteration, state.needs_repair) == (1, False)
    assert state.warnings == [f"warning: {run_folder} holds iter_0000002, newer than the tracker's iteration 1: "
                              "its save never finished, so the run resumes from iteration 1 and overwrites it."]


def test_the_entrypoint_check_refuses_what_the_launcher_would_repair(run_folder):
    (run_folder / TRACKER).unlink()
    with pytest.raises(UserError) as refused:
        checkpoint_state.refuse_unresolved(run_folder)
    assert str(refused.value) == (
        f"error: {run_folder / TRACKER} is missing. run_mcore_qwen.sh repairs this itself (the run would resume "
        f"from iteration 2); when launching torchrun directly, run `python -m megatron_patch.checkpoint_state "
        f"--repair {run_folder}` first, or, to start over instead, move the folder away (or pass another "
        "OUTPUT_BASEPATH).")
    assert not (run_folder / TRACKER).exists()  # read-only


def test_the_repair_command_the_refusal_names_repairs_the_folder(run_folder, capsys):
    """The command the entrypoint's refusal tells the user to run, run as typed: it rewrites the tracker, and the
    entrypoint's check then lets the folder through. Without --repair (in this process, as `python -m` runs it) it
    only says what a relaunch would do; where nothing is left to resume from it says so, exit status 2."""
    import shlex
    import subprocess
    import sys

    from megatron_patch.errors import report_user_errors
    from training_utils import REPO_ROOT

    (run_folder / TRACKER).unlink()
    with pytest.raises(UserError) as refused:
        checkpoint_state.refuse_unresolved(run_folder)
    (typed,) = re.findall(r"run `(python -m megatron_patch\.checkpoint_state --repair [^`]+)`", str(refused.value))
    command = report_user_errors(checkpoint_state.main)
    arguments = shlex.split(typed)[3:]

    assert command([a for a in arguments if a != "--repair"]) == 0
    looked = capsys.readouterr()
    assert looked.out == "resumes from iteration 2\n" and f"warning: {run_folder / TRACKER} is missing" in looked.err
    assert not (run_folder / TRACKER).exists()
    repaired = subprocess.run([sys.executable, *shlex.split(typed)[1:]], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert (repaired.returncode, repaired.stdout) == (0, "resumes from iteration 2\n"), repaired.stderr
    assert (run_folder / TRACKER).read_text() == "2"
    checkpoint_state.refuse_unresolved(run_folder)  # no longer refused

    for shard in run_folder.glob("iter_*/*.distcp"):
        os.truncate(shard, 10)
    assert command(arguments) == 2
    assert capsys.readouterr().err.startswith(f"error: no complete checkpoint to resume from in {run_folder}: ")


def test_a_release_checkpoint_resumes_at_iteration_0_and_a_damaged_one_is_named(tmp_path):
    """The convertor's output (tracker `release`): nothing to decide; damaged, nothing else to fall back to."""
    _save_torch_dist(tmp_path / "release")
    (tmp_path / TRACKER).write_text("release")
    state = resume_state(tmp_path)
    assert (state.iteration, state.warnings, state.error, state.needs_repair) == (0, [], None, False)
    (shard,) = (tmp_path / "release").glob("*.distcp")
    os.truncate(shard, shard.stat().st_size // 2)
    state = resume_state(tmp_path)
    assert state.iteration is None and state.error == (
        f"error: the release checkpoint in {tmp_path} is damaged: {shard} is truncated "
        f"({shard.stat().st_size} bytes, {2 * shard.stat().st_size} expected).")
    with pytest.raises(UserError, match="the release checkpoint in .* is damaged"):
        prepare_resume(tmp_path)


def test_the_older_torch_format_resumes_and_an_empty_rank_file_is_named(tmp_path):
    """--ckpt-format torch (one mp_rank_*/model_optim_rng.pt per model-parallel rank): complete when every rank's file
    has content; an empty one (a save killed as it began writing) falls back to the previous iteration."""
    for iteration in (1, 2):
        for rank in ("mp_rank_00", "mp_rank_01"):
            folder = tmp_path / f"iter_{iteration:07d}" / rank
            folder.mkdir(parents=True)
            torch.save({"iteration": iteration}, folder / "model_optim_rng.pt")
    (tmp_path / TRACKER).write_text("2")
    assert resume_state(tmp_path).iteration == 2
    empty = tmp_path / "iter_0000002" / "mp_rank_01" / "model_optim_rng.pt"
    empty.write_bytes(b"")
    state = resume_state(tmp_path)
    assert (state.iteration, state.tracker_text) == (1, "1")
    assert state.warnings == [f"warning: {tmp_path / TRACKER} names iteration 2, but {empty} is empty. Resuming from "
                              "the newest complete checkpoint, iteration 1 (the tracker is rewritten to say so)."]


# ---------------------------------------------------------------- end to end through the entrypoint

@pytest.fixture(scope="module")
def killed_while_writing_tracker(layout_runs, converted_tiny, tmp_path_factory) -> dict:
    """The INTERRUPTED layout saving every iteration, killed while rank 0 writes the tracker for iteration 2."""
    work = tmp_path_factory.mktemp("killed_at_tracker")
    ckpt = work / "ckpt"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MP_FAULT_INJECT", "tracker-write:2")
        proc = _resume(work, converted_tiny, ckpt, ["--save", str(ckpt), "--save-interval", "1"], check=False)
    return dict(ckpt=ckpt, proc=proc, log=proc.stdout + proc.stderr, reference=layout_runs[INTERRUPTED])


def _resume(work: Path, converted_tiny: Path, ckpt: Path, extra: list[str] = (), check: bool = True):
    """The INTERRUPTED layout's run, loading `ckpt` where it holds a checkpoint."""
    nproc, flags = LAYOUTS[INTERRUPTED]
    args = tiny_mock_args(iters=LAYOUT_ITERS) + flags + ["--pretrained-checkpoint", str(converted_tiny), "--load",
                                                         str(ckpt)]
    return run_entrypoint(work, nproc, args + list(extra), check=check)


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy sharing the files (each case replaces what it damages rather than writing into it)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def test_kill_while_writing_the_tracker_resumes_from_the_previous_one(killed_while_writing_tracker,
                                                                      converted_tiny, tmp_path_factory):
    killed = killed_while_writing_tracker
    ckpt = killed["ckpt"]
    assert killed["proc"].returncode != 0
    assert re.search(r"successfully saved checkpoint from iteration\s+1 ", killed["log"])
    assert not re.search(r"successfully saved checkpoint from iteration\s+2 ", killed["log"])
    # The kill came after iteration 2's checkpoint and its new tracker text were on disk, before the rename.
    assert (ckpt / TRACKER).read_text() == "1"
    assert [p.read_text() for p in ckpt.glob(f".{TRACKER}.tmp-*")] == ["2"]
    assert checkpoint_state.checkpoint_problem(ckpt / "iter_0000002") is None

    cases = {
        "as killed": (ckpt, 1),
        "empty tracker": (_empty_tracker(_linked_copy(ckpt, tmp_path_factory.mktemp("empty") / "ckpt")), 2),
        "deleted tracker": (_deleted_tracker(_linked_copy(ckpt, tmp_path_factory.mktemp("deleted") / "ckpt")), 2),
        "truncated newest": (_truncated_newest(_linked_copy(ckpt, tmp_path_factory.mktemp("trunc") / "ckpt")), 1),
    }

    # Launched directly (no launcher to repair it), a folder without a tracker is refused: no silent restart
    # from --pretrained-checkpoint at iteration 1, and not exit status 0. (Its own copy: the cases are repaired
    # while it runs.)
    deleted = _deleted_tracker(_linked_copy(ckpt, tmp_path_factory.mktemp("refused_ckpt") / "ckpt"))
    refused_work = tmp_path_factory.mktemp("refused")

    # Every case's decision is checked; two of them (one resuming from each iteration) also train on.
    trained = ("as killed", "deleted tracker")

    def resume(name: str) -> tuple[str, dict]:
        folder, expected_iteration = cases[name]
        state = resume_state(folder)
        assert prepare_resume(folder) == expected_iteration, (name, state)
        if name not in trained:
            return name, dict(warnings=state.warnings)
        work = tmp_path_factory.mktemp("resumed")
        _resume(work, converted_tiny, folder)
        return name, dict(warnings=state.warnings, log=(work / "train.log").read_text(),
                          losses=tensorboard_losses(work), grad_norms=tensorboard_losses(work, "grad-norm"))

    with ThreadPoolExecutor(max_workers=2) as pool:  # interpreter start-up is mostly single-threaded
        refusing = pool.submit(_resume, refused_work, converted_tiny, deleted, check=False)
        resumed = dict(pool.map(resume, cases))
        refused = refusing.result()
    assert refused.returncode != 0
    assert f"error: {deleted / TRACKER} is missing. run_mcore_qwen.sh repairs this itself (the run would resume " \
           "from iteration 2)" in refused.stdout + refused.stderr
    assert "successfully loaded checkpoint" not in refused.stdout + refused.stderr

    reference, tol = killed["reference"], tolerance("fp32", "fp32", on_gpu=False)
    for name, (folder, iteration) in cases.items():
        if name not in trained:
            continue
        run = resumed[name]
        assert re.search(rf"successfully loaded checkpoint from {re.escape(str(folder))} .*at iteration\s+"
                         rf"{iteration}\b", run["log"]), (name, run["log"][-3000:])
        assert sorted(run["losses"]) == list(range(iteration + 1, LAYOUT_ITERS + 1)), (name, run["losses"])
        # Resumed at iteration 1, iteration 3's loss follows the step iteration 2 took with Adam's moments from the
        # checkpoint (each rank's shard of them): exactly the uninterrupted run's.
        for it, loss in run["losses"].items():
            assert abs(loss - reference["losses"][it]) <= tol.loss, (name, it, loss, reference["losses"][it])
            assert abs(run["grad_norms"][it] - reference["grad_norms"][it]) <= tol.grad_norm * \
                reference["grad_norms"][it], (name, it, run["grad_norms"], reference["grad_norms"])
    assert resumed["as killed"]["warnings"] == [
        f"warning: {ckpt} holds iter_0000002, newer than the tracker's iteration 1: its save never finished, so "
        "the run resumes from iteration 1 and overwrites it."]
    for name, what in [("empty tracker", "is empty"), ("deleted tracker", "is missing")]:
        (warning,) = resumed[name]["warnings"]
        assert warning.startswith(f"warning: {cases[name][0] / TRACKER} {what}") and \
            "Resuming from the newest complete checkpoint, iteration 2" in warning, warning
    (warning,) = resumed["truncated newest"]["warnings"]
    shard = cases["truncated newest"][0] / "iter_0000002" / "__0_0.distcp"
    assert f"names iteration 2, but {shard} is truncated" in warning and "iteration 1 (the tracker" in warning


def _empty_tracker(folder: Path) -> Path:
    _replace(folder / TRACKER, b"")
    return folder


def _deleted_tracker(folder: Path) -> Path:
    (folder / TRACKER).unlink()
    return folder


def _truncated_newest(folder: Path) -> Path:
    """The tracker names iteration 2 (its save finished) and then its shard lost its tail (a bad copy, a disk)."""
    _replace(folder / TRACKER, b"2")
    shard = folder / "iter_0000002" / "__0_0.distcp"
    _replace(shard, shard.read_bytes()[: shard.stat().st_size // 2])
    return folder
