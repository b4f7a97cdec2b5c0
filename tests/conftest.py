"""Shared fixtures: the default Qwen2.5 tokenizer and tiny random-init HF checkpoints, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_tokenizer_dir(tmp_path_factory) -> Path:
    from megatron_patch.tokenizer import write_default_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    write_default_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory, default_tokenizer_dir) -> Path:
    """The `tiny` size as an fp32 HF checkpoint with the default tokenizer beside it."""
    from megatron_patch.hf_checkpoint import write_random_hf_checkpoint

    out = tmp_path_factory.mktemp("tiny_hf") / "model"
    return write_random_hf_checkpoint("tiny", out, dtype="float32", tokenizer_dir=default_tokenizer_dir)


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
