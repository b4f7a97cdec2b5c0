"""Our adapters in PEFT's terms: HF module names, PEFT's tensor names, split fused adapters.

The weight mapping table (megatron_patch.convert.mapping) says how a fused Megatron weight's rows split into HF
weights; an adapter's B (and DoRA's magnitude) has the same rows, so the same mapping splits it. A shared A is
the A of each HF module of the group.
"""

from __future__ import annotations

import torch

from megatron_patch.convert.mapping import Mapping, qwen2_5_mappings
from megatron_patch.model_sizes import Qwen25Size

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> Qwen2ForCausalLM


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
