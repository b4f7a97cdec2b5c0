"""The Qwen2.5 size table, and the model a checkpoint's config.json describes.

Values are the official Hugging Face Qwen2.5 base configs. `tiny` keeps the real vocabulary so the real
tokenizer fits, and is small enough to train on a CPU.

A config.json is the truth about its model: `model_from_hf_config` reads every field that changes the maths
(shape, vocabulary, tying, rope_theta, max_position_embeddings, rms_norm_eps, rope_scaling) and refuses what
Megatron cannot build as written. A size name only names a shape, checked against config.json.

Print one entry (or `auto`: the model a checkpoint's config.json describes):
    python -m megatron_patch.model_sizes 0.5B [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from megatron_patch.errors import UserError, report_user_errors


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling (config.json's rope_scaling of type yarn): positions up to factor x
    original_max_position_embeddings. Attention is scaled by YaRN's default 0.1 ln(factor) + 1, applied to cos and
    sin by transformers and by megatron-core alike."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    @property
    def positions(self) -> int:
        return int(self.factor * self.original_max_position_embeddings)

    def hf_fields(self) -> dict:
        """As config.json's rope_scaling spells it (Qwen2.5's documented form), defaults left out."""
        fields = {"type": "yarn", "factor": self.factor,
                  "original_max_position_embeddings": self.original_max_position_embeddings}
        fields |= {k: getattr(self, k) for k in ("beta_fast", "beta_slow")
                   if getattr(self, k) != YarnScaling.__dataclass_fields__[k].default}
        return fields


@dataclass(frozen=True)
class Qwen25Size:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # HF: num_key_value_heads
    ffn_hidden_size: int  # HF: intermediate_size
    vocab_size: int  # padded vocab = HF config vocab_size
    tie_word_embeddings: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 1_000_000.0
    rope_scaling: YarnScaling | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def positions(self) -> int:
        """The longest sequence the model takes: max_position_embeddings, or YaRN's extended length."""
        return max(self.max_position_embeddings, self.rope_scaling.positions if self.rope_scaling else 0)

    @property
    def parameter_count(self) -> int:
        """Weights of the HF model (GQA attention with q/k/v bias, SwiGLU MLP, RMSNorms, tied or untied output)."""
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        attention = (h * h + h) + 2 * (h * kv + kv) + h * h
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def training_flops_per_token(self, seq_len: int, frozen_weights: bool = False) -> float:
        """Model FLOPs of one training token (forward + backward) in a full causal sequence of `seq_len`: 6 x the
        GEMM weights (q, k, v, o, gate, up, down, output layer) + 6 x layers x q-heads' width x seq_len (scores and
        context, 12 per token halved by the causal mask). Megatron-core's own count for the TFLOP/s it logs
        (megatron.training.training.num_floating_point_operations); tests/unit/test_launcher.py holds them equal.
        frozen_weights (LoRA: the base takes no gradient): 4 x the weights, no weight-gradient GEMMs; the adapters'
        own (rank r: about r x (in + out) / (in x out) of their layer, 1% at rank 16 and 1.5B) are left out."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_query_groups * self.head_dim
        layer_weights = h * (q + 2 * kv) + q * h + 3 * h * self.ffn_hidden_size
        output_weights = self.vocab_size * h
        per_weight = 4 if frozen_weights else 6
        return per_weight * (self.num_layers * layer_weights + output_weights) + 6 * self.num_layers * q * seq_len


QWEN2_5_SIZES: dict[str, Qwen25Size] = {
    "tiny": Qwen25Size(2, 64, 4, 2, 128, 151936, True, 1e-6, 32768),
    "0.5B": Qwen25Size(24, 896, 14, 2, 4864, 151936, True, 1e-6, 32768),
    "1.5B": Qwen25Size(28, 1536, 12, 2, 8960, 151936, True, 1e-6, 131072),
    "3B": Qwen25Size(36, 2048, 16, 2, 11008, 151936, True, 1e-6, 32768),
    "7B": Qwen25Size(28, 3584, 28, 4, 18944, 152064, False, 1e-6, 131072),
    "14B": Qwen25Size(48, 5120, 40, 8, 13824, 152064, False, 1e-5, 131072),
    "32B": Qwen25Size(64, 5120, 40, 8, 27648, 152064, False, 1e-5, 131072),
    "72B": Qwen25Size(80, 8192, 64, 8, 29568, 152064, False, 1e-5, 131072),
}

# HF config.json key for each field that decides the weights' shapes: what a size name stands for.
HF_CONFIG_KEYS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
}
# The fields that change the maths without changing a weight's shape (config.json's names).
NON_SHAPE_FIELDS = ("rope_theta", "max_position_embeddings", "rms_norm_eps", "rope_scaling")
# transformers' Qwen2Config defaults, for keys a config.json leaves out.
HF_DEFAULT_ROPE_THETA = 10_000.0
YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "rope_theta"}


def get_size(name: str) -> Qwen25Size:
    try:
        return QWEN2_5_SIZES[name]
    except KeyError:
        raise UserError(
            f"error: unknown MODEL_SIZE '{name}'. Choose one of: {', '.join(QWEN2_5_SIZES)}."
        ) from None


def shape_name(size: Qwen25Size) -> str | None:
    """The size-table name of this shape, or None for a shape of its own."""
    return next((name for name, entry in QWEN2_5_SIZES.items() if not shape_differences(entry, size)), None)


def shape_differences(table: Qwen25Size, model: Qwen25Size) -> list[str]:
    """Shape fields where a size-table entry and a model differ, as 'key: table vs model' (config.json's keys)."""
    return [f"{key}: {getattr(table, field)} (size table) vs {getattr(model, field)} (config.json)"
            for field, key in HF_CONFIG_KEYS.items() if getattr(table, field) != getattr(model, field)]


def non_shape_differences(reference: Qwen25Size, model: Qwen25Size, label: str = "table") -> list[str]:
    """The maths fields (not the shape) where the model differs from a reference (a size-table entry), as
    'key X (table: Y)'."""
    return [f"{key} {_shown(getattr(model, key))} ({label}: {_shown(getattr(reference, key))})"
            for key in NON_SHAPE_FIELDS if getattr(model, key) != getattr(reference, key)]


def _shown(value) -> str:
    if isinstance(value, YarnScaling):
        return json.dumps(value.hf_fields())
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def following_config_note(model: Qwen25Size, config_path: Path | str, name: str | None = None) -> str | None:
    """The one line saying where config.json's model departs from its size-table entry (MODEL_SIZE's, else the
    entry of its shape), which is followed; None when it does not."""
    name = name if name in QWEN2_5_SIZES else shape_name(model)
    differences = non_shape_differences(QWEN2_5_SIZES[name], model) if name else []
    if not differences:
        return None
    return f"{config_path} differs from the {name} size table in {', '.join(differences)}: following config.json."


# ---- config.json -> the model, as transformers reads it

def _rope_parameters(config: dict) -> dict:
    """rope_theta and the scaling in one dict, from Qwen2.5's rope_theta + rope_scaling or transformers 5's
    rope_parameters (which wins where both are given, as in transformers)."""
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    rope.setdefault("rope_theta", config.get("rope_theta", HF_DEFAULT_ROPE_THETA))
    if "partial_rotary_factor" in config:
        rope.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def _architecture_problems(config: dict) -> list[str]:
    problems = []
    if config.get("model_type", "qwen2") != "qwen2":
        problems.append(f"model_type: {config['model_type']!r} (this toolkit builds Qwen2 models, model_type 'qwen2')")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act: {config['hidden_act']!r} (Qwen2.5's MLP is SwiGLU: silu)")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
        problems.append("use_sliding_window: true (sliding-window attention is not built here; Qwen2.5 attends to "
                        "the whole sequence: set it to false)")
    if config.get("attention_bias", True) is not True:
        problems.append(f"attention_bias: {config['attention_bias']} (Qwen2.5 has q/k/v biases)")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if heads and hidden and config.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim: {config['head_dim']} (only hidden_size / num_attention_heads = "
                        f"{hidden // heads} is built)")
    if config.get("attention_dropout", 0.0):
        problems.append(f"attention_dropout: {config['attention_dropout']} (training runs without dropout)")
    return problems


def _rope_problems(rope: dict) -> list[str]:
    theta, kind = rope["rope_theta"], rope["rope_type"]
    problems = []
    if float(theta) != int(theta):
        problems.append(f"rope_theta: {theta} (megatron-core 0.19.2 takes a whole number as --rotary-base)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor: {rope['partial_rotary_factor']} (RoPE on every head dimension only)")
    if kind not in ("default", "yarn"):
        problems.append(f"rope_scaling type {kind!r} (supported: none, or 'yarn' as Qwen2.5 documents for long "
                        "context)")
    elif kind == "yarn":
        if not isinstance(rope.get("factor"), (int, float)) or rope["factor"] <= 1:
            problems.append(f"rope_scaling.factor: {rope.get('factor')} (YaRN needs a factor above 1, e.g. 4.0)")
        truncates = rope.get("truncate", True) is True  # transformers' default, as megatron-core rounds
        other = sorted(set(rope) - YARN_KEYS - {"partial_rotary_factor"} - ({"truncate"} if truncates else set()))
        if other:
            problems.append(f"rope_scaling keys {', '.join(other)} (megatron-core's YaRN here takes factor, "
                            "original_max_position_embeddings, beta_fast and beta_slow, with YaRN's default "
                            "attention scaling)")
    return problems


def model_from_hf_config(config: dict, path: Path | str = "config.json") -> Qwen25Size:
    """The model a Hugging Face Qwen2 config.json describes, read as transformers reads it (its defaults for
    absent keys). A field Megatron cannot honour as written is a UserError naming the field and the file."""
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in config]
    if missing:
        raise UserError(f"error: {path} lacks {', '.join(missing)}: it is not a Qwen2 model's config.json.")
    rope = _rope_parameters(config)
    problems = _architecture_problems(config) + _rope_problems(rope)
    if problems:
        raise UserError(f"error: {path} describes a model this toolkit cannot train as written:\n  "
                        + "\n  ".join(problems) + "\nEdit config.json if the checkpoint allows it, or convert a "
                        "checkpoint whose config.json Qwen2.5's recipe supports.")
    max_positions = config.get("max_position_embeddings", 32768)
    yarn = None
    if rope["rope_type"] == "yarn":
        # transformers takes a top-level original_max_position_embeddings first, then max_position_embeddings
        original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings",
                                                                                max_positions)
        yarn = YarnScaling(float(rope["factor"]), int(original), float(rope.get("beta_fast") or 32.0),
                           float(rope.get("beta_slow") or 1.0))
    return Qwen25Size(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config.get("num_key_value_heads") or config["num_attention_heads"],
        ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        max_position_embeddings=max_positions,
        rope_theta=float(rope["rope_theta"]),
        rope_scaling=yarn,
    )


def read_checkpoint_json(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, metadata.json); one that does not parse is a UserError naming it."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"error: {path} is not valid JSON ({e}); restore it from the checkpoint's source.") from None


def resolve_size(name: str, checkpoint_dir: str | Path | None = None) -> Qwen25Size:
    """The model to build: checkpoint_dir's config.json where there is one (a named size must match its shape;
    `auto` takes it as it is), else the size-table entry."""
    config_path = Path(checkpoint_dir) / "config.json" if checkpoint_dir else None
    if config_path is None or not config_path.is_file():
        if name == "auto":
            raise UserError(f"error: MODEL_SIZE=auto needs a config.json, and none is at {config_path}.")
        return get_size(name)
    model = model_from_hf_config(read_checkpoint_json(config_path), config_path)
    if name != "auto":
        bad = shape_differences(get_size(name), model)
        if bad:
            raise UserError(
                f"error: MODEL_SIZE={name} does not match {config_path}:\n  " + "\n  ".join(bad)
                + "\nPass the size this checkpoint was trained as, or MODEL_SIZE=auto."
            )
    return model


def hf_config_with(config: dict, model: Qwen25Size) -> dict:
    """config.json recording `model`'s max_position_embeddings, rms_norm_eps, rope_theta and rope_scaling, in the
    config's own spelling (transformers 5's rope_parameters, or rope_theta and rope_scaling)."""
    config = {**config, "max_position_embeddings": model.max_position_embeddings, "rms_norm_eps": model.rms_norm_eps}
    scaling = model.rope_scaling.hf_fields() if model.rope_scaling else None
    if "rope_parameters" in config:
        config["rope_parameters"] = {**(scaling or {}), "rope_type": scaling["type"] if scaling else "default",
                                     "rope_theta": model.rope_theta}
        config.pop("rope_scaling", None)
        if "rope_theta" in config:  # transformers reads rope_parameters' first: never leave the two disagreeing
            config["rope_theta"] = model.rope_theta
    else:
        config |= {"rope_theta": model.rope_theta, "rope_scaling": scaling}
    return config


def with_yarn(model: Qwen25Size, factor: float) -> Qwen25Size:
    """The model with YaRN scaling by `factor` (MP_ROPE_SCALING=yarn:F) over the positions it was trained at: its
    YaRN's original length if it has one, else its max_position_embeddings."""
    original = model.rope_scaling.original_max_position_embeddings if model.rope_scaling else \
        model.max_position_embeddings
    return replace(model, rope_scaling=YarnScaling(float(factor), original))


def layout_problems(size: Qwen25Size, tp: int, pp: int, vp: int | None = None) -> list[str]:
    """What is wrong with splitting this shape over TP tensor and PP pipeline ranks (VP virtual stages per
    pipeline rank); empty when the layout works. One check for the launcher and the convertor."""
    if tp < 1 or pp < 1:
        return [f"TP and PP must be at least 1 (got TP={tp}, PP={pp})"]
    problems = []
    if size.num_attention_heads % tp or size.num_query_groups % tp:
        choices = [t for t in range(1, size.num_query_groups + 1) if size.num_query_groups % t == 0]
        problems.append(f"TP={tp} must divide the {size.num_attention_heads} attention heads and "
                        f"{size.num_query_groups} key/value heads (choose TP from {choices})")
    if size.num_layers % pp:
        problems.append(f"PP={pp} must divide the {size.num_layers} layers")
    elif vp is not None and size.num_layers % (pp * vp):
        problems.append(f"PP x virtual stages = {pp} x {vp} must divide the {size.num_layers} layers")
    return problems


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=[*QWEN2_5_SIZES, "auto"])
    parser.add_argument("--checkpoint", help="checkpoint folder whose config.json must match (or define, with auto)")
    args = parser.parse_args(argv)
    size = resolve_size(args.size, args.checkpoint)
    print(json.dumps(asdict(size), indent=2))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
