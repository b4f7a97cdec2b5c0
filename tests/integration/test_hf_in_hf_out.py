"""Straight from a Hugging Face folder to Hugging Face folders, through run_mcore_qwen.sh (SFT on raw JSON, fp32):
PRETRAIN_CHECKPOINT_PATH is the HF folder itself and MP_SAVE_HF=true writes OUTPUT_BASEPATH/hf/iter_NNNNNNN at
every save, in the background.

One run shares its launches between the checks: its exports are killed with SIGKILL at their most complete
moment (every file written, the folder not yet renamed: MP_FAULT_INJECT) and training goes on; the run is then
taken back to its iteration-2 checkpoint (as a crash right after that save leaves it) and relaunched: it resumes
exactly (the HF folder not read again), exports what was missing, keeps the newest (MP_SAVE_HF_KEEP=1), and its
folder is the convertor's MG2HF of the same checkpoint to the byte, with our model's logits in transformers.
A disk that fills up during the exports (root: a small tmpfs at OUTPUT_BASEPATH/hf) fails them the same way;
and a disk without room for one export is refused before torchrun.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_patch.harness.iteration_log import tensorboard_scalars
from megatron_patch.harness.launcher_runs import SCRIPT, clean_environ, launcher_argv
from test_convertor import logit_check
# test_faults' raw SFT records, its small file systems (and the fixture that unmounts them), its checkpoint check
from test_faults import _tmpfs, _unmount_after_test, checkpoint_complete, sft_json  # noqa: F401
from training_utils import run_tool

pytestmark = pytest.mark.timeout(900)

ITERATIONS = 4
SAVE_INTERVAL = 2


def command(data: Path, checkpoint: Path | str, out: Path, iterations: int = ITERATIONS,
            save_interval: int = SAVE_INTERVAL) -> list[str]:
    return ["sh", str(SCRIPT), *launcher_argv(
        MODEL_SIZE="tiny", BATCH_SIZE=2, GLOBAL_BATCH_SIZE=4, LR=1e-3, MIN_LR=1e-4, SEQ_LEN=64, PR="fp32", SFT=True,
        SAVE_INTERVAL=save_interval, DATASET_PATH=data, PRETRAIN_CHECKPOINT_PATH=checkpoint, iterations=iterations,
        warmup_iterations=1, OUTPUT_BASEPATH=out)]


def launch(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=clean_environ(MP_DATASET_TYPE="raw", MP_SAVE_HF="true", **env),
                          capture_output=True, text=True, timeout=600)


def exported(out: Path) -> list[str]:
    """What OUTPUT_BASEPATH/hf holds that looks like an export (hidden leftovers aside)."""
    return sorted(p.name for p in (out / "hf").iterdir() if not p.name.startswith(".")) if (out / "hf").is_dir() \
        else []


def run_folder(out: Path) -> Path:
    (folder,) = (out / "checkpoint").iterdir()
    return folder


@pytest.fixture(scope="module")
def hf_run(sft_json, tiny_hf_checkpoint, tmp_path_factory) -> dict:
    """The first launch (exports killed), the crash after iteration 2's save, the relaunch; and MG2HF of the
    relaunch's last checkpoint with --check-logits."""
    root = tmp_path_factory.mktemp("hf_io")
    out, args = root / "out", command(sft_json, tiny_hf_checkpoint, root / "out")
    first = launch(args, MP_SAVE_HF_KEEP="1", MP_FAULT_INJECT="SIGKILL@convert:output-written")
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    folder = run_folder(out)
    state = dict(first=first, first_exported=exported(out), first_hidden=sorted(os.listdir(out / "hf")),
                 first_losses=tensorboard_scalars(out / "tensorboard"),
                 first_grad_norms=tensorboard_scalars(out / "tensorboard", "grad-norm"),
                 first_complete=[checkpoint_complete(out, i) for i in (2, 4)])
    shutil.rmtree(folder / "iter_0000004")  # a crash after the save of iteration 2
    (folder / "latest_checkpointed_iteration.txt").write_text("2")
    shutil.move(out / "tensorboard", root / "tensorboard_of_the_first_launch")
    second = launch(args, MP_SAVE_HF_KEEP="1")
    state.update(second=second, second_losses=tensorboard_scalars(out / "tensorboard"), out=out, folder=folder,
                 second_grad_norms=tensorboard_scalars(out / "tensorboard", "grad-norm"))
    reference = root / "mg2hf"
    state["convert"] = run_tool([sys.executable, "-m", "megatron_patch.convert", "--mg2hf", "--model-size", "auto",
                                 "--load-dir", folder / "iter_0000004", "--save-dir", reference, "--hf-dir",
                                 tiny_hf_checkpoint, "--precision", "fp32", "--check-logits"])
    state["reference"] = reference
    return state


def test_killed_exports_leave_no_folder_and_training_goes_on(hf_run):
    """SIGKILL at each export's most complete moment: a warning each, training to its end (exit 0), no folder
    that looks like an export (the hidden partial ones only), both torch_dist checkpoints complete."""
    text = hf_run["first"].stdout + hf_run["first"].stderr
    for iteration in (2, 4):
        assert text.count(f"warning: the Hugging Face export of iteration {iteration} failed (killed by SIGKILL)") == 1
    assert "Traceback" not in text and "read from the Hugging Face folder" in text
    assert hf_run["first_exported"] == [], hf_run["first_exported"]
    assert all(".partial-" in name for name in hf_run["first_hidden"]) and hf_run["first_hidden"]
    assert hf_run["first_complete"] == [True, True]
    assert sorted(hf_run["first_losses"]) == list(range(1, ITERATIONS + 1))


def test_the_relaunch_resumes_exactly_and_exports_what_was_missing(hf_run):
    """From iteration 2's checkpoint, not the HF folder: iterations 3 and 4 as the first launch trained them, to
    the bit. The missing export of iteration 2 is written first, then 4's; MP_SAVE_HF_KEEP=1 leaves 4's alone and
    the dead exports' hidden folders are gone."""
    second, text = hf_run["second"], hf_run["second"].stdout + hf_run["second"].stderr
    assert second.returncode == 0, text[-4000:]
    assert "the Hugging Face folder" in text and "is not read" in text
    assert "read from the Hugging Face folder" not in text
    for metric in ("losses", "grad_norms"):
        first, second = hf_run[f"first_{metric}"], hf_run[f"second_{metric}"]
        assert second == {i: first[i] for i in (3, 4)}, (metric, first, second)
    out = hf_run["out"]
    assert text.index(f"wrote {out / 'hf' / 'iter_0000002'}") < text.index(f"wrote {out / 'hf' / 'iter_0000004'}")
    assert f"removed {out / 'hf' / 'iter_0000002'} (MP_SAVE_HF_KEEP=1)" in text
    assert sorted(os.listdir(out / "hf")) == ["iter_0000004"]


def test_the_export_is_the_convertors_and_gives_our_logits(hf_run):
    """OUTPUT_BASEPATH/hf/iter_0000004 is byte for byte the convertor's MG2HF of iteration 4's checkpoint (weights,
    config.json, tokenizer and generation files), and transformers on it gives our model's fp32 logits."""
    ours, reference = hf_run["out"] / "hf" / "iter_0000004", hf_run["reference"]
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in ours.iterdir()) == files
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(files)
    for name in files:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
    assert logit_check(hf_run["convert"].stdout)[0] <= 1e-5


def test_a_disk_that_fills_up_during_the_exports(sft_json, default_tokenizer_dir, tmp_path):
    """OUTPUT_BASEPATH/hf on its own small disk, filled up once the run has started (another job's files): each
    export fails with its ENOSPC, one warning each, deletes what it wrote, and training ends normally with its
    checkpoints complete. From random weights: config.json comes from the size table, the tokenizer from
    MP_TOKENIZER_PATH."""
    out = tmp_path / "out"
    out.mkdir()
    disk = _tmpfs(out / "hf", "80m")  # room for one export when the run starts (the launcher checks)
    proc = subprocess.Popen(command(sft_json, "none", out, iterations=2, save_interval=1), text=True,
                            env=clean_environ(MP_DATASET_TYPE="raw", MP_SAVE_HF="true",
                                              MP_TOKENIZER_PATH=str(default_tokenizer_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = ""
    while not text.endswith("\n") or "run_mcore_qwen: " not in text:  # the banner: the checks have passed
        line = proc.stdout.readline()
        assert line, text
        text += line
    with open(disk / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * (1 << 20))
        except OSError:
            pass
    text += proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-4000:]
    for iteration in (1, 2):
        (warning,) = [line for line in text.splitlines()
                      if line.startswith(f"warning: the Hugging Face export of iteration {iteration} failed")]
        assert "No space left on device" in warning, warning
    assert sorted(os.listdir(disk)) == ["filler"]
    assert checkpoint_complete(out, 1) and checkpoint_complete(out, 2)


def test_no_room_for_the_export_is_refused_before_torchrun(sft_json, tiny_hf_checkpoint, tmp_path):
    """Room for one checkpoint (12 bytes a parameter in fp32: 112 MiB) but not for it and its export (39 MB of
    weights and the tokenizer's files): refused, naming the export; without MP_SAVE_HF the run would start."""
    small = _tmpfs(tmp_path / "small", "150m")
    proc = launch(command(sft_json, tiny_hf_checkpoint, small / "out"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "GiB free, but one checkpoint of Qwen2.5-tiny takes about 0.11 GiB (weights and optimizer state) and its " \
           "Hugging Face export (MP_SAVE_HF) about 0.06 GiB more. Free some space, unset MP_SAVE_HF," in proc.stderr
    assert "torch.distributed.run" not in proc.stdout and not (small / "out" / "checkpoint").exists()
