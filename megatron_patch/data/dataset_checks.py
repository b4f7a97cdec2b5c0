"""Whether a dataset path can be trained on: `dataset_problem(label, path, kind)`, the one check of every path.

Each problem gets one message written for the user: what is wrong, which file, which toolkit script writes it.
The launcher asks before torchrun; the datasets ask again before they open files (the entrypoint may be run
directly, or a file replaced since). Cheap: no torch or megatron import, ~130 KiB read per idxmap (see
idxmap_stamp for what ties a .bin to its .idx).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from megatron_patch.data.idxmap_stamp import IndexDamaged, IndexFacts, bin_digest, read_index_facts
from megatron_patch.data.records import first_non_space_chars
from megatron_patch.errors import UserError

PRETRAIN_TOOL = "toolkits/pretrain_data_preprocessing/preprocess_data.py"
SFT_TOOL = "toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py"
KINDS = ("pretrain", "sft", "raw")


def dataset_problem(label: str, path: str | Path, kind: str) -> str | None:
    """What is wrong with `path` (passed as `label`, e.g. DATASET_PATH) as a dataset of `kind`, or None.

    kind "pretrain": an idxmap prefix (PREFIX.bin + PREFIX.idx); "sft": an SFT idxmap prefix
    (PREFIX_text_document and PREFIX_label_document, .bin + .idx each); "raw": a JSON array or JSONL file of SFT
    records. The message has no leading "error: ", so callers can list several.
    """
    if kind == "pretrain":
        return _pretrain_idxmap_problem(label, str(path))
    if kind == "sft":
        return _sft_idxmap_problem(label, str(path))
    if kind == "raw":
        return _raw_json_problem(label, str(path))
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def check_dataset(label: str, path: str | Path, kind: str) -> None:
    """Raise UserError with dataset_problem's message, if there is one."""
    problem = dataset_problem(label, path, kind)
    if problem is not None:
        raise UserError(f"error: {problem}")


def _missing_files(prefixes: list[str]) -> list[str]:
    return [f"{prefix}{ext}" for prefix in prefixes for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]


def _cut_short_note(prefixes: list[str]) -> str:
    """Temporary files beside a missing file: a preprocessing run died while writing or replacing it."""
    leftovers = sorted(str(p) for prefix in prefixes
                       for p in Path(prefix).parent.glob(f"{glob.escape(Path(prefix).name)}.tmp-*"))
    return f" ({leftovers[0]} is left from a preprocessing run that was cut short)" if leftovers else ""


def _pretrain_idxmap_problem(label: str, prefix: str) -> str | None:
    missing = _missing_files([prefix])
    if missing:
        hint = ""
        if not _missing_files([f"{prefix}_text_document"]):
            hint = f" (it adds _text_document to its --output-prefix: pass {prefix}_text_document)"
        return (f"{label} {prefix} is not an idxmap dataset prefix: missing {', '.join(missing)}"
                f"{_cut_short_note([prefix])}. Pass the prefix "
                f"without .bin/.idx, as written by {PRETRAIN_TOOL}{hint}; SFT=true reads a JSON file with "
                "MP_DATASET_TYPE=raw.")
    return _idxmap_problem(label, prefix, PRETRAIN_TOOL)[1]


def _sft_idxmap_problem(label: str, prefix: str) -> str | None:
    text, labels = f"{prefix}_text_document", f"{prefix}_label_document"
    missing = _missing_files([text, labels])
    if missing:
        return (f"{label} {prefix} is not an SFT idxmap prefix: missing {', '.join(missing)}"
                f"{_cut_short_note([text, labels])}. Pass the "
                f"--output-prefix given to {SFT_TOOL} (without _text_document); for a JSON file set "
                "MP_DATASET_TYPE=raw.")
    text_facts, problem = _idxmap_problem(label, text, SFT_TOOL)
    if problem is None:
        label_facts, problem = _idxmap_problem(label, labels, SFT_TOOL)
    if problem is not None:
        return problem
    text_stamp, label_stamp = text_facts.stamp, label_facts.stamp
    if (text_facts.sequences, text_facts.documents) != (label_facts.sequences, label_facts.documents):
        why = f"{text_facts.sequences:,} vs {label_facts.sequences:,} samples"
    elif (text_stamp is None) != (label_stamp is None) or (text_stamp and text_stamp.pair_id != label_stamp.pair_id):
        why = "they come from different preprocessing runs"
    else:
        return None
    return (f"{label}: {text}.idx and {labels}.idx were not written together ({why}): one was replaced without "
            f"the other. Write the pair again with {SFT_TOOL}.")


def _idxmap_problem(label: str, prefix: str, tool: str) -> tuple[IndexFacts | None, str | None]:
    """(what the .idx says, the problem) for one idxmap whose two files exist."""
    idx, data = f"{prefix}.idx", f"{prefix}.bin"
    try:
        facts = read_index_facts(idx)
    except IndexDamaged as e:
        return None, f"{label}: {idx} is not a whole Megatron index ({e}). Write {prefix}.bin/.idx again with {tool}."
    bin_size = os.path.getsize(data)
    if facts.documents == 0 or bin_size == 0:
        return facts, (f"{label} {prefix} holds no documents ({idx} lists {facts.documents}, {data} has {bin_size} "
                       f"bytes): there is nothing to train on. Run {tool} again on inputs that have text.")
    if bin_size != facts.data_bytes:
        why = f"the .idx indexes {facts.data_bytes:,} bytes, the .bin has {bin_size:,}"
    elif facts.stamp is not None and bin_digest(data) != facts.stamp.bin_digest:
        why = "the .bin's contents are not those the .idx was written for"
    else:
        return facts, None
    return facts, (f"{label}: {data} and {idx} are not one pair ({why}): the .bin was replaced without its .idx "
                   f"(a replacement cut short, or one file copied over). Write both again with {tool}.")


def _raw_json_problem(label: str, path: str) -> str | None:
    if not Path(path).is_file():
        return f"{label} {path} is not a file; MP_DATASET_TYPE=raw reads a JSON/JSONL file."
    start = first_non_space_chars(path, 2)
    if start in ("", "[]"):
        return (f"{label} {path} holds no records ({'an empty JSON array' if start else 'the file is empty'}). "
                "MP_DATASET_TYPE=raw reads SFT records from a JSON array or a JSONL file (one object per line).")
    if start[0] not in "[{":
        return (f"{label} {path} starts with {start[0]!r}, not '[' or '{{': MP_DATASET_TYPE=raw reads SFT records "
                "from a JSON array or a JSONL file (one object per line).")
    return None
