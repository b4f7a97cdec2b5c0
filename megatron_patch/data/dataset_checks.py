"""Whether a dataset path can be trained on: `dataset_problem(label, path, kind)`, the one check of every path.

Each problem gets one message written for the user: what is wrong, which file, which toolkit script writes it.
The launcher asks before torchrun; the datasets ask again before they open files (the entrypoint may be run
directly, or a file replaced since). Cheap: no torch or megatron import, ~130 KiB read per idxmap (see
idxmap_stamp for what ties a .bin to its .idx).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_patch.data.idxmap_stamp import (
    INT32_CODE,
    IndexDamaged,
    IndexFacts,
    bin_digest,
    read_index_facts,
    read_sequence_lengths,
)
from megatron_patch.data.records import first_non_space_chars
from megatron_patch.errors import UserError

PRETRAIN_TOOL = "toolkits/pretrain_data_preprocessing/preprocess_data.py"
SFT_TOOL = "toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py"
SFT_SCRIPT = "toolkits/sft_data_preprocessing/run_build_idxmap_sft_dataset.sh"
KINDS = ("pretrain", "sft", "raw")
TEXT_DOCUMENT = "_text_document"
SAMPLED_ROWS = 4096  # rows whose lengths the cheap layout check reads, at each end of an upstream SFT idxmap


def dataset_problem(label: str, path: str | Path, kind: str) -> str | None:
    """What is wrong with `path` (passed as `label`, e.g. DATASET_PATH) as a dataset of `kind`, or None.

    kind "pretrain": an idxmap prefix (PREFIX.bin + PREFIX.idx); "sft": an SFT idxmap (see locate_sft_idxmap);
    "raw": a JSON array or JSONL file of SFT records. The message has no leading "error: ", so callers can list
    several.
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


@dataclass(frozen=True)
class SFTIdxmapFiles:
    """Where an SFT data path's files are. layout "pair": ours, PREFIX_text_document + PREFIX_label_document (the
    path given as PREFIX, or as PREFIX_text_document the way upstream names SFT data); "upstream": one idxmap at
    PREFIX in the layout of Pai-Megatron-Patch's own builder (upstream_sft_idxmap reads it)."""

    layout: str
    prefix: str


def locate_sft_idxmap(path: str | Path) -> SFTIdxmapFiles:
    """Which files an SFT data path means. Pure file tests; a path that fits nothing is a pair with files missing."""
    path = str(path)
    if _pair_begun(path):
        return SFTIdxmapFiles("pair", path)
    if path.endswith(TEXT_DOCUMENT) and _pair_begun(path[: -len(TEXT_DOCUMENT)]):
        return SFTIdxmapFiles("pair", path[: -len(TEXT_DOCUMENT)])
    for single in (path, path + TEXT_DOCUMENT):
        if not _missing_files([single]):
            return SFTIdxmapFiles("upstream", single)
    return SFTIdxmapFiles("pair", path)


def _pair_begun(prefix: str) -> bool:
    """Any trace of our pair at `prefix`: its label idxmap, meta file or a writer's leftovers."""
    labels = Path(f"{prefix}_label_document")
    return (any(Path(f"{labels}{ext}").exists() for ext in (".bin", ".idx")) or Path(f"{prefix}_sft_meta.json").exists()
            or any(labels.parent.glob(f"{glob.escape(labels.name)}.tmp-*")))


def _sft_idxmap_problem(label: str, path: str) -> str | None:
    found = locate_sft_idxmap(path)
    if found.layout == "upstream":
        return _upstream_sft_problem(label, path, found.prefix)
    prefix = found.prefix
    text, labels = f"{prefix}{TEXT_DOCUMENT}", f"{prefix}_label_document"
    missing = _missing_files([text, labels])
    if missing:
        return (f"{label} {prefix} is not an SFT idxmap prefix: missing {', '.join(missing)}"
                f"{_cut_short_note([text, labels])}. Pass the "
                f"--output-prefix given to {SFT_TOOL} (or that prefix + _text_document); for a JSON file set "
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


def _upstream_sft_problem(label: str, path: str, prefix: str) -> str | None:
    """A single idxmap given as SFT data: fine if it looks like Pai-Megatron-Patch's SFT layout (rows of token
    ids ++ labels; the reader checks every row); the cheap signs read here are those of the header and the
    lengths of the first and last rows."""
    facts, problem = _idxmap_problem(label, prefix, SFT_SCRIPT)
    if problem is not None:
        return problem
    why = _not_upstream_sft_layout(prefix, facts)
    if why is None:
        return None
    return (f"{label} {path} is not an SFT idxmap: {prefix}.bin/.idx is one idxmap {why}, neither the pair "
            f"{SFT_TOOL} writes (text and answer mask) nor the layout of Pai-Megatron-Patch's SFT builder. Build SFT "
            f"data from the JSON records with {SFT_SCRIPT}; a pre-training idxmap trains with SFT=false.")


def _not_upstream_sft_layout(prefix: str, facts: IndexFacts) -> str | None:
    """Why an idxmap cannot be Pai-Megatron-Patch's SFT layout (one int32 row of 2 x its seq length per
    document), or None."""
    if facts.stamp is not None:
        return "written by this toolkit (pre-training data, or an SFT pair's text without its _label_document)"
    if facts.dtype_code != INT32_CODE:
        return "whose token ids are not int32"
    if facts.documents != facts.sequences:
        return "whose documents hold several sequences"
    count = min(SAMPLED_ROWS, facts.sequences)
    lengths = set(read_sequence_lengths(f"{prefix}.idx", 0, count))
    lengths |= set(read_sequence_lengths(f"{prefix}.idx", facts.sequences - count, count))
    if len(lengths) > 1:
        a, b = sorted(lengths)[:2]
        return f"whose rows differ in length ({a:,} and {b:,} tokens)"
    if lengths.pop() % 2:
        return "of rows of an odd length"
    return None


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
