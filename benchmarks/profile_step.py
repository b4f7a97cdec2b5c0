"""Where one training step's time goes: runs the entrypoint with the given Megatron flags and prints
torch.profiler's kernel table for one step (after warm-up), sorted by GPU time (CPU time on a CPU).
MP_PROFILE_HOST=1 instead prints the step's Python functions by host time (cProfile): what bounds a step whose
GPU waits on the host (small micro-batches, no CUDA graph). MP_PROFILE_DETAIL=1 adds a second table of the same
step's operators by input shape: which GEMM, copy or add runs on which tensors. MP_PROFILE_GAPS=1 instead
measures the GPU's idle time from one step's start to the next one's, the log line and the next batch included
(megatron_patch/harness/gpu_idle.py): what a CUDA-graphed step loses to the host.
The process exits once the profile is printed: the final checkpoint save would only measure the disk.

    MP_PROFILE_STEP=4 torchrun --nproc-per-node 1 -m benchmarks.profile_step --model-size 0.5B [Megatron flags]
"""

from __future__ import annotations

import os
import sys

from megatron_patch import pretrain_qwen  # first: applies the CPU backend / compat patches
from megatron.training import training
import torch

PROFILE_STEP = int(os.environ.get("MP_PROFILE_STEP", "4"))
_plain_train_step = training.train_step
_calls = 0


def profiled_train_step(*args, **kwargs):
    global _calls
    _calls += 1
    if os.environ.get("MP_PROFILE_GAPS") == "1":
        return gaps_profiled(*args, **kwargs)
    if _calls != PROFILE_STEP:
        return _plain_train_step(*args, **kwargs)
    if os.environ.get("MP_PROFILE_HOST") == "1":
        host_profiled(*args, **kwargs)
        finish()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    detail = os.environ.get("MP_PROFILE_DETAIL") == "1"
    with torch.profiler.profile(activities=activities, record_shapes=detail) as prof:
        _plain_train_step(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if int(os.environ.get("RANK", "0")) == 0:
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=45, max_name_column_width=90), flush=True)
        if detail:
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by=sort_by, row_limit=80, max_name_column_width=60, max_shapes_column_width=70), flush=True)
    finish()


_gap_profile: list = []


def gaps_profiled(*args, **kwargs):
    """Step PROFILE_STEP under a profiler that runs on until the next step starts (its log line and batch
    included); then prints the GPU's idle time in that window and exits."""
    if _calls == PROFILE_STEP + 1:
        _gap_profile[0].stop()
        if int(os.environ.get("RANK", "0")) == 0:
            from megatron_patch.harness import gpu_idle

            print(f"GPU idle between step starts:\n{gpu_idle.report(_gap_profile[0].events())}", flush=True)
        finish()
    if _calls == PROFILE_STEP:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        _gap_profile.append(torch.profiler.profile(activities=activities))
        _gap_profile[0].start()
    return _plain_train_step(*args, **kwargs)


def finish():
    """Ends the process after the profile (every rank profiles the same step, so all of them get here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def host_profiled(*args, **kwargs):
    import cProfile
    import pstats

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.runcall(_plain_train_step, *args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if int(os.environ.get("RANK", "0")) == 0:
        stats = pstats.Stats(profile, stream=sys.stdout)
        for key in ("tottime", "cumulative"):
            stats.sort_stats(key).print_stats(40)


training.train_step = profiled_train_step

if __name__ == "__main__":
    pretrain_qwen.main(sys.argv[1:])
