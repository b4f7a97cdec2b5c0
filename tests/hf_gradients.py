"""The loss and every weight's gradient of the model training builds (the entrypoint's model provider and
patches, the fused loss its forward_step asks for) against HF transformers' Qwen2ForCausalLM holding the same
weights, in fp32 (or the model in bf16, as training runs it, against HF in fp32). A forward-only check (logits)
cannot see a wrong backward, and at random init the loss barely depends on attention: a gradient that is wrong
there shows only as slower training hundreds of steps later.

Runs in its own process (Megatron keeps its state in globals) and prints one JSON line:

    python tests/hf_gradients.py [--untied] [--bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_patch.convert import mcore_runtime  # noqa: E402
from megatron_patch.convert.mapping import TiedLMHead, qwen2_5_mappings  # noqa: E402
from megatron_patch.fused import linear_cross_entropy  # noqa: E402
from megatron_patch.hf_checkpoint import random_hf_model  # noqa: E402
from megatron_patch.model_sizes import get_size  # noqa: E402

BATCH, SEQ = 2, 48


def total_grad(param: torch.Tensor) -> torch.Tensor:
    """A weight's gradient wherever training leaves it: `.grad`, and on a GPU also `main_grad`, which the weight
    GEMMs of --gradient-accumulation-fusion add into."""
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    return grad + param.main_grad if hasattr(param, "main_grad") else grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--untied", action="store_true", help="a separate output layer (as 7B and larger have)")
    parser.add_argument("--bf16", action="store_true", help="the Megatron model in bf16 (HF stays in fp32, holding "
                        "the same bf16-rounded weights)")
    args = parser.parse_args()
    size = dataclasses.replace(get_size("tiny"), tie_word_embeddings=not args.untied)

    hf = random_hf_model(size, "float32", seed=0, perturb_biases=True)
    mcore_runtime.init_megatron(size, torch.bfloat16 if args.bf16 else torch.float32, seq_length=SEQ)
    model = mcore_runtime.build_model().train()
    device = next(model.parameters()).device
    hf.to(device)
    weights = mcore_runtime.named_weights(model)
    hf_params = dict(hf.named_parameters())
    table = [m for m in qwen2_5_mappings(size) if not isinstance(m, TiedLMHead)]
    with torch.no_grad():
        for m in table:
            weights[m.mcore].copy_(m.to_mcore([hf_params[name] for name in m.hf], size))
        for m in table:  # HF takes the weights as the model holds them (rounded to bf16 with --bf16)
            for name, value in zip(m.hf, m.to_hf(weights[m.mcore].float(), size)):
                hf_params[name].copy_(value)
    if device.type == "cuda":
        for param in model.parameters():
            param.main_grad = torch.zeros_like(param, dtype=torch.float32)

    torch.manual_seed(1)
    tokens = torch.randint(0, size.vocab_size, (BATCH, SEQ), device=device)
    labels = torch.randint(0, size.vocab_size, (BATCH, SEQ), device=device)
    loss_mask = (torch.rand(BATCH, SEQ, device=device) > 0.2).float()
    position_ids = torch.arange(SEQ, device=device).expand(BATCH, SEQ)
    # pretrain_qwen.forward_step's call: the loss-mask-weighted sum of token losses.
    loss = model(tokens, position_ids, None, labels=labels,
                 output_processor=linear_cross_entropy.output_processor, loss_mask=loss_mask)
    loss.backward()
    hf_token_losses = F.cross_entropy(hf(input_ids=tokens).logits.flatten(0, 1), labels.flatten(), reduction="none")
    hf_loss = (hf_token_losses * loss_mask.flatten()).sum()
    hf_loss.backward()

    differences, scales = {}, {}
    for m in table:
        for name, ours in zip(m.hf, m.to_hf(total_grad(weights[m.mcore]), size)):
            differences[name] = (ours.float() - hf_params[name].grad).norm().item()
            scales[name] = hf_params[name].grad.norm().item()
    # k's bias adds the same amount to each of a query's scores, which softmax ignores: its exact gradient is 0,
    # so its rounding is measured against the q bias's gradient.
    relative = {name: diff / scales[name.replace("k_proj.bias", "q_proj.bias")] for name, diff in differences.items()}
    print(json.dumps({"device": device.type, "loss": loss.item(), "hf_loss": hf_loss.item(),
                      "relative_grad_difference": relative}), flush=True)


if __name__ == "__main__":
    main()
