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


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "dp2_distributed_optimizer", "tp2_pp2"])
def test_first_iteration_loss_matches_single_process(layout_losses, layout):
    assert abs(layout_losses[layout][1] - layout_losses["tp1"][1]) <= 1e-5, layout_losses


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


@pytest.mark.parametrize("layout", ["dp2", "dp2_distributed_optimizer"])
def test_data_parallel_follows_single_process(layout_losses, layout):
    # Same global batch split over two ranks: every iteration, not only the first, must agree.
    for it in range(2, LAYOUT_ITERS + 1):
        assert abs(layout_losses[layout][it] - layout_losses["tp1"][it]) <= 1e-5, layout_losses


def test_bf16_starts_where_fp32_does(layout_losses):
    # bf16 rounds every GEMM: iteration 1 within the GPU matrix's bf16 tolerance of fp32, and it still learns.
    from megatron_patch.harness.matrix_table import tolerance

    bf16, fp32 = layout_losses["tp1_bf16"], layout_losses["tp1"]
    assert abs(bf16[1] - fp32[1]) <= tolerance("bf16", "fp32", on_gpu=False).loss, layout_losses
    assert bf16[LAYOUT_ITERS] < bf16[1], bf16


def test_a_rank_forked_from_the_warm_process_trains_as_a_fresh_python_does(tmp_path):
    """The harness forks ranks from a warm process (tests/warm_ranks.py); a fresh `python -m` rank with the same
    arguments must log the same losses, to the last bit (an import order that compiled Megatron's fusions once
    moved them by 1e-3)."""
    import os
    import subprocess
    import sys

    from training_utils import REPO_ROOT, free_port, run_entrypoint, tensorboard_losses

    args = tiny_mock_args(iters=2)
    run_entrypoint(tmp_path / "warm", 1, args)
    warm = tensorboard_losses(tmp_path / "warm")
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(os.cpu_count() or 2), RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    fresh = subprocess.run([sys.executable, "-m", "megatron_patch.pretrain_qwen", *args, "--tensorboard-dir",
                            str(fresh_dir / "tb"), "--tensorboard-log-interval", "1"], cwd=fresh_dir, env=env,
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert sorted(warm) == [1, 2] and warm == tensorboard_losses(fresh_dir), (warm, tensorboard_losses(fresh_dir))


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
