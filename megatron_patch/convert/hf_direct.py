"""Training straight from a Hugging Face Qwen2.5 folder: each rank reads its own tensor- and pipeline-parallel
shards from the safetensors files (lazy slices: no whole copy in memory, nothing written) into the model the
provider built, before DDP and the optimizer take its weights. The values are those the convertor's HF -> Megatron
conversion gives (the same mapping table; megatron_patch.convert.mapping says why a TP shard of a fused tensor is
the fusion of its HF tensors' shards), so iteration 1 matches convert-then-train to the bit.

A run that resumes from its own checkpoints (--load holds one) never reads the HF folder: Megatron's load
overwrites every weight, so the read would be wasted minutes at 72B.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_patch.convert.hf_io import HFCheckpointReader
from megatron_patch.convert.mapping import TIED_OUTPUT, TiedLMHead, canonical_mcore_name, qwen2_5_mappings
from megatron_patch.errors import UserError
from megatron_patch.hf_checkpoint import is_hf_checkpoint
from megatron_patch.model_sizes import Qwen25Size, model_from_hf_config, read_checkpoint_json

def hf_model(folder: str | Path) -> Qwen25Size:
    config = Path(folder) / "config.json"
    return model_from_hf_config(read_checkpoint_json(config), config)


def megatron_parameters(model) -> dict[str, torch.nn.Parameter]:
    """This model chunk's parameters by canonical Megatron name with global layer numbers (what the mapping table
    and torch_dist checkpoints call them), whichever spec and pipeline stage built it."""
    local_to_global = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}."
                       for i, layer in enumerate(model.decoder.layers)} if hasattr(model, "decoder") else {}
    named = {}
    for name, param in model.named_parameters():
        if name.startswith("decoder.layers."):
            local = ".".join(name.split(".")[:3]) + "."
            name = local_to_global[local] + name[len(local):]
        named[canonical_mcore_name(name)] = param
    return named


def shard_split(name: str, whole: tuple[int, ...], shard: tuple[int, ...], tp_size: int) -> tuple[int, int]:
    """(dimension, parts) of a rank's shard of a Megatron tensor: the dimension where its shape differs from the
    whole's, split into the TP size's parts; (0, 1) for a replicated tensor."""
    differing = [d for d in range(len(whole)) if whole[d] != shard[d]] if len(whole) == len(shard) else [0, 0]
    if not differing:
        return 0, 1
    if len(differing) > 1 or whole[differing[0]] != tp_size * shard[differing[0]]:
        raise UserError(f"error: {name}: the model being trained has shape {tuple(shard)}, which is no "
                        f"{tp_size}-way tensor-parallel shard of the Hugging Face folder's {tuple(whole)}: the "
                        "folder's config.json describes another model than the training flags.")
    return differing[0], tp_size


def _table(size: Qwen25Size) -> dict:
    table = {m.mcore: m for m in qwen2_5_mappings(size) if not isinstance(m, TiedLMHead)}
    if size.tie_word_embeddings:
        table[TIED_OUTPUT.mcore] = TIED_OUTPUT
    return table


@torch.no_grad()
def load_hf_weights(model, folder: str | Path, tp_rank: int = 0, tp_size: int = 1) -> int:
    """Copy this rank's shards of a HF folder's weights into `model` (one pipeline stage or virtual chunk, as the
    model provider built it); returns the number of tensors loaded."""
    size = hf_model(folder)
    reader = HFCheckpointReader(folder)
    table = _table(size)
    parameters = megatron_parameters(model)
    unknown = sorted(set(parameters) - set(table))
    if unknown:
        raise UserError(f"error: the model has parameters the Qwen2.5 mapping table does not cover: {unknown[:6]}; "
                        f"it cannot start from the Hugging Face folder {folder}.")
    for name, param in parameters.items():
        mapping = table[name]
        dim, parts = shard_split(name, mapping.mcore_shape(size), tuple(param.shape), tp_size)
        part = tp_rank if parts > 1 else 0
        param.copy_(mapping.to_mcore([reader.get_part(hf, dim, part, parts) for hf in mapping.hf], size))
    return len(parameters)


def load_for_training(model, args, vp_stage: int | None) -> None:
    """The model provider's HF step (--pretrained-hf): this rank's shards, unless the run resumes from its own
    checkpoint; says which on rank 0, once per model."""
    from megatron.core import parallel_state
    from megatron.training import print_rank_0
    from megatron.training.checkpointing import checkpoint_exists

    if checkpoint_exists(args.load):
        if not vp_stage:
            print_rank_0(f"megatron_patch: resuming from {args.load}: the Hugging Face folder {args.pretrained_hf} "
                         "is not read")
        return
    start = time.monotonic()
    count = load_hf_weights(model, args.pretrained_hf, parallel_state.get_tensor_model_parallel_rank(),
                            parallel_state.get_tensor_model_parallel_world_size())
    if not vp_stage:
        print_rank_0(f"megatron_patch: {count} tensors of this stage read from the Hugging Face folder "
                     f"{args.pretrained_hf} (each rank its own TP/PP shards) in {time.monotonic() - start:.1f} s")


def read_mcore_tensors_from_hf(reader: HFCheckpointReader, mappings: list, size: Qwen25Size) -> dict:
    """Whole Megatron tensors of `mappings` (a decoder layer's, say) made from a HF folder's tensors, by name."""
    return {m.mcore: m.to_mcore([reader.get(n) for n in m.hf], size) for m in mappings
            if not isinstance(m, TiedLMHead)}


def settle_args(args) -> None:
    """The entrypoint's HF step before Megatron starts: a HF folder given as --pretrained-checkpoint (which
    Megatron would read as a torch_dist checkpoint) is refused with the flag that takes it."""
    for flag, value in (("--pretrained-checkpoint", args.pretrained_checkpoint), ("--load", args.load)):
        if value and is_hf_checkpoint(value):
            raise UserError(f"error: {flag} {value} is a Hugging Face folder; Megatron reads torch_dist checkpoints "
                            "there. Pass it as --pretrained-hf (each rank reads its own shards), or convert it first "
                            "(toolkits/distributed_checkpoints_convertor).")
    if args.pretrained_hf and args.pretrained_checkpoint:
        raise UserError("error: --pretrained-hf and --pretrained-checkpoint both name starting weights; pass one.")
