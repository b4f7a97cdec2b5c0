"""Qwen2.5 pre-training and fine-tuning entrypoint: model provider, forward step with its loss, datasets.

Launch it with torchrun (examples/qwen2_5/run_mcore_qwen.sh builds the command, with the model's own flags from its
checkpoint's config.json); by hand, `--model-size NAME` stands for a size-table entry's flags:
    torchrun --nproc-per-node N -m megatron_patch.pretrain_qwen --model-size 0.5B [Megatron flags]
Without a GPU the same command trains on the CPU (see megatron_patch/patches/cpu_backend.py). Megatron comes up as
in every process of ours (megatron_patch.megatron_startup); every change to torch's and megatron-core's behaviour is
listed in megatron_patch/patches.
"""

from __future__ import annotations

import os
import sys
import traceback
from functools import partial

# Megatron orders tensor-parallel communication behind compute on one CUDA queue; it must be set before the
# CUDA context exists (as Pai-Megatron-Patch's launcher does).
ENVIRONMENT_DEFAULTS = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
for _name, _value in ENVIRONMENT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

from megatron_patch.megatron_startup import importing_megatron, start_megatron  # noqa: E402

with importing_megatron():
    from megatron.core.enums import ModelType  # noqa: E402
    from megatron.core.rerun_state_machine import get_rerun_state_machine  # noqa: E402
    from megatron.training import get_args, get_timers, pretrain  # noqa: E402
    from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402

    from megatron_patch import checkpoint_state, process_lifetime  # noqa: E402
    from megatron_patch.data.providers import get_batch, train_valid_test_datasets_provider  # noqa: E402
    from megatron_patch.errors import UserError  # noqa: E402
    from megatron_patch.convert import hf_direct  # noqa: E402
    from megatron_patch.fused import linear_cross_entropy  # noqa: E402
    from megatron_patch.lora import attach as lora  # noqa: E402
    from megatron_patch.model import model_provider  # noqa: E402

# megatron's pretrain_gpt: a loss this many times the running average is reported as spiky (not fatal).
SPIKY_LOSS_FACTOR = 10


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses (the plain path's output) masked and summed, then as summed_loss_func."""
    loss_mask = loss_mask.view(-1).float()
    return summed_loss_func(loss_mask, torch.sum(output_tensor.view(-1).float() * loss_mask))


def summed_loss_func(loss_mask: torch.Tensor, loss_sum: torch.Tensor):
    """Sum of token losses and the token count: Megatron divides by the global batch's token count
    (--calculate-per-token-loss), so SFT loss is the mean over all answer tokens, not over samples.
    The fused linear + cross-entropy returns this masked sum itself."""
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    check_loss(loss_sum)
    report = torch.cat([loss_sum.clone().detach().view(1).float(), num_tokens.view(1).float()])
    return loss_sum, num_tokens, {"lm loss": report}


def check_loss(loss: torch.Tensor) -> None:
    """megatron's pretrain_gpt checks: this rank's loss is neither NaN nor Inf before the data-parallel
    all-reduce (the manifest's nan-message-names-likely-causes adds the usual causes), and is not spiky."""
    args = get_args()
    rerun_state_machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for rejection, found in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            # tolerance 0: the forward pass is deterministic
            rerun_state_machine.validate_result(result=loss, rejection_func=rejection, tolerance=0.0, fatal=True,
                                                message=f"found {found} in local forward loss calculation")
    if getattr(args, "check_for_spiky_loss", False):
        rerun_state_machine.validate_result(
            result=loss, rejection_func=partial(rerun_state_machine.is_unexpectedly_large,
                                                threshold=SPIKY_LOSS_FACTOR, context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False)


def forward_step(data_iterator, model):
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator)
    timers("batch-generator").stop()
    fused_loss = not get_args().plain_kernels
    extra = {"output_processor": linear_cross_entropy.output_processor, "loss_mask": batch["loss_mask"]} \
        if fused_loss else {}
    output_tensor = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        packed_seq_params=batch.get("packed_seq_params"),
        **extra,
    )
    return output_tensor, partial(summed_loss_func if fused_loss else loss_func, batch["loss_mask"])


def main(argv: list[str]) -> None:
    # A rank whose torchrun was killed (kill -9, the OOM killer) would live on, blocked in a collective and
    # holding its GPU; so would the helper processes it starts.
    # (Their helper processes die with them: the manifest's children-die-with-parent.)
    process_lifetime.die_with_parent()
    args = start_megatron(argv)
    hf_direct.settle_args(args)
    lora.settle_args(args)
    # The launcher settles a damaged or untracked checkpoint folder before torchrun; a direct torchrun is refused.
    checkpoint_state.refuse_unresolved(args.load)
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )


def run_exiting_on_error(entry, *args) -> None:
    """Run the entrypoint; if it raises, print the error and end the process at once. After a failed step the
    interpreter's normal shutdown can wait forever (seen on a GPU: a TE attention error left the rank alive,
    holding its GPU, until the job's time limit), and torchrun only reports a failure once the rank is gone.
    Megatron's own exits (SystemExit, e.g. after SIGTERM's checkpoint) keep their normal shutdown. A UserError is
    its message alone, exit status 2. A normal return ends without the interpreter's teardown (Megatron has
    flushed TensorBoard and completed its checkpoints by then)."""
    try:
        entry(*args)
    except UserError as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(err, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    process_lifetime.exit_without_teardown(0)


if __name__ == "__main__":
    run_exiting_on_error(main, sys.argv[1:])
