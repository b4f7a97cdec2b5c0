"""LoRA/DoRA adapters (megatron_patch/lora) against peft: the whole model's loss and adapter gradients
(tests/lora_gradients.py), Transformer Engine's layer shapes, target names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_patch.errors import UserError
from megatron_patch.lora.targets import ALL_TARGETS, LoraSettings, parse_targets

SCRIPT = Path(__file__).resolve().parents[1] / "lora_gradients.py"
TOLERANCE = 1e-5  # fp32 on both sides; measured on the CPU: 5.1e-7 (LoRA), 9.2e-7 (DoRA) at worst


@pytest.fixture(scope="module")
def against_peft() -> dict:
    # The package from this checkout (and peft wherever PYTHONPATH has it), whatever the interpreter has installed.
    path = os.pathsep.join(p for p in (str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_loss_and_every_adapter_gradient_match_peft(against_peft, method):
    """Tiny Qwen2.5, rank 8, every linear layer: iteration 1's loss and each adapter tensor's gradient (shared A:
    the sum of peft's q/k/v or gate/up A gradients) as transformers + peft compute them."""
    result = against_peft[method]
    assert abs(result["loss"] - result["peft_loss"]) <= TOLERANCE * abs(result["peft_loss"]), result
    differences = result["relative_grad_difference"]
    # 2 layers x 7 HF modules x (A, B) (+ DoRA's magnitude)
    assert len(differences) == 2 * 7 * (3 if method == "dora" else 2)
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, (worst, differences[worst])
    if method == "dora":  # DoRA's initial magnitudes: the base weights' row norms, as peft computes them
        assert result["initial_magnitude_difference"] <= 1e-6


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_only_adapters_train_and_the_count_reads_as_peft_prints_it(against_peft, method):
    result = against_peft[method]
    assert result["frozen"] == result["parameter_count"] == result["peft_frozen"]
    assert result["trainable"] == result["expected_trainable"] > 0
    assert result["our_line_for_peft_counts"] == result["peft_line"]


class LayerNormColumnParallelLinearLikeTE(torch.nn.Module):
    """megatron-core's TELayerNormColumnParallelLinear as seen from outside (Transformer Engine is not installed
    here): RMSNorm then the linear layer, `parallel_mode`, `return_layernorm_output`, and its return convention,
    (out, None) or ((out, normed input), None)."""

    parallel_mode = "column"

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)
        self.bias = torch.nn.Parameter(torch.randn(fan_out))
        self.layer_norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(fan_in))
        self.return_layernorm_output = self.return_layernorm_output_gathered = False
        self.config, self._tp_group = SimpleNamespace(sequence_parallel=False), None

    def normed(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.layer_norm_weight

    def forward(self, x):
        out = F.linear(self.normed(x), self.weight, self.bias)
        return ((out, self.normed(x)) if self.return_layernorm_output else out), None


class RowParallelLinearLikeTE(torch.nn.Module):
    """megatron-core's TERowParallelLinear seen from outside: no bias, returns (out, None)."""

    parallel_mode = "row"

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)
        self.bias = torch.nn.Parameter(torch.empty(0))  # TE keeps an empty tensor for "no bias"
        self.config, self._tp_group = SimpleNamespace(sequence_parallel=False), None

    def normed(self, x):
        return x

    def forward(self, x):
        return F.linear(x, self.weight), None


@pytest.mark.parametrize("layer_class", [LayerNormColumnParallelLinearLikeTE, RowParallelLinearLikeTE])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_te_shaped_layers_take_the_adapter_peft_computes_on_their_linear_input(layer_class, method):
    """On TE's layer-norm linear the adapter reads the normalized input (TE is asked for it), and the layer still
    returns (output, None); the output is peft's LoRA/DoRA layer over the same linear on the same input."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    from megatron_patch.lora.adapters import adapt

    torch.manual_seed(0)
    layer = layer_class(16, 24)
    settings = LoraSettings(rank=4, alpha=8.0, method=method)
    adapter = adapt(layer, settings)
    base = torch.nn.Linear(16, 24, bias=layer.bias.numel() > 0)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        if base.bias is not None:
            base.bias.copy_(layer.bias)
        adapter.lora_A.normal_()
        adapter.lora_B.normal_()
    config = LoraConfig(r=4, lora_alpha=8, use_dora=settings.dora)
    reference = PeftLinear(base, "default", config, r=4, lora_alpha=8)
    with torch.no_grad():
        reference.lora_A["default"].weight.copy_(adapter.lora_A)
        reference.lora_B["default"].weight.copy_(adapter.lora_B)
        if settings.dora:
            adapter.magnitude.uniform_(0.5, 2.0)
            reference.lora_magnitude_vector["default"].weight.copy_(adapter.magnitude)
    x = torch.randn(5, 3, 16)
    output, bias = layer(x)
    assert bias is None and isinstance(output, torch.Tensor)
    torch.testing.assert_close(output, reference(layer.normed(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_base_and_its_update_in_one_function_match_separate_autograd(with_bias):
    """FrozenLinearWithLora (LoRA at TP 1: the update written first, the base GEMM adding onto it; dL/dx likewise)
    against x W^T + b + s B A x by autograd, in fp64: the output and the gradients of x, A and B; W and b frozen."""
    from megatron_patch.lora.adapters import FrozenLinearWithLora

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    weight, bias = torch.randn(6, 8, dtype=torch.float64, generator=generator), torch.randn(6, dtype=torch.float64)
    lora_A = torch.randn(3, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    lora_B = torch.randn(6, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    upstream = torch.randn(5, 2, 6, dtype=torch.float64, generator=generator)
    bias = bias if with_bias else None
    ours = FrozenLinearWithLora.apply(x, weight, bias, lora_A, lora_B, 1.5)
    reference = F.linear(x, weight, bias) + 1.5 * F.linear(F.linear(x, lora_A), lora_B)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(ours, [x, lora_A, lora_B], upstream),
                         torch.autograd.grad(reference, [x, lora_A, lora_B], upstream)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_weights_are_peft_merge(method):
    """The convertor's --merge-lora maths (megatron_patch.lora.peft_export.merged_weight) against peft's own
    merge of the same LoRA/DoRA layer."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    from megatron_patch.lora.peft_export import merged_weight

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=False)
    reference = PeftLinear(base, "default", LoraConfig(r=4, lora_alpha=8, use_dora=method == "dora"), r=4,
                           lora_alpha=8)
    with torch.no_grad():
        lora_A, lora_B = reference.lora_A["default"].weight, reference.lora_B["default"].weight
        lora_B.normal_()
        magnitude = reference.lora_magnitude_vector["default"].weight.uniform_(0.5, 2.0) if method == "dora" else None
        ours = merged_weight(base.weight.clone(), lora_A, lora_B, magnitude, scaling=2.0)
        reference.merge()
    torch.testing.assert_close(ours, reference.base_layer.weight, rtol=1e-6, atol=1e-6)


def test_targets_take_megatron_and_peft_names_in_model_order():
    assert parse_targets("") == parse_targets("all-linear") == parse_targets("all") == ALL_TARGETS
    assert parse_targets("down_proj, q_proj,k_proj,v_proj") == ("linear_qkv", "linear_fc2")
    assert parse_targets("linear_fc1,o_proj") == ("linear_proj", "linear_fc1")
    assert LoraSettings(8, targets=("linear_qkv",)).hf_targets == ["q_proj", "k_proj", "v_proj"]


@pytest.mark.parametrize("text,says", [
    ("q_proj", "names q_proj but not k_proj, v_proj: Megatron computes q_proj, k_proj, v_proj in one fused layer "
               "(linear_qkv)"),
    ("gate_proj,o_proj", "names gate_proj but not up_proj"),
    ("lm_head", "names lm_head, which Qwen2.5 has no adapter for"),
])
def test_a_target_that_cannot_be_adapted_is_refused_naming_the_fix(text, says):
    with pytest.raises(UserError, match="MP_LORA_TARGETS") as err:
        parse_targets(text)
    assert says in str(err.value)

