"""config.json is the model: the published variants' configs read as transformers reads them, both spellings of
RoPE settings, every field Megatron cannot build refused by name, and what conversion back writes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from megatron_patch.errors import UserError
from megatron_patch.model_sizes import (
    QWEN2_5_SIZES,
    YarnScaling,
    following_config_note,
    hf_config_with,
    model_from_hf_config,
    resolve_size,
)

# Published configs (the maths keys as Qwen ships them, transformers 4 spelling): the Math models' RoPE base and
# 4096 positions, the instruct models' 32768 positions, sliding_window set but switched off.
QWEN_7B_SHAPE = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}
PUBLISHED = {
    "Qwen2.5-Math-7B": {**QWEN_7B_SHAPE, "max_position_embeddings": 4096, "rope_theta": 10000, "sliding_window": 4096,
                        "use_sliding_window": False, "use_mrope": False, "rms_norm_eps": 1e-06},
    "Qwen2.5-7B-Instruct": {**QWEN_7B_SHAPE, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                            "sliding_window": 131072, "use_sliding_window": False, "rms_norm_eps": 1e-06},
    "Qwen2.5-Coder-7B-Instruct + YaRN": {**QWEN_7B_SHAPE, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                                         "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768,
                                                          "type": "yarn"}},
    "Qwen2.5-7B": {**QWEN_7B_SHAPE, "max_position_embeddings": 131072, "rope_theta": 1000000.0},
}
COMMON = {"model_type": "qwen2", "hidden_act": "silu", "attention_dropout": 0.0, "rms_norm_eps": 1e-06}
TINY_CONFIG = {**COMMON, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 151936, "rope_theta": 1000000.0,
               "tie_word_embeddings": True}


@pytest.mark.parametrize("name, differences", [
    ("Qwen2.5-Math-7B", "rope_theta 10000 (table: 1000000), max_position_embeddings 4096 (table: 131072)"),
    ("Qwen2.5-7B-Instruct", "max_position_embeddings 32768 (table: 131072)"),
    ("Qwen2.5-Coder-7B-Instruct + YaRN", 'max_position_embeddings 32768 (table: 131072), rope_scaling {"type": '
                                         '"yarn", "factor": 4.0, "original_max_position_embeddings": 32768} (table: '
                                         'none)'),
    ("Qwen2.5-7B", None),
])
def test_published_variants_are_7b_shapes_built_as_their_config_says(tmp_path, name, differences):
    (tmp_path / "config.json").write_text(json.dumps({**COMMON, **PUBLISHED[name]}))
    model = resolve_size("7B", tmp_path)
    assert resolve_size("auto", tmp_path) == model
    config = PUBLISHED[name]
    assert model.rope_theta == config["rope_theta"]
    assert model.max_position_embeddings == config["max_position_embeddings"]
    note = following_config_note(model, tmp_path / "config.json", "7B")
    expected = f"{tmp_path / 'config.json'} differs from the 7B size table in {differences}: following config.json."
    assert note == (None if differences is None else expected)
    if "rope_scaling" in config:
        assert model.rope_scaling == YarnScaling(4.0, 32768) and model.positions == 131072


def test_yarn_reads_the_same_in_qwens_and_transformers_5s_spelling():
    from megatron_patch.hf_checkpoint import hf_config_for

    qwen = {**COMMON, **PUBLISHED["Qwen2.5-Coder-7B-Instruct + YaRN"]}
    model = model_from_hf_config(qwen)
    saved_by_transformers = json.loads(hf_config_for(model).to_json_string())  # nests it under rope_parameters
    assert "rope_parameters" in saved_by_transformers and "rope_scaling" not in saved_by_transformers
    assert model_from_hf_config(saved_by_transformers) == model
    rope_type_spelling = {**qwen, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}}
    # original_max_position_embeddings defaults to max_position_embeddings (transformers' rule)
    assert model_from_hf_config(rope_type_spelling).rope_scaling == YarnScaling(4.0, 32768, beta_fast=16.0)


@pytest.mark.parametrize("spelling", ["qwen", "transformers 5", "both"])
def test_conversion_back_records_the_trained_rope_settings_in_the_configs_own_spelling(spelling):
    from megatron_patch.hf_checkpoint import hf_config_for

    base = QWEN2_5_SIZES["tiny"]
    config = {**TINY_CONFIG, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}
    if spelling != "qwen":
        config = json.loads(hf_config_for(base).to_json_string())
        config |= {"rope_theta": base.rope_theta} if spelling == "both" else {}
    assert model_from_hf_config(config) == base
    trained = dataclasses.replace(base, rope_theta=10000.0, rms_norm_eps=1e-5, rope_scaling=YarnScaling(4.0, 32768))
    written = hf_config_with(config, trained)
    assert model_from_hf_config(written) == trained
    assert ("rope_parameters" in written) == (spelling != "qwen")
    assert written.get("rope_theta", trained.rope_theta) == trained.rope_theta  # never two disagreeing
    assert {k: v for k, v in written.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters",
                                                          "rms_norm_eps")} == \
        {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps")}
    assert model_from_hf_config(hf_config_with(written, base)) == base  # and back to plain RoPE


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window: true (sliding-window attention"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "use_sliding_window: true"),
    ({"hidden_act": "gelu"}, "hidden_act: 'gelu' (Qwen2.5's MLP is SwiGLU: silu)"),
    ({"attention_bias": False}, "attention_bias: False (Qwen2.5 has q/k/v biases)"),
    ({"head_dim": 32}, "head_dim: 32 (only hidden_size / num_attention_heads = 16 is built)"),
    ({"attention_dropout": 0.1}, "attention_dropout: 0.1 (training runs without dropout)"),
    ({"model_type": "llama"}, "model_type: 'llama' (this toolkit builds Qwen2 models"),
    ({"rope_theta": 10000.5}, "rope_theta: 10000.5 (megatron-core 0.19.2 takes a whole number as --rotary-base)"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear' (supported: none, or 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}, "rope_scaling type 'dynamic'"),
    ({"rope_scaling": {"type": "yarn", "factor": 1.0}}, "rope_scaling.factor: 1.0 (YaRN needs a factor above 1"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 1.0, "mscale": 0.7}},
     "rope_scaling keys attention_factor, mscale (megatron-core's YaRN here takes factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": False}}, "rope_scaling keys truncate"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor: 0.5 (RoPE on every head dimension only)"),
])
def test_a_field_megatron_cannot_build_as_written_is_refused_naming_it_and_the_file(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIG, **change}))
    for name in ("tiny", "auto"):
        with pytest.raises(UserError) as err:
            resolve_size(name, tmp_path)
        text = str(err.value)
        assert text.startswith(f"error: {tmp_path / 'config.json'} describes a model this toolkit cannot train as "
                               "written:") and message in text, text


def test_a_config_without_a_models_keys_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    with pytest.raises(UserError, match="lacks num_hidden_layers, num_attention_heads, intermediate_size, "
                                        "vocab_size: it is not a Qwen2 model's config.json"):
        resolve_size("auto", tmp_path)


def test_yarn_runs_megatron_cores_unfused_rope_with_a_message():
    """The fused RoPE kernels leave YaRN's attention scaling out: patches.settle_args switches them off and says so
    (megatron-core's own validate_args turns --apply-rope-fusion off silently for any non-'rope' embedding)."""
    from megatron_patch import patches

    def args(**kw):
        return argparse.Namespace(**{"position_embedding_type": "yarn", "apply_rope_fusion": True,
                                     "fused_single_qkv_rope": True, "plain_kernels": False,
                                     "gradient_accumulation_fusion": False, **kw})

    yarn = args()
    changes = patches.settle_args(yarn)
    assert not yarn.apply_rope_fusion and not yarn.fused_single_qkv_rope
    assert changes[0].startswith("RoPE unfused for YaRN (--apply-rope-fusion and --fused-single-qkv-rope off)")
    plain = args(plain_kernels=True)
    assert not any("YaRN" in line for line in patches.settle_args(plain)) and not plain.apply_rope_fusion
    rope = args(position_embedding_type="rope", fused_single_qkv_rope=False)
    assert not any("YaRN" in line for line in patches.settle_args(rope))


def test_auto_without_a_config_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"MODEL_SIZE=auto needs a config.json, and none is at {tmp_path}"):
        resolve_size("auto", Path(tmp_path))
