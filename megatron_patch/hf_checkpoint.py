"""Hugging Face Qwen2.5 folders: what one holds (its weight and tokenizer files; no torch needed to tell one), and
random-init ones of any size-table shape (or a variant's config: other rope_theta, positions, YaRN, any
config.json key), for the demo, tests and benchmarks."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from megatron_patch.model_sizes import QWEN2_5_SIZES, Qwen25Size, get_size

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def is_hf_checkpoint(folder: str | Path) -> bool:
    """A Hugging Face model folder (config.json beside safetensors weights), not a Megatron checkpoint."""
    folder = Path(folder)
    weights = (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
    megatron = (folder / "latest_checkpointed_iteration.txt").exists()
    return (folder / "config.json").is_file() and weights and not megatron


def hf_config_for(size: Qwen25Size, dtype: str = "bfloat16", overrides: dict | None = None):
    """transformers' Qwen2Config of `size` (its rope_theta, positions and YaRN scaling included); `overrides`: more
    config.json keys, as a fine-tune's custom config would set them."""
    from transformers import Qwen2Config

    return Qwen2Config(**{**dict(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.ffn_hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_query_groups,
        max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=size.rms_norm_eps,
        rope_theta=size.rope_theta,
        tie_word_embeddings=size.tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=151643,
        eos_token_id=151643,
        torch_dtype=dtype,
        use_sliding_window=False,
        rope_scaling=size.rope_scaling.hf_fields() if size.rope_scaling else None,
    ), **(overrides or {})})


def random_hf_model(size: Qwen25Size | str, dtype: str = "bfloat16", seed: int = 1234,
                    perturb_biases: bool = False, overrides: dict | None = None):
    """A random-init Qwen2ForCausalLM with `size`'s shape. HF's init leaves the RMSNorm weights at 1 (and the q/k/v
    biases at 0): they are perturbed, so conversion and gradient checks see every tensor do something."""
    import torch
    from transformers import Qwen2ForCausalLM

    size = get_size(size) if isinstance(size, str) else size
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config_for(size, dtype, overrides)).to(getattr(torch, dtype))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or (perturb_biases and name.endswith(".bias")):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_random_hf_checkpoint(
    size: Qwen25Size | str,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    seed: int = 1234,
    tokenizer_dir: str | Path | None = None,
    overrides: dict | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Save a random-init Qwen2ForCausalLM with `size`'s shape (and a tokenizer's files beside it); `overrides`:
    more config.json keys; `max_shard_size`: transformers' (a smaller one writes a sharded folder with its index)."""
    out_dir = Path(out_dir)
    model = random_hf_model(size, dtype, seed, overrides=overrides)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and not (out_dir / name).exists():
                shutil.copy(src, out_dir / name)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("size", choices=list(QWEN2_5_SIZES))
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tokenizer", help="folder whose tokenizer files are copied beside the weights")
    parser.add_argument("--max-shard-size", default="5GB", help="transformers' largest shard, e.g. 2GB")
    args = parser.parse_args()
    write_random_hf_checkpoint(args.size, args.out_dir, args.dtype, args.seed, args.tokenizer,
                               max_shard_size=args.max_shard_size)
    print(f"wrote a random-init Qwen2.5-{args.size} checkpoint to {args.out_dir}")


if __name__ == "__main__":
    main()
