"""Small idxmaps for tests that need real dataset files: written by the package's own writer, or in the layout
of Pai-Megatron-Patch's SFT builder; and the check that a blend draws by its weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_idxmap(prefix: str | Path, documents: list[list[int]]) -> str:
    """A pre-training idxmap at `prefix` (.bin/.idx, stamped) holding `documents` as int32 token ids."""
    from megatron_patch.data.indexed_writer import atomic_indexed_writers

    with atomic_indexed_writers([(prefix, np.int32)]) as (writer,):
        for document in documents:
            writer.add_document([np.asarray(document, dtype=np.int32)])
    return str(prefix)


def write_sft_idxmap(prefix: str | Path, samples: list[tuple[list[int], list[int]]]) -> str:
    """An SFT idxmap pair at `prefix` (PREFIX_text_document + PREFIX_label_document): (tokens, answer mask) each."""
    from megatron_patch.data.indexed_writer import atomic_indexed_writers
    from megatron_patch.data.sft_preprocess import label_prefix, text_prefix

    with atomic_indexed_writers([(text_prefix(prefix), np.int32), (label_prefix(prefix), np.uint8)]) as writers:
        for tokens, mask in samples:
            writers[0].add_document([np.asarray(tokens, dtype=np.int32)])
            writers[1].add_document([np.asarray(mask, dtype=np.uint8)])
    return str(prefix)


def write_upstream_sft_idxmap(prefix: str | Path, items: list, tokenizer, seq_length: int, packing: bool = False,
                              end_markers: bool = True) -> str:
    """An SFT idxmap in the layout of Pai-Megatron-Patch's own build_idxmap_sft_dataset.py (written here from its
    documented behaviour, through megatron's builder as upstream does, so without our stamp): int32 rows of
    seq_length token ids (each sample's last stored as -1 - id; then padding) followed by seq_length labels
    (the next token where trained, from the assistant header on; -100 elsewhere). An item that is a list of
    alpaca records shares rows; packing=True puts every record in shared rows. end_markers=False gives the
    older layout, whose rows do not mark where samples end."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    def encode(messages: list[dict]) -> list[int]:
        return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]

    groups = [item if isinstance(item, list) else [item] for item in items]
    groups = [[record for group in groups for record in group]] if packing else groups
    rows = []
    for group in groups:
        tokens, labels = [], []
        for record in group:
            messages = [{"role": "user", "content": record["instruction"] + record["input"]},
                        {"role": "assistant", "content": record["output"]}]
            prompt, full = encode(messages[:1]), encode(messages)[:seq_length]
            target = [-100] * (len(prompt) - 1) + full[len(prompt):] + [-100]
            if end_markers:
                full[-1] = -1 - full[-1]
            if len(tokens) + len(full) > seq_length:
                rows.append((tokens, labels))
                tokens, labels = [], []
            tokens, labels = tokens + full, labels + target
        rows.append((tokens, labels))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for tokens, labels in rows:
        padding = seq_length - len(tokens)
        row = tokens + [tokenizer.pad_token_id] * padding + labels + [-100] * padding
        builder.add_document(np.asarray(row, dtype=np.int32), [len(row)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def assert_drawn_by_weight(dataset_index: np.ndarray, weights: list[float]) -> None:
    """Megatron's blending tolerance: after every draw, each dataset's count is within one of its share."""
    shares = np.asarray(weights) / sum(weights)
    drawn = np.cumsum(np.eye(len(weights), dtype=np.int64)[np.asarray(dataset_index)], axis=0)
    expected = np.arange(1, len(dataset_index) + 1)[:, None] * shares[None, :]
    assert np.abs(drawn - expected).max() <= 1.0, np.abs(drawn - expected).max()
