"""The real entrypoint on the CPU, its ranks started as torchrun starts them: layouts agree, and ranks end with
their launcher. (Exact resume after a kill: test_best_practice_commands.test_kill_9_and_relaunch_continues_exactly.)"""

from __future__ import annotations

import math
import re

import pytest

from megatron_patch.harness.iteration_log import qwen_iterations
from training_utils import LAYOUT_ITERS, LAYOUTS, tiny_mock_args

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def layout_losses(layout_runs):
    """{layout: {iteration: loss}}, every layout from the same converted checkpoint (conftest.layout_runs)."""
    return {name: run["losses"] for name, run in layout_runs.items()}


def test_every_layout_trains_three_iterations_with_finite_loss(layout_losses):
    assert set(layout_losses) == set(LAYOUTS)
    for name, losses in layout_losses.items():
        assert sorted(losses) == list(range(1, LAYOUT_ITERS + 1)), name
        assert all(math.isfinite(v) for v in losses.values()), (name, losses)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2_pp2", "dp2", "dp2_distributed_optimizer"])
def test_every_layout_follows_one_process_at_every_iteration(layout_runs, layout):
    """The same loss and grad norm as one process at every iteration, within the GPU matrix's fp32 CPU tolerance:
    the forward at iteration 1, then each layout's backward (grad norm), gradient reduction and optimizer step."""
    from megatron_patch.harness.matrix_table import tolerance

    tol = tolerance("fp32", "fp32", on_gpu=False)
    got, want = layout_runs[layout], layout_runs["tp1"]
    assert sorted(got["grad_norms"]) == sorted(want["grad_norms"]) == list(range(1, LAYOUT_ITERS + 1)), got
    for it in range(1, LAYOUT_ITERS + 1):
        assert abs(got["losses"][it] - want["losses"][it]) <= tol.loss, (layout, it, got["losses"], want["losses"])
        assert abs(got["grad_norms"][it] - want["grad_norms"][it]) <= tol.grad_norm * want["grad_norms"][it], \
            (layout, it, got["grad_norms"], want["grad_norms"])


def test_fused_kernels_follow_megatron_plain_path(layout_losses):
    # SDPA, fused RMSNorm/RoPE, the chunked linear + cross-entropy and the optimizer patches against megatron-core's
    # own modules and paths, 3 iterations.
    for it in range(1, LAYOUT_ITERS + 1):
        assert abs(layout_losses["tp1_plain_kernels"][it] - layout_losses["tp1"][it]) <= 1e-5, layout_losses


def test_plain_kernels_run_megatron_core_modules_and_no_fused_patch(layout_runs):
    """MP_FUSED_KERNELS=false (--plain-kernels): megatron-core's own DotProductAttention and RMSNorm, none of the
    manifest's fused entries; the default run has ours."""
    from megatron_patch import patches

    fused_names = [p.name for p in patches.MANIFEST if p.kind == patches.FUSED]
    plain, fused = layout_runs["tp1_plain_kernels"]["log"], layout_runs["tp1"]["log"]
    assert "Qwen2.5 GPTModel modules: core attention DotProductAttention, norms RMSNorm" in plain
    assert "Qwen2.5 GPTModel modules: core attention SDPACoreAttention, norms FusedRMSNorm" in fused
    (plain_patches,) = re.findall(r"megatron_patch: plain megatron-core kernels; patches: (.*)", plain)
    (fused_patches,) = re.findall(r"megatron_patch: fused kernels; patches: (.*)", fused)
    assert not set(plain_patches.split(", ")) & set(fused_names), plain_patches
    assert {"fused-rope", "multi-tensor-optimizer-maths", "fused-adamw"} <= set(fused_patches.split(", "))
    assert "megatron_patch: --apply-rope-fusion off: no fused RoPE here" in plain


@pytest.mark.parametrize("direct,two_step", [("hf_tp1", "tp1"), ("hf_tp2_pp2", "tp2_pp2"),
                                             ("untied_hf_tp1", "untied_tp1"), ("untied_hf_tp2_pp2", "untied_tp2_pp2")])
def test_training_from_a_hugging_face_folder_starts_as_convert_then_train_does(layout_runs, hf_layout_runs, direct,
                                                                              two_step):
    """PRETRAIN_CHECKPOINT_PATH as the HF folder itself (each rank reads its own TP/PP shards: the tied model's
    single file, the untied one's shards) against its fp32 conversion loaded by Megatron: iteration 1's loss and
    gradient norm to the bit."""
    runs = {**layout_runs, **hf_layout_runs}
    for metric in ("losses", "grad_norms"):
        assert runs[direct][metric][1] == runs[two_step][metric][1], (metric, runs[direct][metric],
                                                                      runs[two_step][metric])
    assert "tensors of this stage read from the Hugging Face folder" in runs[direct]["log"]


def test_log_reports_tokens_per_second_and_memory(layout_runs):
    # Iterations 2 and 3 (the first has no interval to measure): tiny's 4 x 64 tokens per iteration.
    lines = qwen_iterations(layout_runs["tp1"]["log"])
    assert [line.iteration for line in lines] == [2, 3], lines
    assert all(line.tokens_per_s_per_gpu > 0 and line.host_peak_rss_gib > 0.1 for line in lines), lines


@pytest.mark.parametrize("layout", ["tp1_recompute_selective", "tp1_recompute_block"])
def test_activation_recompute_changes_no_loss(layout_losses, layout):
    # Recomputing activations (selective; full for the first layer only, the rest kept) repeats the same maths.
    for it in range(1, LAYOUT_ITERS + 1):
        assert abs(layout_losses[layout][it] - layout_losses["tp1"][it]) <= 1e-5, layout_losses


def test_bf16_starts_where_fp32_does(layout_losses):
    # bf16 rounds every GEMM: iteration 1 within the GPU matrix's bf16 tolerance of fp32, and it still learns.
    from megatron_patch.harness.matrix_table import tolerance

    bf16, fp32 = layout_losses["tp1_bf16"], layout_losses["tp1"]
    assert abs(bf16[1] - fp32[1]) <= tolerance("bf16", "fp32", on_gpu=False).loss, layout_losses
    assert bf16[LAYOUT_ITERS] < bf16[1], bf16


def test_virtual_pipeline_trains_as_the_pipeline_without_it(tmp_path):
    """MP_VP on the CPU: the tiny shape with 4 layers at PP=2, one layer per virtual stage (two model chunks per
    rank, megatron-core's interleaved schedule), loads PP=2's iteration-1 checkpoint (weights and optimizer: layers
    1-2 | 3-4 resharded to 1, 3 | 2, 4) and trains iterations 2 and 3 as PP=2 did: loss and grad norm (fp32)."""
    from megatron_patch.harness.matrix_table import tolerance
    from training_utils import run_entrypoint, tensorboard_losses

    pp2 = tiny_mock_args(iters=3) + ["--num-layers", "4", "--pipeline-model-parallel-size", "2"]
    ckpt = tmp_path / "pp2_ckpt"
    run_entrypoint(tmp_path / "pp2", 2, pp2 + ["--save", str(ckpt), "--save-interval", "1"])
    run_entrypoint(tmp_path / "vp", 2, pp2 + ["--num-layers-per-virtual-pipeline-stage", "1", "--load", str(ckpt),
                                              "--ckpt-step", "1"])
    vp_log = (tmp_path / "vp" / "train.log").read_text()
    assert re.search(r"virtual_pipeline_model_parallel_size \.+ 2\b", vp_log), vp_log[:3000]
    assert re.search(r"successfully loaded checkpoint from .* at iteration\s+1\b", vp_log), vp_log[-3000:]
    tol = tolerance("fp32", "fp32", on_gpu=False)
    for tag, allowed in (("lm loss", lambda want: tol.loss), ("grad-norm", lambda want: tol.grad_norm * want)):
        want, got = tensorboard_losses(tmp_path / "pp2", tag), tensorboard_losses(tmp_path / "vp", tag)
        assert sorted(got) == [2, 3] and sorted(want) == [1, 2, 3], (tag, got, want)
        assert all(abs(got[it] - want[it]) <= allowed(want[it]) for it in got), (tag, got, want)


def test_a_rank_forked_from_the_warm_process_trains_as_a_fresh_python_does(tmp_path):
    """The harness forks ranks from a warm process (tests/warm_ranks.py); a fresh `python -m` rank with the same
    arguments must log the same losses, to the last bit (an import order that compiled Megatron's fusions once
    moved them by 1e-3)."""
    from training_utils import run_entrypoint, run_fresh_rank, tensorboard_losses

    args = tiny_mock_args(iters=2)
    run_entrypoint(tmp_path / "warm", 1, args)
    run_fresh_rank(tmp_path / "fresh", args)
    warm, fresh = tensorboard_losses(tmp_path / "warm"), tensorboard_losses(tmp_path / "fresh")
    assert sorted(warm) == [1, 2] and warm == fresh, (warm, fresh)


def test_ranks_exit_when_torchrun_is_killed(tmp_path):
    """kill -9 of torchrun alone (an OOM killer, a careless scheduler) must not leave ranks running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from training_utils import REPO_ROOT, free_port

    marker = str(tmp_path / "tb-orphan-check")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megatron_patch.pretrain_qwen",
           *tiny_mock_args(iters=100000), "--tensorboard-dir", marker]
    torchrun = subprocess.Popen(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ranks() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"megatron_patch.pretrain_qwen" in args and marker.encode() in args and int(pid) != torchrun.pid:
                found.append(int(pid))
        return found

    deadline = time.time() + 300
    while not (tmp_path / "tb-orphan-check").exists() and time.time() < deadline:
        time.sleep(1)  # TensorBoard's folder appears once the ranks are up
    assert len(ranks()) >= 2, "the ranks never started"
    torchrun.send_signal(signal.SIGKILL)
    torchrun.wait()
    deadline = time.time() + 30
    while ranks() and time.time() < deadline:
        time.sleep(0.5)
    leftover = ranks()
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"ranks {leftover} outlived their torchrun"


def test_a_failed_rank_exits_even_when_shutdown_would_block(tmp_path):
    """After an error the rank must end (so torchrun reports it and frees the GPUs) even if something, like a
    non-daemon thread or a communicator, would make the interpreter's shutdown wait forever."""
    import os
    import subprocess
    import sys

    from training_utils import REPO_ROOT

    script = """
import threading
from megatron_patch.pretrain_qwen import run_exiting_on_error

def entry(reason):
    threading.Thread(target=threading.Event().wait).start()  # never ends: a normal shutdown waits on it
    raise ValueError(reason)

run_exiting_on_error(entry, "no attention backend")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 1
    assert "ValueError: no attention backend" in done.stderr
