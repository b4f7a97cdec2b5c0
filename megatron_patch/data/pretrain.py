"""Pre-training datasets from idxmaps: megatron.core's GPTDataset behind BlendedMegatronDatasetBuilder.

`--data-path`-style blends ("0.7 a_text_document 0.3 b_text_document", or prefixes alone) are split by
`--split` into train/valid/test; a separate validation blend instead makes train use all of the main blend.
Works without torch.distributed (the builder builds directly in a single process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from megatron_patch.tokenizer import EOD_TOKEN_ID


def parse_data_path(items: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """('0.7', 'a', '0.3', 'b') -> (['a', 'b'], [0.7, 0.3]); ('a', 'b') -> (['a', 'b'], None)."""
    items = items.split() if isinstance(items, str) else [str(i) for i in items]
    if not items:
        raise ValueError("empty data path: pass at least one idxmap prefix")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if not is_number(items[0]):
        if any(is_number(i) for i in items):
            raise ValueError(f"data path {items} mixes weights and prefixes: give 'W1 P1 W2 P2 ...' or 'P1 P2 ...'")
        return items, None
    if len(items) % 2:
        raise ValueError(f"data path {items} has an odd number of entries: give 'W1 P1 W2 P2 ...'")
    weights, prefixes = [float(w) for w in items[0::2]], items[1::2]
    return prefixes, weights


def _check_prefixes(prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
            hint = " (preprocess_data.py adds _text_document to its --output-prefix)" if not str(prefix).endswith(
                "_document") else ""
            raise FileNotFoundError(f"idxmap {prefix}.bin/.idx not found{hint}.")


def megatron_tokenizer(tokenizer_dir: str | Path):
    """megatron.core's own tokenizer over a Hugging Face folder (what GPTDatasetConfig expects)."""
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer = MegatronTokenizer.from_pretrained(str(tokenizer_dir), metadata_path={"library": "huggingface"})
    if tokenizer.eod != EOD_TOKEN_ID:
        raise ValueError(f"{tokenizer_dir}: end-of-document id is {tokenizer.eod}, expected {EOD_TOKEN_ID} (Qwen2.5)")
    return tokenizer


def build_pretrain_datasets(
    data_path: Sequence[str] | str,
    split: str,
    seq_length: int,
    tokenizer,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    seed: int = 1234,
    valid_data_path: Sequence[str] | str | None = None,
    cache_dir: str | Path | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
):
    """(train, valid, test) GPTDatasets; any may be None when it gets no data or no samples.

    `tokenizer` is a megatron.core tokenizer or a Hugging Face tokenizer folder. Items are megatron's dicts:
    tokens, labels, loss_mask, position_ids (no attention_mask: the model builds the causal mask).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if isinstance(tokenizer, (str, Path)):
        tokenizer = megatron_tokenizer(tokenizer)
    blend = parse_data_path(data_path)
    _check_prefixes(blend[0])
    if valid_data_path is not None:
        valid_blend = parse_data_path(valid_data_path)
        _check_prefixes(valid_blend[0])
        blends = {"blend_per_split": [blend, valid_blend, None]}
    else:
        blends = {"blend": blend, "split": split}
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        path_to_cache=str(cache_dir) if cache_dir is not None else None,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        **blends,
    )
    return BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, test_samples], lambda: True, config
    ).build()
