"""Megatron in this process, set up the way the training entrypoint sets it up (one rank, TP=1, PP=1).

The model comes from the entrypoint's own `megatron_patch.model.model_provider` with args parsed by megatron's
`parse_and_validate_args` from the size table's flags (plus the CPU backend's flags when there is no GPU), so
what is saved here is exactly what `pretrain_qwen` builds and loads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from megatron_patch.convert.mapping import canonical_mcore_name
from megatron_patch.errors import UserError
from megatron_patch.hardware import free_port
from megatron_patch.model_sizes import Qwen25Size

DTYPE_FLAGS = {torch.float32: [], torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"]}


def _single_process_env() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise UserError("error: the convertor runs as a single process; start it with python (or the toolkit "
                        "scripts), not torchrun.")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    # A private one-process group: never reuse a MASTER_PORT inherited from some other job's environment.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def init_process_group() -> None:
    """A one-process group: enough for dist_checkpointing's reads, without initialising Megatron."""
    _single_process_env()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1)


_ARGS = None


def init_megatron(size: Qwen25Size, dtype: torch.dtype, seq_length: int = 128, extra_argv: tuple[str, ...] = ()):
    """Megatron's global args, process groups and seeds for a one-process TP=1/PP=1 run; returns args.
    `extra_argv`: more Megatron flags (e.g. --plain-kernels).

    Megatron keeps this state in globals, so a process initialises it once.
    """
    global _ARGS
    if _ARGS is not None:
        return _ARGS
    _single_process_env()
    from megatron_patch import cpu_backend

    with cpu_backend.eager_fusers_while_importing_megatron():
        from megatron.training.arguments import parse_and_validate_args
        from megatron.training.initialize import initialize_megatron

        from megatron_patch import patches
        from megatron_patch.arguments import NO_TE_GPU_FLAGS, add_extra_args, qwen2_5_model_flags

    # The training entrypoint's two calls (patches.prepare before parsing, patches.apply after), so the model and
    # its kernels are exactly those training builds.
    device = patches.device_here()
    on_cpu = device == "cpu"
    patches.prepare(device)

    argv = qwen2_5_model_flags(size) + [
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--micro-batch-size", "1", "--global-batch-size", "1",
        "--seq-length", str(seq_length), "--max-position-embeddings", str(max(seq_length, size.positions)),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(size.vocab_size - 1),
        "--ckpt-format", "torch_dist", "--no-save-optim", "--no-save-rng",
        "--train-iters", "1", "--lr", "0.0", "--seed", "1234",
        *DTYPE_FLAGS[dtype], *extra_argv,
    ]
    if on_cpu:
        argv = cpu_backend.cpu_argv(argv)
    else:
        from megatron_patch.model import transformer_engine_available

        if not transformer_engine_available():
            argv += NO_TE_GPU_FLAGS  # the launcher's flags for this case (patches.apply supplies the GEMM)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *argv]
    try:
        args = parse_and_validate_args(extra_args_provider=add_extra_args)
    finally:
        sys.argv = saved_argv
    patches.apply(args, device)
    initialize_megatron(allow_no_cuda=on_cpu)
    # Every weight is overwritten from the checkpoint: skip the random init (minutes on a CPU for large sizes).
    args.perform_initialization = False
    _ARGS = args
    return args


def build_model():
    """The Qwen2.5 GPTModel exactly as the training entrypoint's model provider builds it (one stage)."""
    from megatron.training import get_args

    from megatron_patch.model import model_provider

    args = get_args()
    model = model_provider(pre_process=True, post_process=True)
    model.to(dtype=args.params_dtype)
    if torch.cuda.is_available():
        model.cuda()
    model.eval()
    return model


def named_weights(model) -> dict[str, torch.nn.Parameter]:
    """The model's parameters by canonical (TE) Megatron name, whichever spec built it."""
    return {canonical_mcore_name(name): p for name, p in model.named_parameters()}


def save_release_checkpoint(model, save_dir: Path) -> None:
    """Megatron's own save_checkpoint as a release checkpoint: `latest_checkpointed_iteration.txt` says
    'release', the torch_dist folder `release/` holds the model (common state: args, checkpoint_version 3.0,
    iteration, content metadata). Training loads it as weights only (--pretrained-checkpoint, --load --finetune)."""
    from megatron.training import get_args
    from megatron.training.checkpointing import save_checkpoint

    args = get_args()
    args.save = str(save_dir)
    save_checkpoint(0, [model], None, None, 0, release=True)


def load_checkpoint_into(model, load_dir: Path) -> None:
    """Load weights through megatron.training's load_checkpoint, as `--load DIR --finetune` would."""
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint

    args = get_args()
    saved = (args.load, args.finetune, args.no_load_optim, args.no_load_rng)
    args.load, args.finetune, args.no_load_optim, args.no_load_rng = str(load_dir), True, True, True
    try:
        load_checkpoint([model], None, None, load_arg="load")
    finally:
        args.load, args.finetune, args.no_load_optim, args.no_load_rng = saved


@torch.no_grad()
def forward(model, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [b, s, vocab] (or per-token losses [b, s] with labels), causal attention."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None, labels=None if labels is None else labels.to(device))
