"""fp8 forward GEMMs with fp32 accumulation (the manifest's `fp8-forward-fp32-accumulation`).

On Hopper, Transformer Engine runs an fp8 GEMM either with the tensor cores' own accumulator, which keeps fewer
mantissa bits than fp32 ("fast accumulation"), or with its partial sums promoted to fp32 at intervals ("split
accumulator"). TE 2.x picks the split accumulator for the backward's GEMMs but not for the forward's, under delayed
scaling (module constants) and current scaling (the recipe's fp8_gemm_fprop) alike; block scaling always splits.
megatron-core 0.19.2 has no flag for it."""

from __future__ import annotations

# TE's modules that read the forward's accumulator choice as a module-level constant (delayed scaling).
TE_LINEAR_MODULES = ("transformer_engine.pytorch.module.linear", "transformer_engine.pytorch.module.layernorm_linear",
                     "transformer_engine.pytorch.module.layernorm_mlp")


def with_fp32_forward_accumulation(recipe):
    """The recipe with its forward GEMMs on the split accumulator (the recipe itself where it has no such field)."""
    import dataclasses

    from transformer_engine.common.recipe import MMParams

    if recipe is None or not hasattr(recipe, "fp8_gemm_fprop") or recipe.fp8_gemm_fprop.use_split_accumulator:
        return recipe
    return dataclasses.replace(recipe, fp8_gemm_fprop=MMParams(use_split_accumulator=True))


def install() -> None:
    import importlib

    import megatron.core.fp8_utils as fp8_utils

    for name in TE_LINEAR_MODULES:
        importlib.import_module(name)._2X_ACC_FPROP = True
    original = fp8_utils.get_fp8_recipe

    def get_fp8_recipe(config):
        return with_fp32_forward_accumulation(original(config))

    fp8_utils.get_fp8_recipe = get_fp8_recipe
