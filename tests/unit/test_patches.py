"""The patch manifest (megatron_patch/patches): every entry names tests that exist; --plain-kernels takes none of
the fused entries and builds megatron-core's own modules; each upstream limitation a fix works around is still
there, and the fix works. Fast: no training run (the end-to-end checks are in test_training and
test_checkpoint_resume)."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_patch import patches
from megatron_patch.patches import megatron_fixes

from training_utils import REPO_ROOT  # noqa: E402


def _test_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_manifest_entry_says_what_why_until_and_names_existing_tests():
    names = [p.name for p in patches.MANIFEST]
    assert len(names) == len(set(names)), f"duplicate patch names: {names}"
    for patch in patches.MANIFEST:
        assert patch.kind in (patches.PROCESS, patches.FIX, patches.CPU, patches.FUSED, patches.RELIABILITY,
                              patches.LOGGING, patches.OPTION), patch
        assert patch.changes and patch.why and patch.until and patch.tests, f"{patch.name}: an empty field"
        for test in patch.tests:
            file, _, function = test.partition("::")
            path = REPO_ROOT / file
            assert path.is_file(), f"{patch.name}: {file} does not exist"
            assert function in _test_functions(path), f"{patch.name}: {test} does not exist"


def patched_targets(patch) -> list[str]:
    """An entry's `changes` as dotted names: {a,b} expanded, a trailing '(note)' dropped; a slot (an attribute that
    exists only where an optional package fills it) as its module's name."""
    names = []
    for change in patch.changes:
        name, _, note = change.partition(" (")
        if note.startswith("a slot"):
            name = name.rsplit(".", 1)[0]
        head, brace, rest = name.partition("{")
        if not brace:
            names.append(name)
            continue
        siblings, _, tail = rest.partition("}")
        names += [f"{head}{sibling}{tail}" for sibling in siblings.split(",")]
    return names


def resolve(dotted: str):
    """The object at a dotted name: the longest importable module prefix, then attributes. Raises
    ModuleNotFoundError when the name's top package is not installed."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            if cut == 1:
                raise
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found


def test_every_patched_target_exists_in_the_pinned_megatron_core():
    """The manifest is a contract: megatron-core is the release it was written against, and every name an entry
    replaces is there (a package that is not installed here, e.g. Transformer Engine on a CPU, is left out). A new
    megatron-core release fails here with each entry's 'until', to be reviewed one by one."""
    from importlib.metadata import version

    installed = version("megatron-core")
    assert installed == patches.PINNED_MEGATRON_CORE, (
        f"megatron-core {installed} is installed; the manifest was written against {patches.PINNED_MEGATRON_CORE}. "
        "Review each entry before moving the pin:\n" + "\n".join(f"  {p.name}: {p.until}" for p in patches.MANIFEST))
    missing, unchecked = [], []
    for patch in patches.MANIFEST:
        for target in patched_targets(patch):
            try:
                resolve(target)
            except ModuleNotFoundError:
                unchecked.append(target)
            except AttributeError:
                missing.append(f"{patch.name}: {target}")
    assert not missing, "names the manifest replaces are gone:\n" + "\n".join(missing)
    assert all(t.startswith("transformer_engine.") for t in unchecked), unchecked


def test_manifest_table_lists_every_entry():
    table = subprocess.run([sys.executable, "-m", "megatron_patch.patches"], capture_output=True, text=True,
                           cwd=REPO_ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert table.returncode == 0, table.stderr
    for patch in patches.MANIFEST:
        assert f"{patch.name}  [{patch.kind}" in table.stdout
    assert "cpu-eager-fusions-at-import  [cpu, while importing Megatron]" in table.stdout


TORCH_COMPILE_AT_IMPORT = """
import json, torch
real = torch.compile
from megatron_patch.megatron_startup import importing_megatron
with importing_megatron():
    during = torch.compile is not real
    from megatron.core.fusions import fused_bias_swiglu
after = torch.compile is real
print(json.dumps([during, after, type(fused_bias_swiglu.swiglu).__name__]))
"""


def test_torch_compile_is_eager_only_while_megatron_is_imported():
    """On a CPU, megatron-core's torch.compile'd fusions stay plain functions (no inductor load at start-up), and
    torch.compile is torch's own again once the import is done."""
    if torch.cuda.is_available():
        pytest.skip("the import-time entry is the CPU backend's")
    proc = subprocess.run([sys.executable, "-c", TORCH_COMPILE_AT_IMPORT], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    during, after, fusion = json.loads(proc.stdout.strip().splitlines()[-1])
    assert during and after and fusion == "function"


def _args(plain_kernels: bool, **overrides) -> SimpleNamespace:
    values = dict(plain_kernels=plain_kernels, optimizer="adam", gradient_accumulation_fusion=True,
                  apply_rope_fusion=True, bias_swiglu_fusion=True)
    return SimpleNamespace(**{**values, **overrides})


def test_plain_kernels_take_no_fused_entry_and_megatron_core_local_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_patch.attention import SDPACoreAttention
    from megatron_patch.fused.rms_norm import FusedRMSNorm
    from megatron_patch.model import qwen2_5_decoder_spec, qwen2_5_layer_spec

    for device in ("cpu", "cuda"):
        assert not [p.name for p in patches.wanted(_args(True), device) if p.kind == patches.FUSED], device
    assert {"fused-rope", "multi-tensor-optimizer-maths", "fused-adamw"} <= \
        {p.name for p in patches.wanted(_args(False), "cpu")}
    # Exactly megatron-core's local spec (its reprs compare the classes and functions of every submodule).
    assert repr(qwen2_5_layer_spec(use_te=False, fused_kernels=False)) == \
        repr(get_gpt_layer_local_spec(normalization="RMSNorm"))
    assert repr(qwen2_5_decoder_spec(None, use_te=False, fused_kernels=False)) == \
        repr(get_gpt_layer_local_spec(normalization="RMSNorm"))
    fused = qwen2_5_layer_spec(use_te=False, fused_kernels=True).submodules
    assert fused.self_attention.submodules.core_attention is SDPACoreAttention
    assert fused.input_layernorm is FusedRMSNorm and fused.pre_mlp_layernorm is FusedRMSNorm


@pytest.mark.parametrize("fp8, fp32_accumulation, taken", [
    ("hybrid", True, True),  # PR=fp8 with MP_FP8_FPROP_ACCUMULATION=fp32
    ("hybrid", False, False),  # PR=fp8, TE's fast accumulation
    (None, True, False),  # the flag without fp8 (the launcher warns; nothing to change)
])
def test_the_fp8_accumulation_entry_is_taken_only_for_fp8_with_its_flag(fp8, fp32_accumulation, taken):
    for plain_kernels in (True, False):  # an OPTION entry: --plain-kernels does not decide it
        args = _args(plain_kernels, fp8=fp8, fp8_fprop_fp32_accumulation=fp32_accumulation)
        names = [p.name for p in patches.wanted(args, "cuda")]
        assert ("fp8-forward-fp32-accumulation" in names) is taken, (plain_kernels, names)


def test_plain_kernels_apply_no_fused_patch():
    """In a fresh interpreter (patches are process-wide): patches.apply with --plain-kernels leaves every slot a
    fused entry fills as megatron-core has it, and says which argument it changed; then apply without it fills
    them."""
    script = textwrap.dedent("""
        import json, sys
        from types import SimpleNamespace
        from megatron.core import optimizer, utils
        from megatron.core.fusions.fused_bias_swiglu import SwiGLUFunction
        from megatron.core.models.common.embeddings import rope_utils
        from megatron.core.optimizer import clip_grads
        from megatron.core.tensor_parallel import layers
        from megatron_patch import patches

        def slots():
            return {"rope": rope_utils.fused_apply_rotary_pos_emb is None,
                    "l2_norm": clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm,
                    "scale": clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale,
                    "torch_adam": optimizer.USING_PYTORCH_OPTIMIZER,
                    "grad_accum": not layers._grad_accum_fusion_available}

        base = dict(optimizer="adam", gradient_accumulation_fusion=False, bias_swiglu_fusion=True, cpu_threads=1)
        plain = SimpleNamespace(plain_kernels=True, apply_rope_fusion=True, **base)
        swiglu_backward = SwiGLUFunction.backward
        changes = patches.apply(plain, "cpu")
        report = {"plain": slots(), "plain_changes": changes, "apply_rope_fusion": plain.apply_rope_fusion,
                  "installed": patches.installed(), "swiglu_untouched": SwiGLUFunction.backward is swiglu_backward}
        fused = SimpleNamespace(plain_kernels=False, apply_rope_fusion=True, **base)
        report["fused_changes"] = patches.apply(fused, "cpu")
        report["fused"] = slots()
        print("REPORT" + json.dumps(report))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT")[-1])
    assert report["plain"] == {"rope": True, "l2_norm": True, "scale": True, "torch_adam": True, "grad_accum": True}
    assert report["swiglu_untouched"]
    assert not set(report["installed"]) & {p.name for p in patches.MANIFEST if p.kind == patches.FUSED}
    assert report["apply_rope_fusion"] is False
    assert report["plain_changes"] == ["--apply-rope-fusion off: no fused RoPE here (Transformer Engine's is "
                                       "absent and --plain-kernels leaves ours out)"]
    assert report["fused_changes"] == []
    assert report["fused"] == {"rope": False, "l2_norm": False, "scale": False, "torch_adam": False,
                               "grad_accum": True}  # the GEMM needs a GPU
    # The announcement line the training log carries (test_training checks it in a real run).
    assert "megatron_patch: plain megatron-core kernels; patches: children-die-with-parent, cpu-torch-cuda-functions," in done.stdout


def test_settle_args_is_the_one_place_args_change():
    from megatron.core.models.common.embeddings import rope_utils

    args = _args(False, gradient_accumulation_fusion=False)
    before = dict(vars(args))
    if rope_utils.fused_apply_rotary_pos_emb is None:  # this process has not installed fused-rope
        assert patches.settle_args(args) == ["--apply-rope-fusion off: no fused RoPE here (Transformer Engine's "
                                             "is absent)"]
        assert {k for k in before if before[k] != vars(args)[k]} == {"apply_rope_fusion"}
    # Nothing else changes arguments: no install function takes them.
    for patch in patches.MANIFEST:
        assert not inspect.signature(patch.install).parameters, patch.name


# ---------------------------------------------------------------- upstream limitations, still there

def test_dataset_helpers_need_no_make(monkeypatch):
    import megatron.core.datasets.utils as dataset_utils

    # Still needed: the wheel has no Makefile, so megatron-core's own compile step fails (exit 1, or no make).
    assert not (Path(dataset_utils.__file__).parent / "Makefile").exists()
    with pytest.raises((SystemExit, FileNotFoundError)):
        dataset_utils.compile_helpers()
    monkeypatch.setattr(dataset_utils, "compile_helpers", dataset_utils.compile_helpers)
    megatron_fixes.skip_dataset_helper_compilation()
    assert dataset_utils.compile_helpers() is None  # the shipped extension imports


def test_a_synchronous_save_starts_no_manager_process(monkeypatch):
    import multiprocessing
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Still needed: the results queue is a Manager's, started with 'spawn' (a new interpreter) on first use.
    source = inspect.getsource(filesystem_async.get_write_results_queue)
    assert "mp_mode: str = 'spawn'" in source and "ctx.Manager().Queue()" in source
    monkeypatch.setattr(filesystem_async, "_results_queue", None)
    megatron_fixes.keep_sync_save_results_in_process()
    before = set(multiprocessing.active_children())
    results = filesystem_async.get_write_results_queue()
    assert isinstance(results, queue.Queue) and set(multiprocessing.active_children()) == before
    results.put({0: ["written"]})
    assert results.get_nowait() == {0: ["written"]}  # what the writer threads hand back, within this process


def test_megatron_still_writes_the_tracker_in_place(tmp_path, monkeypatch):
    import megatron.training.checkpointing as checkpointing

    # Still needed: save_checkpoint opens the tracker itself for writing ('w' truncates it first).
    assert "maybe_msc.open(tracker_filename, 'w')" in inspect.getsource(checkpointing.save_checkpoint)

    monkeypatch.setattr(checkpointing, "maybe_msc", checkpointing.maybe_msc)
    megatron_fixes.write_checkpoint_tracker_atomically()
    tracker = Path(checkpointing.get_checkpoint_tracker_filename(str(tmp_path)))
    tracker.write_text("5")
    with checkpointing.maybe_msc.open(str(tracker), "w") as f:
        f.write("7")
        assert tracker.read_text() == "5", "the old tracker must stay whole until the new one is complete"
    assert tracker.read_text() == "7" and sorted(p.name for p in tmp_path.iterdir()) == [tracker.name]
    assert checkpointing.read_metadata(str(tracker)) == (7, False)  # reads go through unchanged
    assert checkpointing.maybe_msc.os.path.isfile(str(tracker))

    # A kill at the exact moment between writing the new text and the rename (MP_FAULT_INJECT) keeps the old one.
    script = f"from megatron_patch.checkpoint_state import write_tracker; write_tracker({str(tracker)!r}, '9')"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), MP_FAULT_INJECT="tracker-write:9"))
    assert done.returncode == 137, done.stderr
    assert tracker.read_text() == "7"


def test_nan_and_inf_checks_name_likely_causes(monkeypatch, caplog):
    from megatron.core.rerun_state_machine import RerunMode, RerunState, RerunStateMachine

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # megatron's message names the device
    nan = torch.tensor(float("nan"))
    message = "found NaN in local grad norm for bucket #0 in backward pass before data-parallel communication"

    def disabled_mode_error() -> str:
        with pytest.raises(RuntimeError) as raised:
            RerunStateMachine(mode=RerunMode.DISABLED).validate_result(
                result=nan, rejection_func=torch.isnan, message=message, fatal=True)
        return str(raised.value)

    # Still needed: megatron-core's message says where, not why.
    assert message in disabled_mode_error() and "learning rate" not in disabled_mode_error()
    monkeypatch.setattr(RerunStateMachine, "validate_result", RerunStateMachine.validate_result)
    megatron_fixes.name_likely_causes_of_nan()
    error = disabled_mode_error()
    assert f"{message}. Likely causes: a learning rate too high" in error
    assert "PR=bf16" in error and "bad data" in error

    # The default mode (validate_results) logs the same message before it reruns the iteration.
    machine = RerunStateMachine(mode=RerunMode.VALIDATE_RESULTS)
    machine.state, machine.first_iteration_complete = RerunState.INITIAL_RUN, True
    with caplog.at_level(logging.ERROR):
        machine.validate_result(result=torch.tensor(float("inf")), rejection_func=torch.isinf,
                                message="found Inf in local forward loss calculation", fatal=True)
    assert "found Inf in local forward loss calculation. Likely causes: a learning rate" in caplog.text
    # Other checks (spiky loss) keep their message.
    machine = RerunStateMachine(mode=RerunMode.DISABLED)
    with pytest.raises(RuntimeError, match=r"message='Spiky loss'\)$"):
        machine.validate_result(result=torch.tensor(50.0), rejection_func=lambda r: True, message="Spiky loss")


@pytest.mark.parametrize("cpu_threads, omp, local_world, expected", [
    (None, "3", "2", 3),   # OMP_NUM_THREADS, as the launcher or a test worker sets it
    (2, "3", "1", 2),      # --cpu-threads wins
    (None, None, "2", None),  # neither: the host's cores over the node's ranks
    (None, "junk", "1", None),
])
def test_a_cpu_rank_takes_its_thread_count_from_the_flag_then_omp_num_threads(monkeypatch, capsys, cpu_threads, omp,
                                                                               local_world, expected):
    from megatron_patch.patches import cpu_backend

    before = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    monkeypatch.setenv("WORLD_SIZE", local_world)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(cpu_backend.os, "cpu_count", lambda: 8)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    try:
        cpu_backend.share_cores(SimpleNamespace(cpu_threads=cpu_threads))
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert threads == (expected or 8 // int(local_world))
    assert f"({local_world} processes, {threads} threads each)" in capsys.readouterr().out
