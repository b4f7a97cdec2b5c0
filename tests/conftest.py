"""Shared fixtures: the default Qwen2.5 tokenizer and tiny random-init HF checkpoints, built once per session."""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from training_utils import REPO_ROOT  # noqa: E402,F401

# The project's shared data (real CMMLU CSVs): beside the checkout, or inside it where a copy of the tree carries it.
SHARED_DIR = next((p for p in (REPO_ROOT.parent / "shared", REPO_ROOT / "shared") if p.is_dir()),
                  REPO_ROOT.parent / "shared")

# A run started in the background by a shell without job control inherits SIGINT ignored, as would every process
# the tests start; the Ctrl-C tests need it delivered (ignored signals survive exec, handled ones do not).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GPU_ONLY = "gpu"  # the pytest mark of tests that need a CUDA GPU (pyproject.toml registers it)


@pytest.fixture(autouse=True)
def ample_host_memory(monkeypatch):
    """Launch plans made in the tests' own process, for machines described rather than detected, are not judged by
    this host's free memory (the OPTIMIZER_OFFLOAD check); the tests of that check set their own figure."""
    from megatron_patch import hardware

    monkeypatch.setattr(hardware, "available_host_bytes", lambda: 2**50)


def _gpu_run(config) -> bool:
    """`pytest -m gpu` (make test-gpu)."""
    return config.option.markexpr.strip() == GPU_ONLY


def pytest_configure(config):
    from megatron_patch.hardware import gpu_count

    # pytest-xdist's workers split the host's cores: a worker and all it starts use its share
    # (training_utils.worker_cores), unless the caller's OMP_NUM_THREADS says otherwise.
    if hasattr(config, "workerinput") and "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // config.workerinput["workercount"]))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    if _gpu_run(config) and gpu_count() == 0:
        raise pytest.UsageError("pytest -m gpu (make test-gpu) runs the tests that need a CUDA GPU, and torch sees "
                                "none here. Run it on a GPU machine; `make test` runs the rest.")


def pytest_ignore_collect(collection_path, config):
    """Under `-m gpu` only the test files that carry the mark are imported: the others import packages a GPU
    machine's own Python may lack (lm-eval, peft)."""
    if _gpu_run(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return True if f"mark.{GPU_ONLY}" not in collection_path.read_text(encoding="utf-8") else None
    return None


def pytest_collection_modifyitems(config, items):
    """Without a CUDA GPU the gpu-marked tests are collected and skipped, saying why."""
    from megatron_patch.hardware import gpu_count

    if gpu_count():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: `make test-gpu` runs it on a GPU machine")
    for item in items:
        if item.get_closest_marker(GPU_ONLY):
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def converted_tiny(tiny_hf_checkpoint, tmp_path_factory) -> Path:
    """tiny_hf_checkpoint converted to a Megatron release checkpoint by the older convertor script (fp32)."""
    from training_utils import OLD_CONVERTOR_SCRIPT, run_tool

    out = tmp_path_factory.mktemp("tiny_mcore") / "ckpt"
    # The older script's TP/PP are checked (TP=2 divides tiny's 2 kv heads, PP=2 its 2 layers), not baked in.
    run_tool(["bash", OLD_CONVERTOR_SCRIPT, "tiny", tiny_hf_checkpoint, out, "2", "2", "fp32", "true", "false"])
    return out


@pytest.fixture(scope="session")
def tiny_untied_hf_sharded(tmp_path_factory, default_tokenizer_dir) -> Path:
    """The `tiny` shape untied (its own lm_head), fp32, saved in 20 MB shards with an index."""
    import dataclasses

    from megatron_patch.hf_checkpoint import write_random_hf_checkpoint
    from megatron_patch.model_sizes import QWEN2_5_SIZES

    untied = dataclasses.replace(QWEN2_5_SIZES["tiny"], tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("tiny_untied_hf") / "model"
    return write_random_hf_checkpoint(untied, out, dtype="float32", seed=5, tokenizer_dir=default_tokenizer_dir,
                                      max_shard_size="20MB")


@pytest.fixture(scope="session")
def converted_tiny_untied(tiny_untied_hf_sharded, tmp_path_factory) -> Path:
    """tiny_untied_hf_sharded converted to a Megatron release checkpoint (fp32), by the convertor's CLI."""
    from training_utils import run_tool

    out = tmp_path_factory.mktemp("tiny_untied_mcore") / "ckpt"
    run_tool([sys.executable, "-m", "megatron_patch.convert", "--model-size", "auto", "--load-dir",
              tiny_untied_hf_sharded, "--save-dir", out, "--precision", "fp32"])
    return out


def train_layouts(layouts: dict[str, tuple[int, list[str], Path]], tmp_path_factory,
                  saved: tuple[str, ...] = ()) -> dict[str, dict]:
    """Each layout (processes, flags, starting weights) trains LAYOUT_ITERS iterations through the real entrypoint;
    those in `saved` also save their last iteration (with optimizer state). {name: {work, losses, grad_norms,
    log}}."""
    from training_utils import LAYOUT_ITERS, run_entrypoint, starting_weights, tensorboard_losses, tiny_mock_args

    def train(name: str) -> tuple[str, dict]:
        nproc, flags, weights = layouts[name]
        work = tmp_path_factory.mktemp(f"layout_{name}")
        args = tiny_mock_args(iters=LAYOUT_ITERS) + flags + starting_weights(weights)
        if name in saved:
            args += ["--save", str(work / "ckpt"), "--save-interval", str(LAYOUT_ITERS)]
        run_entrypoint(work, nproc, args)
        return name, dict(work=work, losses=tensorboard_losses(work), grad_norms=tensorboard_losses(work, "grad-norm"),
                          log=(work / "train.log").read_text())

    # Two at a time: much of a launch is single-threaded interpreter start-up.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(train, layouts))


@pytest.fixture(scope="session")
def layout_runs(converted_tiny, tmp_path_factory) -> dict[str, dict]:
    """Each of training_utils.LAYOUTS trains from `converted_tiny`; tp2 also saves its last iteration for the
    conversion back to HF. {name: {work, losses, grad_norms, log}}."""
    from training_utils import LAYOUTS

    return train_layouts({name: (nproc, flags, converted_tiny) for name, (nproc, flags) in LAYOUTS.items()},
                         tmp_path_factory, saved=("tp2",))


@pytest.fixture(scope="session")
def hf_layout_runs(request, tmp_path_factory) -> dict[str, dict]:
    """training_utils.HF_LAYOUTS: the tiny models from their Hugging Face folders and from their conversions."""
    from training_utils import HF_LAYOUTS

    return train_layouts({name: (nproc, flags, request.getfixturevalue(weights))
                          for name, (nproc, flags, weights) in HF_LAYOUTS.items()}, tmp_path_factory)


@pytest.fixture(scope="session")
def gpu_matrix_cpu_assets(tmp_path_factory, default_tokenizer_dir):
    """The GPU matrix's data (megatron_patch/harness/matrix_assets.py), small, for its CPU rows
    (test_gpu_matrix.py, test_dlc.py)."""
    from megatron_patch.harness.matrix_assets import prepare_assets
    from megatron_patch.harness.matrix_table import settings_table

    return prepare_assets(tmp_path_factory.mktemp("gpu_matrix_assets"), [settings_table()["cpu"].seq_len],
                          documents=300, records=200, tokenizer=default_tokenizer_dir)
