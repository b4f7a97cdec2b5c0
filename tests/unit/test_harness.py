"""The harness every run goes through (megatron_patch/harness/): the iteration lines written and read back by the
same module, the 25 positional arguments, and the clean environment."""

from __future__ import annotations

import pytest

from megatron_patch.harness.iteration_log import host_peak_gib, last_iteration_mark, logged_losses, \
    megatron_iteration_times, megatron_iterations, qwen_iteration_line, qwen_iterations, steady_throughput
from megatron_patch.harness.launcher_runs import clean_environ, launcher_argv
from megatron_patch.launch.positional import POSITIONAL, parse

# megatron-core 0.19.2's training_log line, as an fp16 run writes it (a skipped iteration has no grad norm).
MEGATRON_LOG = """\
 [2026-12-07 10:00:01] iteration        1/       3 | consumed samples:            8 | elapsed time per iteration (ms): \
812.3 | learning rate: 3.000000E-04 | global batch size:     8 | lm loss: 1.206192E+01 | loss scale: 4096.0 | \
grad norm: 9.125 | number of skipped iterations:   0 | number of nan iterations:   0 |
 [2026-12-07 10:00:02] iteration        2/       3 | consumed samples:           16 | elapsed time per iteration (ms): \
401.0 | learning rate: 2.000000E-04 | global batch size:     8 | lm loss: 1.083039E+01 | loss scale: 2048.0 | \
number of skipped iterations:   1 | number of nan iterations:   0 |
 validation loss at iteration       3 | lm loss value: 9.000000E+00 | lm loss PPL: 8.103084E+03 |
"""


def test_the_qwen_line_the_training_patch_writes_is_the_one_the_harness_reads():
    gpu = qwen_iteration_line(7, 12345.6, gpu_memory_gib=(1.0, 2.5, 3.0))
    cpu = qwen_iteration_line(8, 0.4, host_peak_rss_gib=1.25)
    assert gpu.lstrip().startswith(last_iteration_mark(7))
    (seven, eight) = qwen_iterations(f"noise\n{gpu}\n{cpu}\n")
    assert (seven.iteration, seven.tokens_per_s_per_gpu, seven.gpu_peak_gib, seven.host_peak_rss_gib) == \
        (7, 12346.0, 2.5, None)
    assert (eight.iteration, eight.tokens_per_s_per_gpu, eight.gpu_peak_gib, eight.host_peak_rss_gib) == \
        (8, 0.0, None, 1.25)
    # On a GPU the line carries the host's peak as well (optimizer offload keeps Adam's state there).
    both = qwen_iteration_line(9, 10.0, gpu_memory_gib=(1.0, 2.5, 3.0), host_peak_rss_gib=96.5)
    (nine,) = qwen_iterations(both)
    assert (nine.gpu_peak_gib, nine.host_peak_rss_gib) == (2.5, 96.5)
    assert host_peak_gib(f"{gpu}\n{both}\n{cpu}") == 96.5 and host_peak_gib(gpu) is None


def test_steady_throughput_is_total_tokens_over_total_time_after_the_warm_up():
    lines = [qwen_iteration_line(i, rate, gpu_memory_gib=(1.0, peak, 2.0))
             for i, (rate, peak) in enumerate([(10, 1.0), (20, 1.0), (30, 1.0), (40, 1.0), (50, 1.0), (100, 4.0),
                                               (300, 2.0)], start=1)]
    rate, peak = steady_throughput("\n".join(lines))
    assert rate == pytest.approx(2 / (1 / 100 + 1 / 300)) and peak == 4.0  # harmonic mean of the last two
    assert steady_throughput(qwen_iteration_line(1, 0.2)) == (0.0, 0.0)  # a rate logged as 0


def test_megatrons_iteration_line_gives_loss_grad_norm_scale_and_skips():
    found = megatron_iterations(MEGATRON_LOG)
    assert sorted(found) == [1, 2]  # the validation line is not an iteration
    assert found[1] == {"lm loss": 12.06192, "grad norm": 9.125, "loss scale": 4096.0, "skipped": 0}
    assert found[2] == {"lm loss": 10.83039, "grad norm": None, "loss scale": 2048.0, "skipped": 1}
    assert logged_losses(MEGATRON_LOG) == [12.06192, 10.83039]


def test_megatrons_iteration_line_gives_when_each_iteration_ended_and_how_long_it_took():
    from datetime import datetime

    times = megatron_iteration_times(MEGATRON_LOG)
    assert sorted(times) == [1, 2]
    assert times[1] == (datetime(2026, 12, 7, 10, 0, 1).timestamp(), pytest.approx(0.8123))
    assert times[2][0] - times[1][0] == 1.0 and times[2][1] == pytest.approx(0.401)


def test_the_peak_host_memory_of_a_process_tree_counts_its_children(tmp_path):
    """A grandchild that holds 300 MB for a moment: the tree's peak shows it."""
    import subprocess
    import sys

    from megatron_patch.harness.host_memory import TreeMemory

    child = "import time; held = bytes(range(256)) * (300 * 2**20 // 256); time.sleep(1.5)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with TreeMemory(proc.pid, interval=0.1) as memory:
        proc.wait()
    assert 0.29 < memory.peak_gib < 0.5 and 0.29 < memory.largest_gib < 0.5, (memory.peak_gib, memory.largest_gib)


def test_launcher_argv_is_the_25_positionals_the_launcher_parses(tmp_path):
    argv = launcher_argv(MODEL_SIZE="tiny", BATCH_SIZE=2, GLOBAL_BATCH_SIZE=4, LR=1e-3, MIN_LR=1e-4, SEQ_LEN=64,
                         PR="fp32", TP=2, DO=True, DATASET_PATH=tmp_path / "data", iterations=3, warmup_iterations=1,
                         OUTPUT_BASEPATH=tmp_path / "out")
    assert len(argv) == len(POSITIONAL)
    launch = parse(argv, {})
    assert (launch.tp, launch.pp, launch.distributed_optimizer, launch.sp, launch.pad_len) == (2, 1, True, False, 64)
    assert (launch.train_iters, launch.warmup_iters, launch.lr) == (3, 1, 1e-3)  # tokens: 3 x 4 x 64
    assert launch.valid_dataset_path == launch.dataset_path == str(tmp_path / "data")
    assert launch.pretrain_checkpoint is None and argv[POSITIONAL.index("PRETRAIN_CHECKPOINT_PATH")] == "none"
    sft = parse(launcher_argv(MODEL_SIZE="tiny", BATCH_SIZE=1, GLOBAL_BATCH_SIZE=4, LR=1e-3, MIN_LR=1e-4, SEQ_LEN=64,
                              PR="fp32", SFT=True, DATASET_PATH="d.json", iterations=5, OUTPUT_BASEPATH="o"), {})
    assert sft.sft and sft.train_tokens_or_iters == 5  # SFT budgets are iterations
    with pytest.raises(TypeError, match="unknown argument.*TENSOR_PARALLEL"):
        launcher_argv(TENSOR_PARALLEL=2)
    with pytest.raises(TypeError, match="no value for MODEL_SIZE"):
        launcher_argv(BATCH_SIZE=1, GLOBAL_BATCH_SIZE=4, LR=1, MIN_LR=1, SEQ_LEN=64, PR="bf16", DATASET_PATH="d",
                      TRAIN_TOKENS_OR_ITERS=1, OUTPUT_BASEPATH="o")


def test_clean_environ_drops_the_callers_knobs_and_scheduler(monkeypatch):
    monkeypatch.setenv("MP_CUDA_GRAPH", "true")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.setenv("KEEP_ME", "1")
    env = clean_environ(MP_TOKENIZER_PATH="/tok")
    assert "MP_CUDA_GRAPH" not in env and "MASTER_PORT" not in env
    assert env["KEEP_ME"] == "1" and env["MP_TOKENIZER_PATH"] == "/tok" and env["PYTHONUNBUFFERED"] == "1"
