"""Where one training step's time goes: runs the entrypoint with the given Megatron flags and prints
torch.profiler's kernel table for one step (after warm-up), sorted by GPU time (CPU time on a CPU).
MP_PROFILE_HOST=1 instead prints the step's Python functions by host time (cProfile): what bounds a step whose
GPU waits on the host (small micro-batches, no CUDA graph). MP_PROFILE_DETAIL=1 adds a second table of the same
step's operators by input shape: which GEMM, copy or add runs on which tensors.

    MP_PROFILE_STEP=4 torchrun --nproc-per-node 1 benchmarks/profile_step.py --model-size 0.5B [Megatron flags]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_patch import pretrain_qwen  # noqa: E402  (applies the CPU backend / compat patches first)
from megatron.training import training  # noqa: E402
import torch  # noqa: E402

PROFILE_STEP = int(os.environ.get("MP_PROFILE_STEP", "4"))
_plain_train_step = training.train_step
_calls = 0


def profiled_train_step(*args, **kwargs):
    global _calls
    _calls += 1
    if _calls != PROFILE_STEP:
        return _plain_train_step(*args, **kwargs)
    if os.environ.get("MP_PROFILE_HOST") == "1":
        return host_profiled(*args, **kwargs)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    detail = os.environ.get("MP_PROFILE_DETAIL") == "1"
    with torch.profiler.profile(activities=activities, record_shapes=detail) as prof:
        result = _plain_train_step(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if int(os.environ.get("RANK", "0")) == 0:
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=45, max_name_column_width=90), flush=True)
        if detail:
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by=sort_by, row_limit=80, max_name_column_width=60, max_shapes_column_width=70), flush=True)
    return result


def host_profiled(*args, **kwargs):
    import cProfile
    import pstats

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profile = cProfile.Profile()
    result = profile.runcall(_plain_train_step, *args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if int(os.environ.get("RANK", "0")) == 0:
        stats = pstats.Stats(profile, stream=sys.stdout)
        for key in ("tottime", "cumulative"):
            stats.sort_stats(key).print_stats(40)
        sys.stdout.flush()
    return result


training.train_step = profiled_train_step

if __name__ == "__main__":
    pretrain_qwen.main(sys.argv[1:])
