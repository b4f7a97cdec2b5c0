"""Streaming Hugging Face safetensors I/O: read one tensor at a time, write shards as they fill."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_patch.errors import UserError
from megatron_patch.hf_checkpoint import INDEX_FILE, SINGLE_FILE


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class HFCheckpointReader:
    """The tensors of a HF checkpoint folder (single model.safetensors or a sharded index), read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._file_of = {name: self.folder / f for name, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"error: {index} is not a safetensors index ({type(e).__name__}: {e}); restore it "
                                "from the original download, or re-save the model with save_pretrained().") from None
        elif (self.folder / SINGLE_FILE).is_file():
            self._file_of = dict.fromkeys(shard_tensor_names(self.folder / SINGLE_FILE), self.folder / SINGLE_FILE)
        else:
            raise UserError(
                f"error: no HF weights in {self.folder}: expected {SINGLE_FILE} or {INDEX_FILE} (only safetensors is "
                "read; re-save a .bin checkpoint with save_pretrained(safe_serialization=True))."
            )
        missing_files = sorted({str(p) for p in self._file_of.values() if not p.is_file()})
        if missing_files:
            raise UserError(f"error: {INDEX_FILE} in {self.folder} lists shard files that are missing: "
                            + ", ".join(missing_files) + ". The download or copy is incomplete: fetch them again.")
        for shard in sorted(set(self._file_of.values())):
            listed = {name for name, f in self._file_of.items() if f == shard}
            absent = listed - set(shard_tensor_names(shard))
            if absent:
                raise UserError(f"error: {index} places {len(absent)} tensors in {shard}, which does not hold them "
                                f"(e.g. {min(absent)}): the shard and the index come from different saves.")

    def names(self) -> list[str]:
        return list(self._file_of)

    def _open(self, name: str):
        from safetensors import safe_open

        return safe_open(self._file_of[name], framework="pt")

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        # One open per tensor: the file's mapping is dropped right after, so memory holds only this tensor's copy
        # (headers are small; reopening costs next to nothing next to the read).
        with self._open(name) as f:
            return f.get_tensor(name)

    def get_part(self, name: str, dim: int, index: int, parts: int) -> torch.Tensor:
        """Part `index` of `parts` equal parts of a tensor along `dim`: only that part's bytes are read."""
        if parts == 1:
            return self.get(name)
        with self._open(name) as f:
            whole = f.get_slice(name)
            step = whole.get_shape()[dim] // parts
            return whole[(slice(None),) * dim + (slice(index * step, (index + 1) * step),)]


class HFShardWriter:
    """Writes tensors to safetensors shards of at most `max_shard_bytes`, flushing each as it fills, then
    `model.safetensors.index.json` (the HF layout `from_pretrained` reads)."""

    def __init__(self, folder: str | Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # A copy of its own: safetensors refuses views sharing storage (e.g. q/k/v split from one qkv tensor).
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._pending, self.folder / f"shard-{len(self._shards):05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush the last shard, give shards their final names, write the index; returns the shard names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map, files = {}, []
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / final)
            os.chmod(self.folder / final, 0o666 & ~_umask())  # safetensors creates files owner-only
            files.append(final)
            weight_map |= {name: final for name in names}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files


def shard_tensor_names(path: Path) -> list[str]:
    """The tensor names of one safetensors file; a truncated or corrupt file is a UserError naming it.

    safetensors checks at open that the header parses and that the file is long enough for every tensor in it,
    so this catches truncation without reading any tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise UserError(f"error: {path} ({path.stat().st_size} bytes) is not a readable safetensors file: {e}. "
                        "It is probably truncated or corrupt (an interrupted download or copy): fetch it again.") from None
