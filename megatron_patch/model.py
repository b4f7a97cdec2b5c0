"""The Qwen2.5 model for megatron-core: its layer spec and the model provider `pretrain()` calls."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_patch.attention import SDPACoreAttention
from megatron_patch.fused.rms_norm import FusedRMSNorm


def qwen2_5_layer_spec(use_te: bool, fused_kernels: bool = True) -> ModuleSpec:
    """Pre-norm RMSNorm decoder layer with GQA self-attention and a SwiGLU MLP.

    With Transformer Engine the norms fuse into the following linear layers; the local spec keeps them as
    separate modules but saves them under TE's key names, so checkpoints move freely between the two.
    Without TE, `fused_kernels` swaps the local spec's core attention for SDPA and torch's RMSNorm for one compiled
    kernel; without it the spec is exactly megatron-core's local one (--plain-kernels).
    """
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if fused_kernels:
        # The local spec's DotProductAttention builds S x S scores; SDPA uses flash/fused kernels instead.
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
        spec.submodules.input_layernorm = FusedRMSNorm
        spec.submodules.pre_mlp_layernorm = FusedRMSNorm
    return spec


def qwen2_5_decoder_spec(config, use_te: bool, fused_kernels: bool, vp_stage=None):
    """The layer spec, or (local spec with fused kernels) the block of this pipeline stage's layers with the
    fused RMSNorm as final norm too."""
    layer = qwen2_5_layer_spec(use_te, fused_kernels)
    if use_te or not fused_kernels:
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=FusedRMSNorm)


def describe_modules(model) -> str:
    """'core attention X, norms Y': what the built model runs, for the log (--plain-kernels shows megatron's)."""
    def kinds(suffix: str) -> str:
        names = {type(m).__name__ for name, m in model.named_modules() if name.endswith(suffix)}
        return "/".join(sorted(names - {"IdentityOp"})) or "-"  # IdentityOp: Qwen2.5 has no q/k norms

    return f"core attention {kinds('core_attention')}, norms {kinds('layernorm')}"


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron.training import get_args, print_rank_0
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    use_te = args.transformer_impl == "transformer_engine"
    if config is None:
        config = core_transformer_config_from_args(args)
    fused = not args.plain_kernels
    print_rank_0(f"building Qwen2.5 GPTModel ({'Transformer Engine' if use_te else 'local'} spec, "
                 f"{'fused' if fused else 'plain'} kernels)")
    model = GPTModel(
        config=config,
        transformer_layer_spec=qwen2_5_decoder_spec(config, use_te, fused, vp_stage),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    print_rank_0(f"Qwen2.5 GPTModel modules: {describe_modules(model)}")
    if args.pretrained_hf:
        from megatron_patch.convert.hf_direct import load_for_training

        load_for_training(model, args, vp_stage)
    if args.lora_rank:
        from megatron_patch.lora.attach import attach_for_training

        attach_for_training(model, args, vp_stage)
    return model
