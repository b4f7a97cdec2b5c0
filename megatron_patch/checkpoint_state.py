"""Which checkpoint a run folder resumes from, decided before torchrun starts; and when a torch_dist checkpoint
is complete (`torch_dist_index`, which the convertor reads checkpoints through too).

megatron-core 0.19.2 trusts `latest_checkpointed_iteration.txt` alone: an empty tracker (it writes it in place,
so a kill at that moment leaves it empty) ends the run with "Invalid metadata file" and exit status 0; a missing
one makes it start again from --pretrained-checkpoint at iteration 1 and overwrite the iter_* folders; a damaged
newest checkpoint fails deep in torch's loader without naming the file. `resume_state` reads the folder and says
what to do; `repair_tracker` is the one write (the tracker, atomically); `prepare_resume` does both for the
launcher, and `refuse_unresolved` is the read-only check each rank makes before Megatron reads the folder.

A torch_dist checkpoint is complete when what megatron-core writes last is there (dist_checkpointing.save):
every rank's `__<rank>_<n>.distcp`, then torch's `.metadata` (written by the coordinator once all ranks have
written), then megatron-core's `metadata.json`; the tracker follows once all ranks pass a barrier. We also check
each .distcp file's size against the byte ranges `.metadata` records for it (a truncated file is caught here).
`.metadata` is read with torch.distributed.checkpoint's own FileSystemReader: the launcher imports torch only
when a run folder holds a torch_dist checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.atomic_write import atomic_write_text
from megatron_patch.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
ITERATION_FOLDER = re.compile(r"^iter_(\d{7,})$")
TORCH_METADATA = ".metadata"  # torch.distributed.checkpoint's index of every shard's byte range
MCORE_METADATA = "metadata.json"  # megatron-core's format stamp, written after everything else
START_OVER = "to start over instead, move the folder away (or pass another OUTPUT_BASEPATH)"


@dataclass
class ResumeState:
    """What a run folder holds. iteration: the checkpoint to resume from (0 for a release checkpoint), None to
    start fresh; reason: what needs a decision (a bad tracker, a damaged checkpoint); tracker_text: what the
    tracker must say (None: leave it as it is; "": remove it)."""
    checkpoint_dir: Path
    iteration: int | None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    reason: str | None = None
    tracker_text: str | None = None

    @property
    def needs_repair(self) -> bool:
        return self.error is None and self.tracker_text is not None


# ---------------------------------------------------------------- one checkpoint folder

def checkpoint_problem(folder: Path) -> str | None:
    """None when `folder` (an iter_* or release folder) holds a complete checkpoint, else what is wrong with it,
    naming the file."""
    if not folder.is_dir():
        return f"{folder} is missing"
    if (folder / MCORE_METADATA).exists() or (folder / TORCH_METADATA).exists():
        return _torch_dist_problem(folder)
    legacy = sorted(folder.glob("mp_rank_*/*.pt"))
    if legacy:  # --ckpt-format torch: one file per model-parallel rank
        empty = [p for p in legacy if p.stat().st_size == 0]
        return f"{empty[0]} is empty" if empty else None
    return f"{folder} holds no checkpoint ({MCORE_METADATA} missing: the save did not finish)"


def _torch_dist_problem(folder: Path) -> str | None:
    stamp = folder / MCORE_METADATA
    try:
        if "sharded_backend" not in json.loads(stamp.read_text()):
            return f"{stamp} is not megatron-core's checkpoint metadata"
    except FileNotFoundError:
        return f"{stamp} is missing (the save did not finish)"
    except (OSError, ValueError) as err:
        return f"{stamp} is unreadable ({err})"
    try:
        torch_dist_index(folder)
    except DamagedCheckpoint as problem:
        return str(problem)
    return None


class DamagedCheckpoint(Exception):
    """What is wrong with a torch_dist checkpoint folder, naming the file."""


def torch_dist_index(folder: Path, holds: Callable[[str], bool] = lambda key: True):
    """torch.distributed.checkpoint's index of a torch_dist `folder` (its `.metadata`, read by torch's public
    FileSystemReader), once every .distcp file holding an entry whose key `holds` is there and as long as the index
    records. Raises DamagedCheckpoint naming the missing, unreadable or truncated file."""
    index = folder / TORCH_METADATA
    if not index.is_file():
        raise DamagedCheckpoint(f"{index} is missing")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as err:  # a truncated or corrupt pickle fails in many ways
        raise DamagedCheckpoint(f"{index} is unreadable ({type(err).__name__}: {err})") from None
    extents: dict[str, int] = {}
    for item, stored in (metadata.storage_data or {}).items():
        if holds(item.fqn):
            end = stored.offset + stored.length
            extents[stored.relative_path] = max(end, extents.get(stored.relative_path, 0))
    for name, needed in sorted(extents.items()):
        shard = folder / name
        if not shard.is_file():
            raise DamagedCheckpoint(f"{shard} is missing")
        size = shard.stat().st_size
        if size < needed:
            raise DamagedCheckpoint(f"{shard} is truncated ({size} bytes, {needed} expected)")
    if not extents and not any(folder.glob("*.distcp")):
        raise DamagedCheckpoint(f"{folder} holds no .distcp file")
    return metadata


# ---------------------------------------------------------------- the run folder

def iteration_folder_name(tag: int | str) -> str:
    """Megatron's folder of one saved iteration (a number, or "release") in a run folder."""
    return "release" if tag == "release" else f"iter_{int(tag):07d}"


def iteration_folders(checkpoint_dir: Path) -> dict[int, Path]:
    """{iteration: folder} of the iter_* folders, any state."""
    if not checkpoint_dir.is_dir():
        return {}
    found = {}
    for p in checkpoint_dir.iterdir():
        match = ITERATION_FOLDER.match(p.name)
        if match and p.is_dir():
            found[int(match.group(1))] = p
    return found


def read_tracker(checkpoint_dir: Path) -> tuple[int | str | None, str | None]:
    """(iteration, or "release", or None; what is wrong with the tracker, or None when it is fine or absent)."""
    tracker = checkpoint_dir / TRACKER
    try:
        text = tracker.read_bytes().decode("ascii").strip()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{tracker} is unreadable ({err})"
    if text == "release":
        return "release", None
    if not text:
        return None, f"{tracker} is empty (a save was interrupted while writing it)"
    if text.isdigit():
        return int(text), None
    return None, f"{tracker} does not hold an iteration number (it holds {text[:40]!r})"


def resume_state(checkpoint_dir: str | os.PathLike) -> ResumeState:
    """Read-only: the iteration a run in `checkpoint_dir` resumes from, the warnings to show, or the error that
    stops it. Never picks an incomplete checkpoint, never ignores existing iter_* folders."""
    folder = Path(checkpoint_dir)
    state = ResumeState(folder, None)
    tracked, tracker_problem = read_tracker(folder)
    iterations = iteration_folders(folder)

    if tracked == "release":
        problem = checkpoint_problem(folder / "release")
        if problem:
            state.error = f"error: the release checkpoint in {folder} is damaged: {problem}."
        else:
            state.iteration = 0
        return state
    if tracked is not None:
        problem = checkpoint_problem(iterations.get(tracked, folder / iteration_folder_name(tracked)))
        if problem is None:
            state.iteration = tracked
            newer = [i for i in iterations if i > tracked]
            if newer:
                state.warnings.append(
                    f"warning: {folder} holds iter_{max(newer):07d}, newer than the tracker's iteration {tracked}: "
                    f"its save never finished, so the run resumes from iteration {tracked} and overwrites it.")
            return state
        reason = f"{folder / TRACKER} names iteration {tracked}, but {problem}"
    elif tracker_problem:
        reason = tracker_problem
    elif iterations:
        reason = f"{folder / TRACKER} is missing"
    else:
        return state  # nothing saved yet: a fresh start

    state.reason = reason
    damaged = []
    for iteration in sorted(iterations, reverse=True):
        if iteration == tracked:
            continue
        problem = checkpoint_problem(iterations[iteration])
        if problem is None:
            state.iteration = iteration
            state.tracker_text = str(iteration)
            skipped = "".join(f"; skipped {d}" for d in damaged)
            state.warnings.append(f"warning: {reason}{skipped}. Resuming from the newest complete checkpoint, "
                                  f"iteration {iteration} (the tracker is rewritten to say so).")
            return state
        damaged.append(problem)
    if not iterations and tracker_problem:
        # A bad tracker and nothing it could point at: the run starts fresh once the tracker is gone.
        state.tracker_text = ""
        state.warnings.append(f"warning: {reason}, and {folder} holds no iter_* folder: removing the tracker; "
                              "the run starts from the beginning.")
        return state
    listing = "; ".join(damaged) if damaged else "no iter_* folder holds a checkpoint"
    state.error = (f"error: no complete checkpoint to resume from in {folder}: {reason}; {listing}. "
                   f"Restore the damaged file(s) from a copy, or, {START_OVER}.")
    return state


def write_tracker(path: Path, text: str) -> None:
    """The tracker, replaced whole: a reader (or a relaunch after a kill at any instant) sees the old text or the
    new one, never a mix or an empty file. MP_FAULT_INJECT=tracker-write:TEXT kills the process once the new text
    is on disk and the old tracker still in place."""
    atomic_write_text(path, text, encoding="ascii", fault=f"tracker-write:{text}")


def repair_tracker(state: ResumeState) -> None:
    """The one write: make the tracker say what `state` decided (atomically), or remove a tracker that names
    nothing."""
    if not state.needs_repair:
        return
    tracker = state.checkpoint_dir / TRACKER
    if state.tracker_text == "":
        tracker.unlink(missing_ok=True)
    else:
        write_tracker(tracker, state.tracker_text)


def prepare_resume(checkpoint_dir: str | os.PathLike, dry_run: bool = False) -> int | None:
    """For the launcher, before torchrun: print the warnings on stderr, repair the tracker (not in a dry run),
    return the iteration the run resumes from (None: fresh start). Raises UserError when nothing complete is
    left to resume from."""
    state = resume_state(checkpoint_dir)
    if state.error:
        raise UserError(state.error)
    for warning in state.warnings:
        print(warning, file=sys.stderr, flush=True)
    if not dry_run:
        repair_tracker(state)
    return state.iteration


def refuse_unresolved(checkpoint_dir: str | os.PathLike | None) -> None:
    """In each rank, before Megatron reads --load: a folder that needs a decision (a bad or missing tracker
    beside iter_* folders, a damaged tracked checkpoint) is refused rather than silently restarted or left with
    exit status 0. Read-only: ranks run at once, and the launcher makes the repair before they start."""
    if checkpoint_dir is None:
        return
    state = resume_state(checkpoint_dir)
    if state.error:
        raise UserError(state.error)
    if state.needs_repair:
        resumes = "from the beginning" if state.iteration is None else f"from iteration {state.iteration}"
        raise UserError(f"error: {state.reason}. run_mcore_qwen.sh repairs this itself (the run would resume "
                        f"{resumes}); when launching torchrun directly, run `python -m "
                        f"megatron_patch.checkpoint_state --repair {checkpoint_dir}` first, or, {START_OVER}.")


def main(argv: list[str] | None = None) -> int:
    """python -m megatron_patch.checkpoint_state [--repair] CHECKPOINT_DIR: say what a relaunch would resume
    from; with --repair, fix the tracker as the launcher would."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_patch.checkpoint_state", description=main.__doc__)
    parser.add_argument("checkpoint_dir")
    parser.add_argument("--repair", action="store_true", help="rewrite the tracker to the checkpoint found")
    args = parser.parse_args(argv)
    iteration = prepare_resume(args.checkpoint_dir, dry_run=not args.repair)
    print("fresh start" if iteration is None else f"resumes from iteration {iteration}")
    return 0


if __name__ == "__main__":
    from megatron_patch.errors import report_user_errors

    sys.exit(report_user_errors(main)())
