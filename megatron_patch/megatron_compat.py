"""Adjustments to the megatron-core 0.19.2 wheel that every run needs, GPU or CPU."""

from __future__ import annotations


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
        return original(*args, **kwargs)

    training.training_log = training_log


def apply() -> None:
    skip_dataset_helper_compilation()
    reset_loss_average_on_log_boundaries()
