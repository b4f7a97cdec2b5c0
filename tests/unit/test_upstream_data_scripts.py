"""Upstream's two data scripts (toolkits/*/run_*.sh): their positional arguments become the Python tools' flags
(MP_DRY_RUN=1 prints the command and runs nothing), and what they refuse. Running them on data:
test_best_practice_commands.py's corpora."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from training_utils import REPO_ROOT, clean_env

PRETRAIN_SCRIPT = REPO_ROOT / "toolkits" / "pretrain_data_preprocessing" / "run_make_pretraining_dataset_megatron.sh"
SFT_SCRIPT = REPO_ROOT / "toolkits" / "sft_data_preprocessing" / "run_build_idxmap_sft_dataset.sh"


def run(script, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True, timeout=120,
                          env=clean_env(PYTHON=sys.executable, **env))


def flags_of(stdout: str) -> dict[str, str]:
    words = shlex.split(stdout.strip().splitlines()[-1])[2:]
    return {w: (words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else "")
            for i, w in enumerate(words) if w.startswith("--")}


def test_the_pretraining_script_passes_upstreams_arguments_on():
    proc = run(PRETRAIN_SCRIPT, "/data/cleaned_zst/", "Qwen2Tokenizer", "text", "/data/", "/ckpts/Qwen2.5-0.5B",
               MP_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    flags = flags_of(proc.stdout)
    assert flags["--input"] == "/data/cleaned_zst/" and flags["--output-prefix"] == "/data//mmap_qwen2_datasets"
    assert flags["--patch-tokenizer-type"] == "Qwen2Tokenizer" and flags["--load"] == "/ckpts/Qwen2.5-0.5B"
    assert flags["--json-keys"] == "text" and "--append-eod" in flags


@pytest.mark.parametrize("packing", [None, "true", "false"])
def test_the_sft_script_passes_upstreams_arguments_on(packing):
    args = ["/data/qwen_sft.json", "Qwen2Tokenizer", "256", "/data/mmap_qwen2_sft_datasets", "/ckpts/Qwen2-0.5B"]
    proc = run(SFT_SCRIPT, *args, *([packing] if packing else []), MP_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    flags = flags_of(proc.stdout)
    assert (flags["--input"], flags["--seq-length"], flags["--output-prefix"], flags["--load"]) == \
        ("/data/qwen_sft.json", "256", "/data/mmap_qwen2_sft_datasets", "/ckpts/Qwen2-0.5B")
    assert ("--sequence-packing" in flags) == (packing == "true")


@pytest.mark.parametrize("script, args, message", [
    (PRETRAIN_SCRIPT, ["in", "Qwen2Tokenizer", "text", "out"],
     "error: run_make_pretraining_dataset_megatron.sh takes 5 arguments, got 4."),
    (SFT_SCRIPT, ["in.json", "Qwen2Tokenizer", "256"], "error: run_build_idxmap_sft_dataset.sh takes 5 or 6 arguments, "
                                                       "got 3."),
    (SFT_SCRIPT, ["in.json", "Qwen2Tokenizer", "256", "out", "hf", "yes"],
     "error: default_packing (argument 6) must be true or false, got 'yes'."),
    (PRETRAIN_SCRIPT, ["in", "LLama3Tokenizer", "text", "out", "hf"],
     "--patch-tokenizer-type LLama3Tokenizer: these tools write Qwen2.5 data; pass Qwen2Tokenizer"),
])
def test_the_scripts_refuse_what_they_cannot_run(script, args, message):
    proc = run(script, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
