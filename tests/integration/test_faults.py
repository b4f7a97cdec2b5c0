"""Faults a cluster job meets, injected on the CPU through the user's command (run_mcore_qwen.sh): a killed rank,
a killed torchrun, a killed launcher, a disk that fills up, a second launch into a live run's folder. Each checks
the exit status, the message, that no process of the run is left (by PID) and that no checkpoint was lost."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_patch.harness.iteration_log import megatron_iterations, tensorboard_scalars
from megatron_patch.harness.launcher_runs import SCRIPT, clean_environ, launcher_argv
from megatron_patch.launch.run import Log, RunFolderLock
from megatron_patch.process_lifetime import descendants


pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def sft_json(tmp_path_factory) -> Path:
    """Raw SFT records: the fastest data to start training from (no preprocessing)."""
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from it an were are which this be or has".split()
    records = [{"instruction": " ".join(rng.choice(words) for _ in range(8)),
                "output": " ".join(rng.choice(words) for _ in range(12))} for _ in range(64)]
    path = tmp_path_factory.mktemp("faults_data") / "sft.json"
    path.write_text(json.dumps(records))
    return path


def command(data: Path, out: Path, iterations: int = 10000, save_interval: int = 1) -> list[str]:
    """SFT on raw records (the fastest data to start from), a checkpoint every `save_interval` iterations."""
    return ["sh", str(SCRIPT), *launcher_argv(
        MODEL_SIZE="tiny", BATCH_SIZE=2, GLOBAL_BATCH_SIZE=4, LR=1e-3, MIN_LR=1e-4, SEQ_LEN=64, PR="fp32", SFT=True,
        SAVE_INTERVAL=save_interval, DATASET_PATH=data, iterations=iterations, warmup_iterations=1,
        OUTPUT_BASEPATH=out)]


def environment(tokenizer: Path) -> dict[str, str]:
    return clean_environ(MP_DATASET_TYPE="raw", MP_TOKENIZER_PATH=str(tokenizer))


class Run:
    """One launch of the user's command, with its output in a file and the PIDs of everything it started."""

    def __init__(self, data: Path, out: Path, tokenizer: Path, iterations: int = 10000, console: Path | None = None,
                 save_interval: int = 1):
        self.out = out
        self.console = console or out.parent / f"{out.name}.console"
        with open(self.console, "w") as console:
            # exec chain: sh -> python -m megatron_patch.launch, one PID
            self.proc = subprocess.Popen(command(data, out, iterations, save_interval), env=environment(tokenizer),
                                         stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set[int] = set()

    def text(self) -> str:
        return self.console.read_text(errors="replace")

    def note_processes(self) -> set[int]:
        self.seen |= set(descendants(self.proc.pid)) | {self.proc.pid}
        return self.seen

    def tracker(self) -> str:
        found = list((self.out / "checkpoint").glob("*/latest_checkpointed_iteration.txt"))
        return found[0].read_text().strip() if found else ""

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.note_processes()
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def process(self, role: str) -> int:
        """The PID of the launcher, torchrun or the rank (found by command line among this run's processes)."""
        if role == "launcher":
            return self.proc.pid
        marker = {"torchrun": "torch.distributed.run", "rank": "-u -m megatron_patch.pretrain_qwen"}[role]
        for pid in sorted(self.note_processes()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline and (role != "torchrun" or "torch.distributed.run" in cmdline.split(" -m ")[1]):
                return pid
        raise AssertionError(f"no {role} process among {self.seen}")

    def survivors(self, timeout: float) -> list[int]:
        """This run's processes still alive after `timeout` seconds (zombies count as gone)."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [pid for pid in self.seen if _alive(pid)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def logged(self, iteration: int) -> bool:
        return re.search(rf"iteration\s+{iteration}/", self.text()) is not None

    def signal_every_process_group(self, signum: int) -> None:
        """As a terminal's Ctrl-C signals its whole foreground group, and more: every group of this run (the
        launcher's, torchrun's, each rank's session), as a scheduler that signals every process would."""
        groups = set()
        for pid in self.note_processes():
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for group in groups:
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                pass

    def losses(self) -> dict[int, float]:
        return tensorboard_scalars(self.out / "tensorboard")

    def kill_all(self) -> None:
        for pid in self.note_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def checkpoint_complete(out: Path, iteration: int) -> bool:
    folders = list((out / "checkpoint").glob(f"*/iter_{iteration:07d}"))
    return bool(folders) and (folders[0] / "metadata.json").is_file() and any(folders[0].glob("*.distcp"))


VICTIMS = ("rank", "torchrun", "launcher")


def test_a_killed_process_ends_the_whole_run_and_keeps_its_checkpoint(sft_json, tmp_path, default_tokenizer_dir):
    """SIGKILL of the rank (the OOM killer), of torchrun alone, of the launcher alone: three runs side by side.
    While the first is live, a second launch into its folder is refused."""
    runs = {victim: Run(sft_json, tmp_path / victim, default_tokenizer_dir) for victim in VICTIMS}
    try:
        for victim, run in runs.items():
            # After the first save megatron-core's checkpoint writer has started its helper processes too.
            run.wait_for(lambda: run.tracker().isdigit() and 2 in megatron_iterations(run.text()), 600,
                         f"the {victim} run's first checkpoint")
        live = runs["rank"]
        second = subprocess.run(command(sft_json, live.out), env=environment(default_tokenizer_dir),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "another launch is training into this run folder" in second.stderr, second.stderr
        assert f"pid {live.proc.pid} on host" in second.stderr and "torch.distributed.run" not in second.stdout
        assert live.proc.poll() is None, "the refused launch disturbed the live one"

        for victim, run in runs.items():
            assert len(run.note_processes()) >= 4, run.seen  # launcher, torchrun, rank, the rank's helpers
            started = time.monotonic()
            os.kill(run.process(victim), signal.SIGKILL)
            if victim != "launcher":
                code = run.proc.wait(timeout=60)
                assert code != 0 and "training failed" in run.text(), run.text()[-2000:]
                assert time.monotonic() - started < 30, f"the launcher took too long to notice the {victim}'s death"
        for victim, run in runs.items():
            left = run.survivors(timeout=30)
            assert not left, f"processes of the run outlived the kill of the {victim}: {left}"
            assert checkpoint_complete(run.out, int(run.tracker())), list(run.out.rglob("*"))
    finally:
        for run in runs.values():
            run.kill_all()


def assert_stopped(run: Run, signum: int, saved_before: int | None) -> int:
    """The launch ended within seconds with exit status 128 + signum and, as its last line, the stop line naming
    the iteration the stop saved (newer than `saved_before`, complete, the tracker's); no traceback on the
    console, no process of the run left. Returns that iteration."""
    code = run.proc.wait(timeout=120)
    text = run.text()
    assert code == 128 + signum and "Traceback" not in text, (code, text[-5000:])
    saved = int(run.tracker())
    assert text.rstrip().splitlines()[-1] == (f"run_mcore_qwen: stopped by {signal.Signals(signum).name} after saving "
                                              f"iteration {saved}; run the same command to resume"), text[-2000:]
    assert saved > (saved_before or 0) and checkpoint_complete(run.out, saved), saved
    assert not run.survivors(timeout=30), "a process of the stopped run is left"
    return saved


def test_ctrl_c_and_sigterm_stop_after_saving_and_the_relaunch_resumes_exactly(sft_json, tmp_path,
                                                                                default_tokenizer_dir):
    """Ctrl-C (SIGINT to every process group of the run), then, on the relaunch that resumes from what it saved,
    a scheduler's SIGTERM to the launcher alone. Each launch ends with 130 / 143 and one line naming the
    iteration it saved, no traceback, no process left; the two launches' losses are those of an uninterrupted
    run of the same command (beside them, stopped the same way to flush its TensorBoard events)."""
    out = tmp_path / "stopped"
    first = Run(sft_json, out, default_tokenizer_dir, save_interval=10000)
    reference = Run(sft_json, tmp_path / "reference", default_tokenizer_dir, save_interval=10000)
    runs = [first, reference]
    try:
        first.wait_for(lambda: first.logged(2), 600, "iteration 2")
        first.signal_every_process_group(signal.SIGINT)
        stopped_at = assert_stopped(first, signal.SIGINT, saved_before=None)
        # The relaunch is stopped once it has logged stopped_at + 1: it saves that iteration or the next.
        reference.wait_for(lambda: reference.logged(stopped_at + 2), 600, "the reference's iterations")
        os.kill(reference.proc.pid, signal.SIGTERM)

        relaunch = Run(sft_json, out, default_tokenizer_dir, save_interval=10000, console=tmp_path / "relaunch")
        runs.append(relaunch)
        relaunch.wait_for(lambda: relaunch.logged(stopped_at + 1), 600, "an iteration after the resume")
        os.kill(relaunch.proc.pid, signal.SIGTERM)
        saved = assert_stopped(relaunch, signal.SIGTERM, saved_before=stopped_at)
        assert re.search(rf"successfully loaded checkpoint from .* at iteration\s+{stopped_at}\b", relaunch.text())
        assert not any(relaunch.logged(i) for i in range(1, stopped_at + 1)), "the relaunch started over"
        assert reference.proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        for run in runs:
            run.kill_all()
    losses, uninterrupted = first.losses(), reference.losses()  # `out` holds both launches' events
    assert sorted(losses) == list(range(1, saved + 1)), losses
    assert all(losses[i] == uninterrupted[i] for i in losses), (losses, uninterrupted)


def test_a_dead_launchs_lock_is_taken_over(tmp_path):
    checkpoint_dir = tmp_path / "checkpoint" / "run"
    stale = RunFolderLock(checkpoint_dir, 0)
    stale.path.parent.mkdir(parents=True)
    stale.path.write_text("pid 999999 on host gone, since yesterday\n")  # no process holds its flock
    lock = RunFolderLock(checkpoint_dir, 0)
    lock.acquire()
    try:
        assert f"pid {os.getpid()} on host" in lock.path.read_text()
    finally:
        lock.release()


def test_log_writes_that_fail_never_stop_the_output(capsys):
    log = Log(Path("/dev/full"))  # every write fails with ENOSPC, as on a full disk
    log.write("iteration 1\n")
    log.write("iteration 2\n")
    out, err = capsys.readouterr()
    assert out == "iteration 1\niteration 2\n"
    assert err.count("cannot write the log /dev/full") == 1 and "training goes on" in err


def test_too_little_space_for_one_checkpoint_is_refused_before_torchrun(sft_json, tmp_path, default_tokenizer_dir):
    small = _tmpfs(tmp_path / "small", "8m")
    proc = subprocess.run(command(sft_json, small / "out"), env=environment(default_tokenizer_dir),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "GiB free, but one checkpoint of Qwen2.5-tiny takes about" in proc.stderr, proc.stderr
    assert "torch.distributed.run" not in proc.stdout


def test_a_disk_that_fills_up_ends_the_run_and_keeps_the_last_checkpoint(sft_json, tmp_path, default_tokenizer_dir):
    disk = _tmpfs(tmp_path / "disk", "200m")  # room for one tiny checkpoint (~113 MB), not two
    run = Run(sft_json, disk / "out", default_tokenizer_dir, console=tmp_path / "console")  # not on the full disk
    try:
        run.wait_for(lambda: run.tracker() == "1", 400, "the iteration-1 checkpoint")
        filler = disk / "filler"
        with open(filler, "wb") as f:  # the disk fills up while training runs (another job, a core dump, ...)
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        code = run.proc.wait(timeout=300)
        assert code != 0, run.text()[-3000:]
        assert not run.survivors(timeout=30)
        text = run.text()
        assert "training failed" in text
        assert "cannot write the log" in text  # the launcher said so, and went on
    finally:
        run.kill_all()
    assert run.tracker() == "1"
    assert checkpoint_complete(disk / "out", 1)


def _tmpfs(path: Path, size: str) -> Path:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a small file system needs root to mount a tmpfs")
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    _mounted.append(path)
    return path


_mounted: list[Path] = []


@pytest.fixture(autouse=True)
def _unmount_after_test():
    yield
    while _mounted:
        subprocess.run(["umount", "-l", str(_mounted.pop())], capture_output=True)
