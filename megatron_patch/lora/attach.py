"""LoRA on a whole Qwen2.5 GPTModel (one pipeline stage or virtual chunk of it): which layers get adapters, their
seeded initial values, the frozen base (read from its own checkpoint, never saved), adapters-only checkpoints.

A LoRA run's checkpoint (torch_dist) holds the adapters, their optimizer state and Megatron's usual common state,
whose args record the base checkpoint (lora_base_checkpoint) and the LoRA settings; the base's weights are loaded
by the model provider from the base checkpoint on every start, fresh or resumed, before Megatron's own load.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from megatron_patch.errors import UserError
from megatron_patch.lora.adapters import Adapter, adapt
from megatron_patch.lora.targets import ALL_TARGETS, PARENTS, LoraSettings, adapter_parameter_count, \
    trainable_parameters_line

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


def load_base_weights(model, base_dir: str) -> None:
    """The base checkpoint's weights into `model` (no adapters yet) through megatron.training's load_checkpoint, as
    a fine-tuning start: any TP/PP, no optimizer state, RNG, iteration or schedule."""
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint

    if not (Path(base_dir) / "latest_checkpointed_iteration.txt").is_file():
        raise UserError(f"error: the LoRA base checkpoint {base_dir} holds no Megatron checkpoint (no "
                        "latest_checkpointed_iteration.txt). Pass a checkpoint converted by "
                        "toolkits/distributed_checkpoints_convertor (or a training run's folder).")
    args = get_args()
    overrides = dict(load=str(base_dir), pretrained_checkpoint=None, finetune=True, no_load_optim=True,
                     no_load_rng=True, ckpt_step=None)
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
    load_base_weights(model, args.lora_base_checkpoint)
    add_adapters(model, settings, args.seed)
    adapters_only_in_checkpoints(model)
    if not vp_stage:
        print_rank_0(f"LoRA ({settings.method}, rank {settings.rank}, alpha {settings.alpha:g}, targets "
                     f"{','.join(settings.targets)}): {trainable_parameters_report(args, settings)}")


def trainable_parameters_report(args, settings: LoraSettings) -> str:
    """PEFT's line for the whole model (every stage and TP rank), from its shape: the same in every layout."""
    from megatron_patch.model_sizes import Qwen25Size

    heads, groups = args.num_attention_heads, args.num_query_groups or args.num_attention_heads
    base = Qwen25Size(args.num_layers, args.hidden_size, heads, groups, args.ffn_hidden_size, args.padded_vocab_size,
                      not args.untie_embeddings_and_output_weights, args.norm_epsilon,
                      args.max_position_embeddings).parameter_count
    trainable = adapter_parameter_count(settings, args.num_layers, args.hidden_size, heads, groups,
                                        args.ffn_hidden_size)
    return trainable_parameters_line(trainable, base)
