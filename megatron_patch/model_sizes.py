"""The Qwen2.5 size table: the one place that knows each model's shape.

Values are the official Hugging Face Qwen2.5 base configs. `tiny` keeps the real vocabulary so the real
tokenizer fits, and is small enough to train on a CPU.

Print one entry (or `auto`: the shape a checkpoint's config.json describes):
    python -m megatron_patch.model_sizes 0.5B [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_patch.errors import UserError, report_user_errors


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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def parameter_count(self) -> int:
        """Weights of the HF model (GQA attention with q/k/v bias, SwiGLU MLP, RMSNorms, tied or untied output)."""
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        attention = (h * h + h) + 2 * (h * kv + kv) + h * h
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def training_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one training token (forward + backward) in a full causal sequence of `seq_len`: 6 x the
        GEMM weights (q, k, v, o, gate, up, down, output layer) + 6 x layers x q-heads' width x seq_len (scores and
        context, 12 per token halved by the causal mask). Megatron-core's own count for the TFLOP/s it logs
        (megatron.training.training.num_floating_point_operations); tests/unit/test_launcher.py holds them equal."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_query_groups * self.head_dim
        layer_weights = h * (q + 2 * kv) + q * h + 3 * h * self.ffn_hidden_size
        output_weights = self.vocab_size * h
        return 6 * (self.num_layers * layer_weights + output_weights) + 6 * self.num_layers * q * seq_len


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

# HF config.json key for each field that decides the weights' shapes (max positions may differ between the
# base and instruct releases, so it is not compared).
HF_CONFIG_KEYS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
}


def get_size(name: str) -> Qwen25Size:
    try:
        return QWEN2_5_SIZES[name]
    except KeyError:
        raise UserError(
            f"error: unknown MODEL_SIZE '{name}'. Choose one of: {', '.join(QWEN2_5_SIZES)}."
        ) from None


def size_from_hf_config(config: dict) -> Qwen25Size:
    """The shape a Hugging Face Qwen2 config.json describes."""
    return Qwen25Size(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config.get("num_key_value_heads", config["num_attention_heads"]),
        ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        max_position_embeddings=config.get("max_position_embeddings", 32768),
        # transformers >= 5 nests it under rope_parameters
        rope_theta=config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0),
    )


def hf_config_mismatches(size: Qwen25Size, config: dict) -> list[str]:
    """Fields where a named size disagrees with a checkpoint's config.json, as 'field: size vs config'."""
    found = []
    for field, key in HF_CONFIG_KEYS.items():
        if key in config and getattr(size, field) != config[key]:
            found.append(f"{key}: {getattr(size, field)} (size table) vs {config[key]} (config.json)")
    return found


def resolve_size(name: str, checkpoint_dir: str | Path | None = None) -> Qwen25Size:
    """A size-table entry, or `auto` to read config.json; a named size must agree with config.json if present."""
    config_path = Path(checkpoint_dir) / "config.json" if checkpoint_dir else None
    config = json.loads(config_path.read_text()) if config_path and config_path.is_file() else None
    if name == "auto":
        if config is None:
            raise UserError(f"error: MODEL_SIZE=auto needs a config.json, and none is at {config_path}.")
        return size_from_hf_config(config)
    size = get_size(name)
    if config is not None:
        bad = hf_config_mismatches(size, config)
        if bad:
            raise UserError(
                f"error: MODEL_SIZE={name} does not match {config_path}:\n  " + "\n  ".join(bad)
                + "\nPass the size this checkpoint was trained as, or MODEL_SIZE=auto."
            )
    return size


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
