"""A data path as one dataset or a Megatron blend, `W1 P1 W2 P2 ...`: each prefix drawn from in proportion to its
weight (Megatron's --data-path form; upstream passes DATASET_PATH unquoted to it, so a blend is one argument
with spaces). The launcher, the SFT datasets and the pre-training check read it here; no torch, no files.

A path is a blend when it has several words and one of them is a number: a single path may hold spaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_patch.errors import UserError

BLEND_FORM = "'W1 P1 W2 P2 ...' (a positive weight before each path)"


@dataclass(frozen=True)
class Blend:
    paths: tuple[str, ...]
    weights: tuple[float, ...] | None  # None: one dataset, no blend


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def split_data_path(text: str) -> list[str]:
    """The words of a data path as the user wrote it: a blend's words, or the path itself."""
    words = text.split()
    return words if len(words) > 1 and any(_number(w) is not None for w in words) else [text]


def read_blend(label: str, words: list[str]) -> Blend:
    """The Blend of a data path's words (split_data_path's, or Megatron's list argument); a UserError naming
    `label` when they are neither one path nor weight/path pairs with positive weights."""
    if len(words) == 1:
        return Blend((words[0],), None)
    given = " ".join(words)
    if not words or len(words) % 2:
        raise UserError(f"error: {label} '{given}' has {len(words)} words: neither one path nor a blend {BLEND_FORM}.")
    weights, paths = words[0::2], words[1::2]
    for i, (weight, path) in enumerate(zip(weights, paths)):
        value = _number(weight)
        if value is None or _number(path) is not None:
            word, position = (weight, 2 * i + 1) if value is None else (path, 2 * i + 2)
            raise UserError(f"error: {label} '{given}': word {position} '{word}' is out of place in a blend "
                            f"{BLEND_FORM}.")
        problem = weight_problem(label, value, path, weight)
        if problem:
            raise UserError(f"error: {problem}")
    return Blend(tuple(paths), tuple(float(w) for w in weights))


def weight_problem(label: str, weight: float, path: str, as_given: str | None = None) -> str | None:
    """Why a blend weight cannot be used (it must be a positive number), or None."""
    if math.isfinite(weight) and weight > 0:
        return None
    return (f"{label}: the weight '{as_given or f'{weight:g}'}' of {path} must be a positive number; a blend is "
            f"{BLEND_FORM}.")


def data_path_problem(label: str, text: str) -> tuple[Blend | None, str | None]:
    """(the blend, None) or (None, what is wrong, without "error: "), for the launcher's list of problems."""
    try:
        return read_blend(label, split_data_path(text)), None
    except UserError as e:
        return None, str(e).removeprefix("error: ")
