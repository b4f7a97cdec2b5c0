"""MP_SAVE_HF: a Hugging Face folder of every checkpoint the run saves, `OUTPUT_BASEPATH/hf/iter_NNNNNNN`.

The launcher watches the run folder's tracker; each iteration it names (Megatron writes it once the checkpoint is
complete) is converted by the convertor's own MG2HF (`python -m megatron_patch.convert --mg2hf`, the same code
and the same output as a user's conversion) in a background process the launcher owns, one at a time, at low
priority and without a GPU. Training waits for nothing more than before: its ranks copy the weights off the GPU
into the torch_dist checkpoint as always, and the export reads that checkpoint back (mostly from the page
cache) while training goes on. A gather inside the ranks would hold every rank for the gather and each save's
host memory for the write.

A folder is complete or absent: MG2HF writes under a hidden name and renames last (atomic_write.StagedFolder);
MP_SAVE_HF_KEEP deletes whole folders the same way (`remove_folder`). A failed export is one warning and
training goes on; at the end the launcher waits for pending exports (a stop ends them and says what was not
written). Exports run on node 0 only: its tracker is the run's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.atomic_write import StagedFolder, leftover_targets, recover_interrupted, remove_folder
from megatron_patch.checkpoint_state import iteration_folder_name, iteration_folders, read_tracker
from megatron_patch.errors import STOP_SIGNALS, signal_name, stop_signals_handled_by
from megatron_patch.hf_checkpoint import TOKENIZER_FILES
from megatron_patch.launch.positional import Launch
from megatron_patch import process_lifetime

STOP_GRACE_SECONDS = 30  # a stopped export's time to delete what it wrote, before SIGKILL
# config.json and the tokenizer's files beside the weights (Qwen2.5's tokenizer.json, vocab and merges: 16 MB)
SIDE_FILES_BYTES = 24 * 2**20
_ERROR_LINE = re.compile(r"^(error: |stopped by |[A-Za-z_.]*(Error|Exception)\b)")


def export_folder(launch: Launch) -> Path:
    return launch.output_basepath / "hf"


def export_precision(launch: Launch) -> str:
    """The exported weights' dtype: the run's 16-bit type (fp8 runs keep bf16 weights), or fp32."""
    return {"fp32": "fp32", "fp16": "fp16"}.get(launch.precision, "bf16")


def exports_adapters(launch: Launch) -> bool:
    """A LoRA run with MP_SAVE_HF=true exports its PEFT adapter folder; =merged the merged full weights."""
    return launch.lora is not None and launch.save_hf == "true"


def export_bytes(launch: Launch) -> int:
    """About what one export takes on disk (0 without MP_SAVE_HF)."""
    if launch.save_hf == "false":
        return 0
    weights = launch.trained_parameters if exports_adapters(launch) else launch.size.parameter_count
    return weights * (4 if export_precision(launch) == "fp32" else 2) + SIDE_FILES_BYTES


def export_source(launch: Launch, tokenizer: str) -> Path:
    """MG2HF's HF_DIR: what goes beside the weights. A LoRA adapter's is its Hugging Face base folder (PEFT loads
    the adapter over the folder it names). Otherwise `hf_source` in the run folder, written now: the
    checkpoint's config.json (or the size table's, as transformers writes it), the run's tokenizer files and a
    generation_config.json (the checkpoint's, or one naming the config's bos and eos tokens)."""
    if exports_adapters(launch) and launch.pretrain_is_hf:
        return Path(launch.pretrain_checkpoint)
    checkpoint = Path(launch.pretrain_checkpoint) if launch.pretrain_checkpoint else None
    with StagedFolder(launch.checkpoint_dir / "hf_source", "hf-source") as out:
        if launch.model_config is not None:
            shutil.copy2(launch.model_config, out / "config.json")
        else:
            from megatron_patch.hf_checkpoint import hf_config_for

            hf_config_for(launch.size, overrides={"architectures": ["Qwen2ForCausalLM"]}).to_json_file(
                out / "config.json")
        for name in TOKENIZER_FILES:
            for folder in (Path(tokenizer), checkpoint):
                if folder is not None and (folder / name).is_file() and not (out / name).exists():
                    shutil.copy2(folder / name, out / name)
        if not (out / "generation_config.json").exists():
            config = json.loads((out / "config.json").read_text())
            generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
            (out / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False}, indent=2))
    return launch.checkpoint_dir / "hf_source"


def export_command(launch: Launch, iteration: int, source: Path) -> list[str]:
    """MG2HF of one saved iteration into its folder under OUTPUT_BASEPATH/hf."""
    name = iteration_folder_name(iteration)
    command = [sys.executable, "-m", "megatron_patch.convert", "--mg2hf", "--model-size", "auto",
               "--load-dir", str(launch.checkpoint_dir / name), "--save-dir", str(export_folder(launch) / name),
               "--hf-dir", str(source), "--precision", export_precision(launch), "--overwrite"]
    return command + (["--merge-lora"] if launch.lora is not None and launch.save_hf == "merged" else [])


def _export_preexec() -> None:
    """The export's own process group (a terminal's Ctrl-C is the launcher's to act on), SIGKILL when the launcher
    dies, the stop signals' default actions (the convertor cleans up on SIGTERM), low priority."""
    os.setpgid(0, 0)
    process_lifetime.kill_when_parent_dies()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    os.nice(10)


@dataclass
class Export:
    iteration: int
    proc: subprocess.Popen
    log: Path
    started: float


class HFExports:
    """The run's exports: `poll` while training runs (start, finish, report, prune), `finish` once it ended."""

    def __init__(self, launch: Launch, source: Path, env: dict[str, str], log_prefix: Path, say):
        self.launch, self.source, self.say = launch, source, say
        self.folder = export_folder(launch)
        self.log_prefix = log_prefix
        threads = str(max(1, min(4, (os.cpu_count() or 4) // 4)))
        self.env = {**os.environ, **env, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}
        self.seen: int | None = None
        self.queue: list[int] = []
        self.running: Export | None = None
        self.failed: list[int] = []
        self.behind = False  # said once that exports fall behind
        for target in leftover_targets(self.folder):  # what exports killed with an earlier launch left
            recover_interrupted(target)

    def pids(self) -> list[int]:
        return [self.running.proc.pid] if self.running and self.running.proc.poll() is None else []

    def poll(self, stopping: bool = False) -> None:
        if self.running is not None and self.running.proc.poll() is not None:
            self._finished(self.running)
        if stopping:
            return
        self.queue += [i for i in self._newly_saved() if not (self.folder / iteration_folder_name(i)).is_dir()]
        keep = self.launch.save_hf_keep
        if keep is not None and len(self.queue) > keep:  # older ones would be deleted as soon as written
            skipped, self.queue = self.queue[:-keep], self.queue[-keep:]
            self.say(f"run_mcore_qwen: not exporting iteration(s) {', '.join(map(str, skipped))}: newer checkpoints "
                     f"are waiting and MP_SAVE_HF_KEEP={keep} keeps the newest\n")
        elif len(self.queue) > 1 and not self.behind:
            self.behind = True
            self.say(f"warning: checkpoints are saved faster than they are exported to Hugging Face ({len(self.queue)} "
                     "waiting); raise SAVE_INTERVAL, or set MP_SAVE_HF_KEEP to export only the newest.\n")
        if self.running is None and self.queue:
            self._start(self.queue.pop(0))

    def _newly_saved(self) -> list[int]:
        """The iterations saved since the last look: the tracker's first (a resumed run's), then every saved
        iteration up to the tracker's."""
        newest = read_tracker(self.launch.checkpoint_dir)[0]
        if not isinstance(newest, int) or newest == self.seen:  # before the first save, or mid-write
            return []
        seen, self.seen = self.seen, newest
        if seen is None:
            return [newest]
        return sorted(i for i in iteration_folders(self.launch.checkpoint_dir) if seen < i <= newest)

    def _start(self, iteration: int) -> None:
        log = self.log_prefix.with_name(f"{self.log_prefix.name}_hf_{iteration_folder_name(iteration)}.log")
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "w") as out:
                proc = subprocess.Popen(export_command(self.launch, iteration, self.source), env=self.env,
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_export_preexec)
        except OSError as err:  # no room even for its log: as failed as an export can be
            self.failed.append(iteration)
            self.say(f"warning: the Hugging Face export of iteration {iteration} could not start ({err}); "
                     "training goes on.\n")
            return
        self.running = Export(iteration, proc, log, time.monotonic())
        self.say(f"run_mcore_qwen: writing the Hugging Face folder of iteration {iteration} in the background "
                 f"(log: {log})\n")

    def _finished(self, export: Export) -> None:
        self.running = None
        target = self.folder / iteration_folder_name(export.iteration)
        if export.proc.returncode == 0 and target.is_dir():
            self.say(f"run_mcore_qwen: wrote {target} ({time.monotonic() - export.started:.1f} s)\n")
            self._prune()
            return
        self.failed.append(export.iteration)
        self.say(f"warning: the Hugging Face export of iteration {export.iteration} failed "
                 f"({_failure(export)}); no folder was written at {target}; the checkpoint itself is complete and "
                 f"training goes on. Export it later with: "
                 f"{shlex.join(export_command(self.launch, export.iteration, self.source))}\n")

    def _prune(self) -> None:
        """MP_SAVE_HF_KEEP=N: delete all but the newest N folders (never the run's own starting weights)."""
        keep = self.launch.save_hf_keep
        if keep is None:
            return
        start = Path(self.launch.pretrain_checkpoint).resolve() if self.launch.pretrain_checkpoint else None
        folders = [folder for _, folder in sorted(iteration_folders(self.folder).items())]
        for old in folders[:-keep]:
            if old.resolve() == start:
                continue
            try:
                remove_folder(old)
            except OSError as err:
                self.say(f"warning: cannot remove {old} (MP_SAVE_HF_KEEP={keep}): {err}\n")
                continue
            self.say(f"run_mcore_qwen: removed {old} (MP_SAVE_HF_KEEP={keep})\n")

    def finish(self, stopped_by: int | None) -> tuple[list[str], int | None]:
        """After training: the pending exports, waited for (after a stop: ended). Returns the lines saying what
        was not exported, and the stop signal that came while waiting, if one did."""
        stops: list[int] = []
        if stopped_by is None:
            self.poll()  # the final save
            if self.running or self.queue:
                self.say(f"run_mcore_qwen: training ended; waiting for the Hugging Face export of iteration(s) "
                         f"{', '.join(map(str, self._pending()))}\n")
            with stop_signals_handled_by(lambda signum, _frame: stops.append(signum)):
                while (self.running or self.queue) and not stops:
                    time.sleep(0.2)
                    self.poll()
        unwritten = self._pending()
        if stopped_by is not None:  # what was saved since the last look, the stop's own save included
            unwritten += [i for i in self._newly_saved() if not (self.folder / iteration_folder_name(i)).is_dir()]
        self._stop_running()
        lines = [f"run_mcore_qwen: not exported to Hugging Face: iteration(s) {', '.join(map(str, unwritten))} "
                 f"(complete checkpoints; export one with: "
                 f"{shlex.join(export_command(self.launch, unwritten[-1], self.source))})"] if unwritten else []
        if self.failed:
            lines.append(f"run_mcore_qwen: the Hugging Face export failed for iteration(s) "
                         f"{', '.join(map(str, self.failed))} (warnings above)")
        return lines, (stops[0] if stops else None)

    def _pending(self) -> list[int]:
        return ([self.running.iteration] if self.running else []) + self.queue

    def _stop_running(self) -> None:
        """SIGTERM to a running export (the convertor deletes its partial folder), SIGKILL if it takes too long."""
        self.queue.clear()
        export, self.running = self.running, None
        if export is None or export.proc.poll() is not None:
            return
        export.proc.terminate()
        try:
            export.proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            export.proc.kill()
            export.proc.wait()


def _failure(export: Export) -> str:
    """Why an export failed, in a few words: its signal, or the last error line of its log."""
    code = export.proc.returncode
    if code < 0:
        return f"killed by {signal_name(-code)}"
    try:
        lines = export.log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    found = next((line.strip() for line in reversed(lines) if _ERROR_LINE.match(line.strip())), None)
    return f"{found[:300]}; log: {export.log}" if found else f"exit status {code}; log: {export.log}"
