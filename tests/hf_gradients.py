"""The loss and every weight's gradient of the model training builds (the entrypoint's model provider and
patches, the fused loss its forward_step asks for) against HF transformers' Qwen2ForCausalLM holding the same
weights, in fp32 (or the model in bf16, as training runs it, against HF in fp32). A forward-only check (logits)
cannot see a wrong backward, and at random init the loss barely depends on attention: a gradient that is wrong
there shows only as slower training hundreds of steps later.

Runs in its own process (Megatron keeps its state in globals) and prints one JSON line:

    python tests/hf_gradients.py [--untied] [--bf16] [--plain-kernels] [--size 1.5B --seq-len 2048 --batch 1]

The test suite runs the tiny shape; on a GPU the real shapes measure each stack's bf16 error against fp32 (with
Transformer Engine importable, its layer spec; --plain-kernels: megatron-core's modules without ours), beside
the error HF's own bf16 autocast makes on the same weights and tokens (`hf_autocast_relative_grad_difference`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

# fp32 means fp32 on both sides: Transformer Engine's GEMMs take TF32 for fp32 inputs (cuBLASLt's FAST_TF32
# compute type, 1e-3 relative) unless this override, read when cuBLAS starts, says no.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_patch.convert import mcore_runtime  # noqa: E402
from megatron_patch.convert.mapping import TiedLMHead, qwen2_5_mappings  # noqa: E402
from megatron_patch.fused import linear_cross_entropy  # noqa: E402
from megatron_patch.hf_checkpoint import random_hf_model  # noqa: E402
from megatron_patch.model_sizes import get_size  # noqa: E402


def total_grad(param: torch.Tensor) -> torch.Tensor:
    """A weight's gradient wherever training leaves it: `.grad`, and on a GPU also `main_grad`, which the weight
    GEMMs of --gradient-accumulation-fusion add into."""
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    return grad + param.main_grad if hasattr(param, "main_grad") else grad


def models_with_the_same_weights(size, bf16: bool, plain_kernels: bool, seq_len: int):
    """HF's Qwen2ForCausalLM in fp32 and the model training builds (in bf16 with `bf16`), holding the same weights
    (HF takes them as the Megatron model holds them, rounded to bf16 with `bf16`): (hf, model, mappings)."""
    hf = random_hf_model(size, "float32", seed=0, perturb_biases=True)
    mcore_runtime.init_megatron(size, torch.bfloat16 if bf16 else torch.float32, seq_length=seq_len,
                                extra_argv=("--plain-kernels",) if plain_kernels else ())
    model = mcore_runtime.build_model().train()
    device = next(model.parameters()).device
    hf.to(device)
    weights = mcore_runtime.named_weights(model)
    hf_params = dict(hf.named_parameters())
    table = [m for m in qwen2_5_mappings(size) if not isinstance(m, TiedLMHead)]
    with torch.no_grad():
        for m in table:
            weights[m.mcore].copy_(m.to_mcore([hf_params[name] for name in m.hf], size))
        for m in table:
            for name, value in zip(m.hf, m.to_hf(weights[m.mcore].float(), size)):
                hf_params[name].copy_(value)
    return hf, model, table


def random_batch(size, batch: int, seq: int, device) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return dict(tokens=torch.randint(0, size.vocab_size, (batch, seq), device=device),
                labels=torch.randint(0, size.vocab_size, (batch, seq), device=device),
                loss_mask=(torch.rand(batch, seq, device=device) > 0.2).float())


def mcore_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """pretrain_qwen.forward_step's call: the loss-mask-weighted sum of token losses."""
    tokens = batch["tokens"]
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, position_ids, None, labels=batch["labels"],
                 output_processor=linear_cross_entropy.output_processor, loss_mask=batch["loss_mask"])


def hf_loss(hf, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    token_losses = F.cross_entropy(hf(input_ids=batch["tokens"]).logits.flatten(0, 1).float(),
                                   batch["labels"].flatten(), reduction="none")
    return (token_losses * batch["loss_mask"].flatten()).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--untied", action="store_true", help="a separate output layer (as 7B and larger have)")
    parser.add_argument("--bf16", action="store_true", help="the Megatron model in bf16 (HF stays in fp32, holding "
                        "the same bf16-rounded weights)")
    parser.add_argument("--plain-kernels", action="store_true", help="megatron-core's modules, none of ours")
    parser.add_argument("--size", default="tiny", help="a model size of the size table (default: tiny)")
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    size = dataclasses.replace(get_size(args.size), tie_word_embeddings=not args.untied)

    hf, model, table = models_with_the_same_weights(size, args.bf16, args.plain_kernels, args.seq_len)
    from megatron_patch.model import describe_modules  # after init_megatron: it imports megatron-core its way
    device = next(model.parameters()).device
    weights = mcore_runtime.named_weights(model)
    hf_params = dict(hf.named_parameters())
    if device.type == "cuda":
        for param in model.parameters():
            param.main_grad = torch.zeros_like(param, dtype=torch.float32)

    batch = random_batch(size, args.batch, args.seq_len, device)
    loss = mcore_loss(model, batch)
    loss.backward()

    def hf_loss_and_backward() -> torch.Tensor:
        value = hf_loss(hf, batch)
        value.backward()
        return value

    reference_loss = hf_loss_and_backward()
    reference = {name: param.grad for name, param in hf_params.items()}
    ours = {name: grad.float() for m in table
            for name, grad in zip(m.hf, m.to_hf(total_grad(weights[m.mcore]), size))}
    result = {"device": device.type, "modules": describe_modules(model), "loss": loss.item(),
              "hf_loss": reference_loss.item(), "relative_grad_difference": relative_differences(ours, reference)}
    if args.bf16 and device.type == "cuda":
        # What bf16 costs HF itself (autocast over fp32 weights, HF (a)'s numerics): the yardstick for ours.
        hf.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result["hf_autocast_loss"] = hf_loss_and_backward().item()
        result["hf_autocast_relative_grad_difference"] = relative_differences(
            {name: param.grad for name, param in hf_params.items()}, reference)
    for key in ("relative_grad_difference", "hf_autocast_relative_grad_difference"):
        if key in result:  # the docs' figures; the JSON line (stdout's last) is what the test reads
            values = result[key].values()
            print(f"{key}: median {statistics.median(values):.3e}, worst {max(values):.3e} over {len(values)} "
                  "tensors", file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)


def relative_differences(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """|grad - reference| / |reference| per tensor. k's bias adds the same amount to each of a query's scores,
    which softmax ignores: its exact gradient is 0, so its rounding is measured against the q bias's gradient."""
    return {name: (grad - reference[name]).norm().item()
            / reference[name.replace("k_proj.bias", "q_proj.bias")].norm().item() for name, grad in grads.items()}


if __name__ == "__main__":
    main()
