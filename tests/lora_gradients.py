"""Our LoRA/DoRA adapters on the model training builds against HF transformers + peft holding the same base weights
and the same adapter values, in fp32: the loss and every adapter gradient.

Megatron fuses q/k/v (and gate/up) into one layer with one adapter, whose A is shared: it is loaded into peft as
identical q/k/v A's, and its gradient is the sum of theirs. B is random (at PEFT's B = 0 no gradient reaches A).
Runs in its own process (Megatron keeps its state in globals) and prints one JSON line:

    python tests/lora_gradients.py [--methods lora,dora] [--rank 8] [--alpha 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import torch

from hf_gradients import hf_loss, mcore_loss, models_with_the_same_weights, random_batch, relative_differences
from megatron_patch.lora.attach import add_adapters
from megatron_patch.lora.peft_export import hf_modules, peft_tensors
from megatron_patch.lora.targets import LoraSettings, adapter_parameter_count, trainable_parameters_line
from megatron_patch.model_sizes import get_size


def our_tensors(adapters, size, of_grad: bool = False) -> dict[str, torch.Tensor]:
    """Every adapter's values (or gradients) under PEFT's names."""
    def pick(param):
        return None if param is None else (param.grad if of_grad else param.detach())

    return {key: value for name, a in adapters.items()
            for key, value in peft_tensors(name, pick(a.lora_A), pick(a.lora_B), pick(a.magnitude), size).items()}


def peft_with_our_adapters(hf, adapters, settings: LoraSettings, size):
    """peft's model over `hf`, holding our adapters' values; also the largest relative difference between its
    initial DoRA magnitudes (row norms of its own W) and ours (None for LoRA)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=settings.hf_targets,
                        lora_dropout=0.0, use_dora=settings.dora)
    model = get_peft_model(hf, config)
    ours = our_tensors(adapters, size)
    initial = get_peft_model_state_dict(model)
    magnitude_difference = max(((ours[k] - v).norm() / v.norm()).item() for k, v in initial.items()
                               if k.endswith("lora_magnitude_vector")) if settings.dora else None
    assert set(initial) == set(ours), sorted(set(initial) ^ set(ours))
    loaded = set_peft_model_state_dict(model, ours)
    assert not loaded.unexpected_keys, loaded.unexpected_keys
    return model, magnitude_difference


def peft_reference_gradients(model, adapters, size) -> dict[str, torch.Tensor]:
    """peft's gradients under its tensor names; each A's is the sum over its fused group (what our shared A's
    gradient must be)."""
    from peft import get_peft_model_state_dict

    grads = get_peft_model_state_dict(model, state_dict={n: p.grad for n, p in model.named_parameters()
                                                         if p.requires_grad})
    for name in adapters:
        keys = [f"base_model.model.{module}.lora_A.weight" for module in hf_modules(name, size)]
        total = sum(grads[k] for k in keys)
        grads.update({k: total for k in keys})
    return grads


def compare(method: str, rank: int, alpha: float) -> dict:
    size = get_size("tiny")
    settings = LoraSettings(rank, alpha, method=method)
    hf, model, _ = models_with_the_same_weights(size, bf16=False, plain_kernels=False, seq_len=48)
    adapters = add_adapters(model, settings, seed=1234)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) / rank)
    peft_model, magnitude_difference = peft_with_our_adapters(hf, adapters, settings, size)

    batch = random_batch(size, 2, 48, next(model.parameters()).device)
    loss = mcore_loss(model, batch)
    loss.backward()
    reference_loss = hf_loss(peft_model, batch)
    reference_loss.backward()
    differences = relative_differences(our_tensors(adapters, size, of_grad=True),
                                       peft_reference_gradients(peft_model, adapters, size))
    peft_trainable, peft_all = peft_model.get_nb_trainable_parameters()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        peft_model.print_trainable_parameters()
    return {
        "loss": loss.item(), "peft_loss": reference_loss.item(), "relative_grad_difference": differences,
        "initial_magnitude_difference": magnitude_difference,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "expected_trainable": adapter_parameter_count(settings, size.num_layers, size.hidden_size,
                                                      size.num_attention_heads, size.num_query_groups,
                                                      size.ffn_hidden_size),
        "parameter_count": size.parameter_count, "peft_frozen": peft_all - peft_trainable,
        "peft_line": printed.getvalue().strip(),
        "our_line_for_peft_counts": trainable_parameters_line(peft_trainable, peft_all - peft_trainable),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,dora", help="comma-separated: lora, dora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    args = parser.parse_args()
    # One Megatron set-up, a fresh model (and HF model) per method.
    print(json.dumps({method: compare(method, args.rank, args.alpha) for method in args.methods.split(",")}),
          flush=True)


if __name__ == "__main__":
    main()
