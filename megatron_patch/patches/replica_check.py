"""--check-weight-hash-across-dp-replicas-interval across every rank that holds the same replica.

Context-parallel ranks hold the same weights as each other (they split the sequence, and their gradients are
all-reduced over data x context parallel), but megatron-core 0.19.2's check_param_hashes_across_dp_replicas
compares each parameter's hash over the data-parallel group alone: CP replicas that drifted apart would train on
silently. This check all-gathers the hashes over data x context parallel (expert parameters: over their expert
data-parallel group, as megatron-core does), names the parameters that differ, and, with --replica-digests-dir,
writes each rank's hashes to DIR/rank<N>.jsonl (one line per check) for a test to compare from outside.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

_checks_done = {"count": 0}


def parameter_digests(model) -> list[tuple[str, torch.nn.Parameter, str]]:
    """(name, parameter, SHA-1 of its values as fp32) for every parameter of every model chunk."""
    found = []
    for index, chunk in enumerate(model):
        for name, param in chunk.named_parameters():
            values = param.detach().to("cpu", torch.float32).contiguous().numpy()
            found.append((f"{index}.{name}" if len(model) > 1 else name, param, hashlib.sha1(values).hexdigest()))
    return found


def _differing(names: list[str], local: torch.Tensor, gathered: list[torch.Tensor], cross_check: bool) -> list[str]:
    """Names whose hash differs from the first replica's (or, with cross_check, from any replica's)."""
    others = gathered if cross_check else gathered[:1]
    return [name for row, name in enumerate(names) if any(not torch.equal(local[row], g[row]) for g in others)]


def check_param_hashes_across_replicas(model, cross_check: bool = False, digests_dir: str | None = None) -> bool:
    """megatron-core's check_param_hashes_across_dp_replicas, over data x context parallel: True when every
    parameter's hash equals its replicas'. With `digests_dir`, this rank's hashes are appended to its file."""
    from megatron.core import parallel_state

    digests = parameter_digests(model)
    matching = True
    for dense in (True, False):
        chosen = [(name, digest) for name, param, digest in digests if getattr(param, "allreduce", True) == dense]
        if not chosen:
            continue
        group = (parallel_state.get_data_parallel_group(with_context_parallel=True) if dense
                 else parallel_state.get_expert_data_parallel_group())
        local = torch.tensor([list(bytes.fromhex(digest)) for _, digest in chosen], dtype=torch.uint8,
                             device="cuda" if torch.cuda.is_available() else "cpu")  # NCCL gathers device tensors
        gathered = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(gathered, local, group=group)
        differ = _differing([name for name, _ in chosen], local, gathered, cross_check)
        if differ:
            matching = False
            print(f"rank {torch.distributed.get_rank()}: {len(differ)} parameter(s) differ from their replicas on "
                  f"other data- or context-parallel ranks: {', '.join(differ[:8])}", file=sys.stderr, flush=True)
    check = _checks_done["count"]
    _checks_done["count"] += 1
    if digests_dir:
        _write_digests(digests_dir, check, {name: digest for name, _, digest in digests})
    return matching


def _write_digests(folder: str, check: int, digests: dict[str, str]) -> None:
    from megatron.core import parallel_state

    rank = torch.distributed.get_rank()
    layout = {"tp": parallel_state.get_tensor_model_parallel_rank(),
              "pp": parallel_state.get_pipeline_model_parallel_rank(),
              "cp": parallel_state.get_context_parallel_rank(), "dp": parallel_state.get_data_parallel_rank()}
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a", encoding="utf-8") as out:
        out.write(json.dumps({"check": check, "rank": rank, **layout, "digests": digests}) + "\n")


def install() -> None:
    import megatron.training.training as training
    from megatron.training import get_args

    def check_param_hashes_across_dp_replicas(model, cross_check: bool = False) -> bool:
        return check_param_hashes_across_replicas(model, cross_check, get_args().replica_digests_dir)

    training.check_param_hashes_across_dp_replicas = check_param_hashes_across_dp_replicas
