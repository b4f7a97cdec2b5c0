"""LoRA on a whole Qwen2.5 GPTModel (one pipeline stage or virtual chunk of it): which layers get adapters, their
seeded initial values, the frozen base (read from its own checkpoint, never saved), adapters-only checkpoints.

A LoRA run's checkpoint (torch_dist) holds the adapters, their optimizer state and Megatron's usual common state,
whose args record the base checkpoint (lora_base_checkpoint) and the LoRA settings; the base's weights are loaded
by the model provider from the base checkpoint on every start, fresh or resumed, before Megatron's own load.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import torch

from megatron_patch.errors import UserError
from megatron_patch.lora.adapters import Adapter, adapt
from megatron_patch.lora.targets import ALL_TARGETS, FLAG_NAMES, HF_BASE, PARENTS, LoraSettings, \
    adapter_parameter_count, settings_problems, trainable_parameters_line

ADAPTER_KEY = ".adapter."  # in every adapter tensor's name, and in no base weight's


def adapted_layers(model, targets: tuple[str, ...]):
    """(canonical name, module, fused halves, global layer number) of every target in this model chunk; the name
    uses the global layer index ('decoder.layers.5.mlp.linear_fc1'), as checkpoints and the convertor do."""
    for layer in model.decoder.layers:
        for target in targets:
            module = getattr(getattr(layer, PARENTS[target]), target)
            halves = 2 if target == "linear_fc1" and layer.config.gated_linear_unit else 1
            yield f"decoder.layers.{layer.layer_number - 1}.{PARENTS[target]}.{target}", module, halves, \
                layer.layer_number


def adapter_seed(seed: int, layer_number: int, target: str) -> int:
    """Each adapter's own seed: its initial values depend on the run's seed, its layer and its target only, never
    on the TP/PP layout or the order layers are built in."""
    return zlib.crc32(f"{seed}/{layer_number}/{ALL_TARGETS.index(target)}".encode())


def add_adapters(model, settings: LoraSettings, seed: int) -> dict[str, Adapter]:
    """Freeze every weight of `model` and give each target layer an adapter with PEFT's initial values (B = 0: the
    model's output is unchanged). Returns {canonical layer name: adapter}."""
    model.requires_grad_(False)
    adapters = {}
    for name, module, halves, layer_number in adapted_layers(model, settings.targets):
        adapter = adapt(module, settings, halves)
        adapter.initialize(torch.Generator().manual_seed(adapter_seed(seed, layer_number, name.rsplit(".", 1)[1])),
                           module.weight)
        adapters[name] = adapter
    return adapters


def adapters_only_in_checkpoints(model) -> None:
    """From now on the model's torch_dist state (what Megatron saves and resumes) is its adapters alone, and a load
    of that state does not count the base weights as missing (the provider loaded them from the base)."""
    full_state = model.sharded_state_dict

    def sharded_state_dict(prefix="", sharded_offsets=(), metadata=None):
        return {k: v for k, v in full_state(prefix, sharded_offsets, metadata).items() if ADAPTER_KEY in k}

    def base_weights_are_not_missing(module, incompatible_keys):
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if ADAPTER_KEY in k]

    model.sharded_state_dict = sharded_state_dict
    model.register_load_state_dict_post_hook(base_weights_are_not_missing)


def load_base_weights(model, base_dir: str, iteration: str) -> None:
    """The base checkpoint's weights (its iteration `iteration`, or 'release') into `model` (no adapters yet)
    through megatron.training's load_checkpoint, as a fine-tuning start: any TP/PP, no optimizer state, RNG,
    iteration or schedule."""
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint

    args = get_args()
    overrides = dict(load=str(base_dir), pretrained_checkpoint=None, finetune=True, no_load_optim=True,
                     no_load_rng=True, ckpt_step=None if iteration == "release" else int(iteration))
    saved = {key: getattr(args, key) for key in overrides}
    vars(args).update(overrides)
    try:
        load_checkpoint([model], None, None)
    finally:
        vars(args).update(saved)


def attach_for_training(model, args, vp_stage: int | None) -> None:
    """The model provider's LoRA step: base weights from args.lora_base_checkpoint, adapters, adapters-only
    checkpoints; rank 0 prints PEFT's trainable-parameter line once."""
    from megatron.training import print_rank_0

    settings = LoraSettings.from_args(args)
    start = time.monotonic()
    if args.lora_base_iteration == HF_BASE:
        from megatron.core import parallel_state

        from megatron_patch.convert.hf_direct import load_hf_weights

        load_hf_weights(model, args.lora_base_checkpoint, parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_world_size())
    else:
        load_base_weights(model, args.lora_base_checkpoint, args.lora_base_iteration)
    add_adapters(model, settings, args.seed)
    adapters_only_in_checkpoints(model)
    if not vp_stage:
        print_rank_0(f"LoRA ({settings.method}, rank {settings.rank}, alpha {settings.alpha:g}, targets "
                     f"{','.join(settings.targets)}): {trainable_parameters_report(args, settings)}; base weights "
                     f"read in {time.monotonic() - start:.1f} s")


def trainable_parameters_report(args, settings: LoraSettings) -> str:
    """PEFT's line for the whole model (every stage and TP rank), from its shape: the same in every layout."""
    from megatron_patch.model_sizes import Qwen25Size

    heads, groups = args.num_attention_heads, args.num_query_groups or args.num_attention_heads
    base = Qwen25Size(args.num_layers, args.hidden_size, heads, groups, args.ffn_hidden_size, args.padded_vocab_size,
                      not args.untie_embeddings_and_output_weights, args.layernorm_epsilon,
                      args.max_position_embeddings).parameter_count
    trainable = adapter_parameter_count(settings, args.num_layers, args.hidden_size, heads, groups,
                                        args.ffn_hidden_size)
    return trainable_parameters_line(trainable, base)


def settle_args(args) -> None:
    """The entrypoint's LoRA step before Megatron starts: refuse what cannot run (the launcher refuses the same
    before torchrun, by its knobs' names) and move the base from --pretrained-checkpoint (which Megatron would load
    into the adapted model) or --pretrained-hf (which the model provider would load only on a fresh start) to
    args.lora_base_checkpoint, which the model provider loads on every start and every checkpoint's args record.
    Says so on rank 0."""
    if args.lora_rank < 0:
        raise UserError(f"error: --lora-rank must be at least 1 for LoRA (0: full fine-tuning), got {args.lora_rank}.")
    settings = LoraSettings.from_args(args)
    if settings is None:
        return
    errors = settings_problems(settings, "--fp8-format" if args.fp8 else None, FLAG_NAMES)
    base = args.pretrained_checkpoint or args.pretrained_hf
    if base is None:
        errors.append("--lora-rank needs the base model: --pretrained-hf (a Hugging Face folder) or "
                      "--pretrained-checkpoint (a converted checkpoint); LoRA trains adapters over given weights, "
                      "never from random ones.")
    if args.ckpt_format != "torch_dist":
        errors.append(f"--lora-rank saves adapters-only torch_dist checkpoints; --ckpt-format {args.ckpt_format} is "
                      "not supported. Pass --ckpt-format torch_dist.")
    tracker = Path(args.pretrained_checkpoint or "") / "latest_checkpointed_iteration.txt"
    if args.pretrained_checkpoint is not None and not tracker.is_file():
        errors.append(f"the LoRA base checkpoint {args.pretrained_checkpoint} holds no Megatron checkpoint (no "
                      f"{tracker.name}). Pass a checkpoint converted by toolkits/distributed_checkpoints_convertor "
                      "(or a training run's folder), or a Hugging Face folder as --pretrained-hf.")
    if errors:
        raise UserError("\n".join(f"error: {e}" for e in errors))
    # The record every checkpoint's args keep: which base, and which of its iterations (HF_BASE: a Hugging Face
    # folder), the adapters belong to.
    args.lora_base_checkpoint = str(Path(base).absolute())
    args.lora_base_iteration = HF_BASE if args.pretrained_hf else tracker.read_text().strip()
    args.pretrained_checkpoint = args.pretrained_hf = None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"megatron_patch: LoRA: the base weights come from {args.lora_base_checkpoint}, loaded by the model "
              "provider on every start (fresh or resumed), frozen and never saved; Megatron's own load reads the "
              "adapters only (from --load).", flush=True)
