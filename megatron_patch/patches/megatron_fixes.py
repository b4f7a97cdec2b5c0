"""Changes to megatron-core 0.19.2's own behaviour that every run needs, GPU or CPU. Each is an entry of the
manifest in megatron_patch/patches/__init__.py, which says why and when it can go."""

from __future__ import annotations

import os
import resource
import time

import torch

from megatron_patch.harness.iteration_log import qwen_iteration_line


def skip_dataset_helper_compilation() -> None:
    """The wheel ships the compiled dataset helpers (helpers_cpp) but no Makefile, so Megatron's
    start-up `make` would fail: use the shipped extension instead."""
    import megatron.core.datasets.utils as dataset_utils

    def use_shipped_helpers() -> None:
        from megatron.core.datasets import helpers_cpp  # noqa: F401  (fails loudly if it is missing)

    dataset_utils.compile_helpers = use_shipped_helpers


def _wrap_training_log(prepare) -> None:
    """Wrap megatron.training.training.training_log: `prepare(kwargs, iteration)` runs before it (and may change
    its keyword arguments) and returns a function to run after it, or None."""
    import megatron.training.training as training

    original = training.training_log

    def training_log(*args, **kwargs):
        iteration = kwargs.get("iteration", args[3] if len(args) > 3 else None)
        afterwards = prepare(kwargs, iteration)
        result = original(*args, **kwargs)
        if afterwards is not None:
            afterwards()
        return result

    training.training_log = training_log


def reset_loss_average_on_log_boundaries() -> None:
    """0.19.2 logs a run's first iteration without resetting the loss accumulators, so when that iteration
    is itself a log-interval boundary (always with --log-interval 1) the next logged loss is the average of
    two iterations. Reset whenever the iteration is on a boundary, so every logged loss is its interval's."""
    import megatron.training.training as training

    def on_boundary_reset(kwargs, iteration):
        if kwargs.get("is_first_iteration") and iteration is not None:
            if iteration % training.get_args().log_interval == 0:
                kwargs["is_first_iteration"] = False
        return None

    _wrap_training_log(on_boundary_reset)


_last_log = {"time": None, "iteration": None}


def log_tokens_and_memory() -> None:
    """One line per log interval with what 0.19.2's own line lacks: tokens/s/GPU and memory."""
    import megatron.training.training as training

    def after_log(kwargs, iteration):
        if iteration is None or iteration % training.get_args().log_interval:
            return None
        return lambda: _log_tokens_and_memory(training, iteration)

    _wrap_training_log(after_log)


def _log_tokens_and_memory(training, iteration: int) -> None:
    args = training.get_args()
    now = time.time()
    last_time, last_iteration = _last_log["time"], _last_log["iteration"]
    _last_log.update(time=now, iteration=iteration)
    if last_time is None or iteration <= last_iteration:
        return
    tokens = (iteration - last_iteration) * args.global_batch_size * args.seq_length
    tokens_per_gpu = tokens / (now - last_time) / args.world_size
    memory = None
    if torch.cuda.is_available():
        gib = 1024 ** 3
        memory = (torch.cuda.memory_allocated() / gib, torch.cuda.max_memory_allocated() / gib,
                  torch.cuda.memory_reserved() / gib)
    # The host's peak too on a GPU: optimizer offload keeps Adam's state there.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    line = qwen_iteration_line(iteration, tokens_per_gpu, gpu_memory_gib=memory, host_peak_rss_gib=rss)
    writer = training.get_tensorboard_writer()
    if writer:
        writer.add_scalar("tokens-per-second-per-gpu", tokens_per_gpu, iteration)
    training.print_rank_last(line)


def load_distributed_optimizer_without_grad() -> None:
    """fp32 (no fp16/bf16) DistributedOptimizer: the main params are views of the model params, and the
    dp_reshardable loader copies into them with autograd on ("a view of a leaf Variable that requires grad is
    being used in an in-place operation"). Loading is a no_grad affair."""
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    optimizer_class._set_main_param_and_optimizer_states = torch.no_grad()(
        optimizer_class._set_main_param_and_optimizer_states)


def resume_torch_adam_step_in_distributed_optimizer() -> None:
    """Without Apex/TE (torch Adam: CPU runs, GPUs without TE) the state dict a checkpoint is loaded into reads
    Adam's 'step' from the optimizer state, which is empty before the first step: `assert len(steps) == 1`
    fails. The step is only a placeholder there (load_state_dict sets the checkpoint's), so report 0.
    load_state_dict then gives every parameter one shared 'step' tensor (torch Adam increments it in place once
    per parameter), and its parameter-state loader copies the placeholder over it. Adam's bias correction
    would be wrong after every resume: each parameter gets its own tensor holding the checkpoint's step."""
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    original = optimizer_class.state_dict

    def state_dict(self):
        if self.optimizer.state:
            return original(self)
        inner = self.optimizer.state_dict()
        out = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
        for group in out["optimizer"]["param_groups"]:
            del group["params"]
            group["step"] = 0
        if self.grad_scaler:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    optimizer_class.state_dict = state_dict
    original_load = optimizer_class.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        (step,) = {group["step"] for group in state_dict["optimizer"]["param_groups"]}
        for state in self.optimizer.state.values():
            state["step"] = torch.tensor(float(step))

    optimizer_class.load_state_dict = load_state_dict


class _AtomicTrackerStorage:
    """megatron.training.checkpointing's `maybe_msc` (local files or the multi-storage client), except that
    writing the tracker goes through checkpoint_state.write_tracker (replaced whole)."""

    def __init__(self, storage):
        self._storage = storage

    def open(self, path, mode="r", *args, **kwargs):
        from megatron.core.msc_utils import MultiStorageClientFeature

        from megatron_patch.checkpoint_state import TRACKER

        if mode == "w" and os.path.basename(str(path)) == TRACKER and not MultiStorageClientFeature.is_enabled():
            return _AtomicTextFile(path)
        return self._storage.open(path, mode, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._storage, name)


class _AtomicTextFile:
    """A text file opened for writing whose content lands all at once when it is closed without an error."""

    def __init__(self, path):
        self.path, self.parts = path, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            from megatron_patch.checkpoint_state import write_tracker

            write_tracker(self.path, "".join(self.parts))
        return False


def keep_sync_save_results_in_process() -> None:
    """A synchronous torch_dist save writes from threads of the training process, but megatron-core hands their
    results back through a multiprocessing Manager queue, started with 'spawn' at the first save: a new
    interpreter that imports the training script again (about 10 s on a 2-core CPU, several on a GPU node).
    A queue.Queue carries them within the process. Installed only without --async-save, whose writer process
    does need the Manager's queue."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def write_checkpoint_tracker_atomically() -> None:
    """save_checkpoint writes latest_checkpointed_iteration.txt in place (open 'w', write): a kill between the
    two leaves it empty, and the relaunch stops with "Invalid metadata file" and exit status 0."""
    import megatron.training.checkpointing as checkpointing

    if not isinstance(checkpointing.maybe_msc, _AtomicTrackerStorage):
        checkpointing.maybe_msc = _AtomicTrackerStorage(checkpointing.maybe_msc)


NAN_CAUSES = ("Likely causes: a learning rate too high for this model and batch (lower LR, or more warm-up "
              "iterations); with PR=fp16, the loss scale overflowing (use PR=bf16, or a lower "
              "--initial-loss-scale); or bad data in this iteration's samples (empty or garbled documents, token "
              "ids outside the vocabulary)")


def name_likely_causes_of_nan() -> None:
    """megatron-core's NaN/Inf checks (loss, gradient buckets) report only where the value was found. Add the
    usual causes to the message of every check that rejects NaN or Inf (the message also keys the rerun state
    machine's bookkeeping; the same text is added every time, so reruns still match)."""
    from megatron.core.rerun_state_machine import RerunStateMachine

    original = RerunStateMachine.validate_result
    if getattr(original, "names_nan_causes", False):
        return

    def validate_result(self, result, rejection_func, message, *args, **kwargs):
        if rejection_func in (torch.isnan, torch.isinf) and NAN_CAUSES not in message:
            message = f"{message}. {NAN_CAUSES}"
        return original(self, result, rejection_func, message, *args, **kwargs)

    validate_result.names_nan_causes = True
    RerunStateMachine.validate_result = validate_result
