"""Adjustments to the megatron-core 0.19.2 wheel that every run needs, GPU or CPU."""

from __future__ import annotations

import torch


def skip_dataset_helper_compilation() -> None:
    """The wheel ships the compiled dataset helpers (helpers_cpp) but no Makefile, so Megatron's
    start-up `make` would fail: use the shipped extension instead."""
    import megatron.core.datasets.utils as dataset_utils

    def use_shipped_helpers() -> None:
        from megatron.core.datasets import helpers_cpp  # noqa: F401  (fails loudly if it is missing)

    dataset_utils.compile_helpers = use_shipped_helpers


def reset_loss_average_on_log_boundaries() -> None:
    """0.19.2 logs a run's first iteration without resetting the loss accumulators, so when that iteration
    is itself a log-interval boundary (always with --log-interval 1) the next logged loss is the average of
    two iterations. Reset whenever the iteration is on a boundary, so every logged loss is its interval's."""
    import megatron.training.training as training

    original = training.training_log

    def training_log(*args, **kwargs):
        iteration = kwargs.get("iteration", args[3] if len(args) > 3 else None)
        if kwargs.get("is_first_iteration") and iteration is not None:
            if iteration % training.get_args().log_interval == 0:
                kwargs["is_first_iteration"] = False
        result = original(*args, **kwargs)
        if iteration is not None and iteration % training.get_args().log_interval == 0:
            _log_tokens_and_memory(training, iteration)
        return result

    training.training_log = training_log


_last_log = {"time": None, "iteration": None}


def _log_tokens_and_memory(training, iteration: int) -> None:
    """One line per log interval with what 0.19.2's own line lacks: tokens/s/GPU and memory."""
    import time

    import torch

    args = training.get_args()
    now = time.time()
    last_time, last_iteration = _last_log["time"], _last_log["iteration"]
    _last_log.update(time=now, iteration=iteration)
    if last_time is None or iteration <= last_iteration:
        return
    tokens = (iteration - last_iteration) * args.global_batch_size * args.seq_length
    tokens_per_gpu = tokens / (now - last_time) / args.world_size
    line = f" [qwen] iteration {iteration:8d} | tokens/s/GPU: {tokens_per_gpu:,.0f}"
    if torch.cuda.is_available():
        gib = 1024 ** 3
        line += (f" | memory allocated/peak/reserved (GiB): {torch.cuda.memory_allocated() / gib:.2f}/"
                 f"{torch.cuda.max_memory_allocated() / gib:.2f}/{torch.cuda.memory_reserved() / gib:.2f}")
    else:
        import resource

        line += f" | host peak RSS (GiB): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f}"
    writer = training.get_tensorboard_writer()
    if writer:
        writer.add_scalar("tokens-per-second-per-gpu", tokens_per_gpu, iteration)
    training.print_rank_last(line)


def let_distributed_optimizer_resume() -> None:
    """Two megatron-core 0.19.2 DistributedOptimizer bugs that stop a DO=true run from resuming its checkpoint.

    * fp32 (no fp16/bf16): the main params are views of the model params, and the dp_reshardable loader copies
      into them with autograd on ("a view of a leaf Variable that requires grad is being used in an in-place
      operation"). Loading is a no_grad affair.
    * Without Apex/TE (torch Adam: CPU runs, GPUs without TE) the state dict a checkpoint is loaded into reads
      Adam's 'step' from the optimizer state, which is empty before the first step: `assert len(steps) == 1`
      fails. The step is only a placeholder there (load_state_dict sets the checkpoint's), so report 0.
      load_state_dict then gives every parameter one shared 'step' tensor (torch Adam increments it in place once
      per parameter), and its parameter-state loader copies the placeholder over it. Adam's bias correction
      would be wrong after every resume: each parameter gets its own tensor holding the checkpoint's step.
    """
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    optimizer_class._set_main_param_and_optimizer_states = torch.no_grad()(
        optimizer_class._set_main_param_and_optimizer_states)
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
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


def apply() -> None:
    skip_dataset_helper_compilation()
    reset_loss_average_on_log_boundaries()
    let_distributed_optimizer_resume()
