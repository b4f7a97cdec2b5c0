"""Small idxmaps written by the package's own writer, for tests that need real dataset files but no tokenizer."""

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
