"""A LoRA run's checkpoint in Hugging Face terms: a PEFT adapter folder, or the adapters merged into HF weights.

The weight mapping table (megatron_patch.convert.mapping) says how a fused Megatron weight's rows split into HF
weights; an adapter's B (and DoRA's magnitude) has the same rows, so the same mapping splits it. A shared A is
the A of each HF module of the group. The convertor (MG2HF) calls this for checkpoints whose saved args hold
LoRA settings; merged weights are the base checkpoint's (the one the run recorded) with W + s B A in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_patch.checkpoint_state import iteration_folder_name
from megatron_patch.convert.mapping import Mapping, qwen2_5_mappings, stacked_key
from megatron_patch.errors import UserError
from megatron_patch.lora.targets import HF_BASE, PARENTS, LoraSettings
from megatron_patch.model_sizes import Qwen25Size

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> Qwen2ForCausalLM
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names


def weight_mapping(layer_name: str, size: Qwen25Size) -> Mapping:
    """The table's entry for a Megatron layer's weight ('decoder.layers.3.self_attention.linear_qkv')."""
    for mapping in qwen2_5_mappings(size):
        if mapping.mcore == f"{layer_name}.weight":
            return mapping
    raise KeyError(f"no weight mapping for {layer_name}")


def hf_modules(layer_name: str, size: Qwen25Size) -> list[str]:
    """The HF modules a Megatron layer holds ('model.layers.3.self_attn.q_proj', ...)."""
    return [name.removesuffix(".weight") for name in weight_mapping(layer_name, size).hf]


def peft_tensors(layer_name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor | None,
                 size: Qwen25Size) -> dict[str, torch.Tensor]:
    """One adapter (whole, unsplit tensors) as PEFT's adapter_model.safetensors entries."""
    mapping = weight_mapping(layer_name, size)
    modules = [name.removesuffix(".weight") for name in mapping.hf]
    tensors = {}
    for module, rows in zip(modules, mapping.to_hf(lora_B, size)):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_A.clone()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = rows.contiguous()
    if magnitude is not None:
        for module, rows in zip(modules, mapping.to_hf(magnitude, size)):
            tensors[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = rows.contiguous()
    return tensors


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor | None,
                  scaling: float) -> torch.Tensor:
    """A Megatron weight with its adapter merged in, in fp32: W + s B A, and for DoRA each row rescaled to its
    magnitude, m / ||W + s B A|| (W + s B A) (PEFT's merge)."""
    merged = weight.float() + scaling * (lora_B.float() @ lora_A.float())
    if magnitude is None:
        return merged
    return merged * (magnitude.float() / merged.norm(dim=1)).unsqueeze(1)


def adapter_config(settings: LoraSettings, base_model: Path) -> dict:
    """adapter_config.json: what peft.PeftModel.from_pretrained needs to rebuild the adapters over `base_model`."""
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
            "r": settings.rank, "lora_alpha": alpha, "lora_dropout": settings.dropout,
            "target_modules": settings.hf_targets, "use_dora": settings.dora, "use_rslora": False, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


@dataclass(frozen=True)
class LoraCheckpoint:
    """A LoRA run's torch_dist checkpoint folder (adapters only), its settings, and the base checkpoint's
    iteration folder (or the Hugging Face folder) the adapters were trained over (from the args the run saved)."""

    folder: Path
    settings: LoraSettings
    base: Path

    def adapter_names(self, layer: int) -> list[str]:
        return [f"decoder.layers.{layer}.{PARENTS[t]}.{t}" for t in self.settings.targets]

    def adapters(self, layer: int, meta: dict) -> dict[str, dict[str, torch.Tensor | None]]:
        """{Megatron layer name: {lora_A, lora_B, magnitude}} of one decoder layer, whole (unsplit) tensors."""
        from megatron_patch.convert.torch_dist_io import read_mcore_tensors

        parts = ("lora_A", "lora_B", "magnitude") if self.settings.dora else ("lora_A", "lora_B")
        keys = [f"{name}.adapter.{part}" for name in self.adapter_names(layer) for part in parts]
        missing = [key for key in keys if stacked_key(key)[0] not in meta]
        if missing:
            raise UserError(f"error: the LoRA checkpoint {self.folder} lacks {', '.join(missing[:4])}: it is not "
                            f"the run its saved settings ({self.settings.method}, targets "
                            f"{','.join(self.settings.targets)}) describe. Convert another iteration.")
        tensors = read_mcore_tensors(self.folder, keys, meta)
        return {name: {part: tensors.get(f"{name}.adapter.{part}") for part in ("lora_A", "lora_B", "magnitude")}
                for name in self.adapter_names(layer)}


def lora_checkpoint(folder: Path, args) -> LoraCheckpoint | None:
    """The LoRA run a torch_dist folder was saved by, from the args it saved; None for a full checkpoint."""
    settings = LoraSettings.from_args(args) if args is not None else None
    if settings is None:
        return None
    iteration, base = args.lora_base_iteration, Path(args.lora_base_checkpoint)
    if iteration != HF_BASE:  # else the base is a Hugging Face folder itself
        base = base / iteration_folder_name(iteration)
    return LoraCheckpoint(folder, settings, base)


def merge_adapters(tensors: dict[str, torch.Tensor], lora: LoraCheckpoint, meta: dict) -> None:
    """Merge the adapters into the weights of one decoder layer read from the base (`tensors`, by Megatron name)."""
    layers = {stacked_key(name)[1] for name in tensors} - {None}
    for layer in layers:
        for name, parts in lora.adapters(layer, meta).items():
            key = f"{name}.weight"
            tensors[key] = merged_weight(tensors[key], parts["lora_A"], parts["lora_B"], parts["magnitude"],
                                         lora.settings.scaling)


def write_adapter(lora: LoraCheckpoint, size: Qwen25Size, out: Path, base_model: Path, dtype: torch.dtype) -> int:
    """PEFT's adapter folder (adapter_config.json, adapter_model.safetensors with HF module names); returns the
    number of tensors written."""
    from safetensors.torch import save_file

    from megatron_patch.convert.torch_dist_io import mcore_tensor_metadata

    meta = mcore_tensor_metadata(lora.folder)
    tensors = {}
    for layer in range(size.num_layers):
        for name, parts in lora.adapters(layer, meta).items():
            tensors |= peft_tensors(name, parts["lora_A"], parts["lora_B"], parts["magnitude"], size)
    save_file({key: value.to(dtype).contiguous() for key, value in tensors.items()}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora.settings, base_model), indent=2) + "\n")
    return len(tensors)
