"""Reading a Megatron torch_dist checkpoint's model tensors without Megatron: its index, its saved arguments, and
global tensors (one decoder layer's slice of each stacked tensor at a time), whatever TP/PP saved them. A truncated
or corrupt file is named with what is wrong. Used by the convertor and the LoRA export."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_patch.checkpoint_state import DamagedCheckpoint, torch_dist_index
from megatron_patch.convert.mapping import stacked_key
from megatron_patch.errors import UserError

# torch_dist keys that are not model weights (optimizer state, RNG, rerun machine, common state).
NON_MODEL_PREFIXES = ("optimizer", "rng_state", "rerun_state_machine", "common_state")


def mcore_tensor_metadata(ckpt: Path) -> dict:
    """The model tensors' metadata, after checking that every .distcp file holding them is there and as long as
    the checkpoint's index says: a truncated copy or an interrupted save is named here, not deep inside
    torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = torch_dist_index(ckpt, holds=lambda key: not key.startswith(NON_MODEL_PREFIXES))
    except DamagedCheckpoint as problem:
        raise UserError(f"error: {problem}. The checkpoint is incomplete or corrupt (an interrupted save or copy): "
                        "convert an earlier iteration, or copy it again.") from None
    return {k: v for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and not k.startswith(NON_MODEL_PREFIXES)}



def checkpoint_args(ckpt: Path):
    """The Megatron arguments saved with the checkpoint (None where its common state has none)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load_common_state_dict(str(ckpt)).get("args")
    except CheckpointException as e:  # the files are there (checked first) but their bytes do not unpickle
        raise _corrupt_checkpoint(ckpt, "the common state (args, iteration)", e) from None
    except Exception:  # noqa: BLE001 -- args are a cross-check and RoPE's record; the shapes decide
        return None



def _corrupt_checkpoint(ckpt: Path, what: str, e: BaseException) -> UserError:
    """torch.distributed.checkpoint wraps each rank's failure in a CheckpointException: name the first one."""
    failures = list(getattr(e, "failures", {}).values())
    cause = failures[0][0] if failures and isinstance(failures[0], tuple) else failures[0] if failures else e
    detail = (str(cause).strip().splitlines() or [""])[0]
    return UserError(f"error: reading {what} from {ckpt} failed ({type(cause).__name__}: {detail}): a .distcp file "
                     "of this checkpoint is corrupt. Convert an earlier iteration, or copy the checkpoint again.")



def read_mcore_tensors(ckpt: Path, names: list[str], meta: dict) -> dict[str, torch.Tensor]:
    """Global (unsharded) tensors by Megatron name, whatever TP/PP saved them. Decoder layers are stored stacked,
    so only this layer's slice of each stacked tensor is requested: that much is read and held, no more."""
    from torch.distributed.checkpoint import FileSystemReader, load

    requests = {}
    for name in names:
        key, layer = stacked_key(name)
        info = meta[key]
        shape = tuple(info.size)
        offsets = (0,) * len(shape) if layer is None else (layer,) + (0,) * (len(shape) - 1)
        sizes = shape if layer is None else (1, *shape[1:])
        requests[key] = (offsets, torch.empty(sizes, dtype=info.properties.dtype))
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load({}, storage_reader=FileSystemReader(str(ckpt)), planner=_SliceLoadPlanner(requests), no_dist=True)
    except (Exception, CheckpointException) as e:  # sizes were checked: what fails now is the files' content
        raise _corrupt_checkpoint(ckpt, ", ".join(requests), e) from None
    out = {}
    for name in names:
        key, layer = stacked_key(name)
        out[name] = requests[key][1] if layer is None else requests[key][1][0]
    return out



def _slice_load_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SliceLoadPlanner(DefaultLoadPlanner):
        """Reads given slices (offsets + destination tensor) of checkpoint tensors; DCP maps each slice onto
        however many saved chunks (TP/PP shards, SwiGLU halves) it overlaps."""

        def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
            super().__init__()
            self.requests = requests

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, dest) in self.requests.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.requests[index.fqn][1]

    return SliceLoadPlanner



def _SliceLoadPlanner(requests):  # noqa: N802 -- a class, built lazily so torch.distributed loads on first use
    return _slice_load_planner_class()(requests)
