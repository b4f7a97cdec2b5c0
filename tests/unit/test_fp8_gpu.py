"""fp8 through Transformer Engine: what MP_FP8_FPROP_ACCUMULATION=fp32 changes (a Hopper GPU with TE only)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.is_available() and not HOPPER,
                       reason="needs a Hopper GPU (compute capability 9.0: the accumulation measured here)"),
    pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is None,
                       reason="Transformer Engine is not installed (PR=fp8 runs through it; the launcher refuses "
                              "PR=fp8 without it)"),
]


def _fp8_exact(shape, generator) -> torch.Tensor:
    """fp32 values that e4m3 holds exactly, with an absolute maximum of 448 (e4m3's largest): current scaling's
    scale is then 1 and quantizing loses nothing, so a GEMM's error is its accumulation's alone."""
    values = (torch.randn(shape, generator=generator, device="cuda") * 64).to(torch.float8_e4m3fn).float()
    values.view(-1)[0] = 448.0
    return values


def _relative_error(recipe, x, weight) -> float:
    import transformer_engine.pytorch as te

    layer = te.Linear(weight.shape[1], weight.shape[0], bias=False, params_dtype=torch.float32, device="cuda")
    with torch.no_grad():
        layer.weight.copy_(weight)
        with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
            out = layer(x)
    exact = x.double() @ weight.double().T
    return ((out.double() - exact).norm() / exact.norm()).item()


def test_fp32_forward_accumulation_is_closer_to_the_exact_product():
    """TE's forward GEMM under current scaling accumulates in the tensor cores' reduced precision; the manifest's
    `fp8-forward-fp32-accumulation` entry turns on its split accumulator, which must bring the forward's own
    (accumulation) error down, here at the K of Qwen2.5-7B's MLP output projection."""
    from transformer_engine.common.recipe import Float8CurrentScaling

    from megatron_patch.patches.fp8_accumulation import with_fp32_forward_accumulation

    generator = torch.Generator(device="cuda").manual_seed(0)
    x, weight = _fp8_exact((512, 18944), generator), _fp8_exact((1024, 18944), generator)
    fast = Float8CurrentScaling()
    assert not fast.fp8_gemm_fprop.use_split_accumulator  # TE's default, which the entry exists to change
    split = with_fp32_forward_accumulation(fast)
    assert split.fp8_gemm_fprop.use_split_accumulator and split.fp8_format == fast.fp8_format
    fast_error, split_error = _relative_error(fast, x, weight), _relative_error(split, x, weight)
    print(f"forward GEMM relative error: fast accumulation {fast_error:.2e}, split (fp32) {split_error:.2e}")
    # H200, TE 2.20.2, 2026-12-01: 1.75e-3 fast, 1.28e-4 split (the split accumulator still sums short runs in
    # the tensor cores' precision between its fp32 promotions).
    assert split_error < fast_error / 4, (fast_error, split_error)


def test_the_entry_reaches_megatron_cores_recipe_and_tes_delayed_scaling(monkeypatch):
    import importlib
    from types import SimpleNamespace

    import megatron.core.fp8_utils as fp8_utils
    from megatron.core.enums import Fp8Recipe

    from megatron_patch.patches import fp8_accumulation

    # monkeypatch restores what install() replaces, so later tests see TE's defaults again.
    monkeypatch.setattr(fp8_utils, "get_fp8_recipe", fp8_utils.get_fp8_recipe)
    for name in fp8_accumulation.TE_LINEAR_MODULES:
        module = importlib.import_module(name)
        assert module._2X_ACC_FPROP is False
        monkeypatch.setattr(module, "_2X_ACC_FPROP", module._2X_ACC_FPROP)
    fp8_accumulation.install()
    config = SimpleNamespace(fp8="hybrid", fp8_recipe=Fp8Recipe.tensorwise, fp8_dot_product_attention=False)
    assert fp8_utils.get_fp8_recipe(config).fp8_gemm_fprop.use_split_accumulator
    for name in fp8_accumulation.TE_LINEAR_MODULES:
        assert importlib.import_module(name)._2X_ACC_FPROP is True
