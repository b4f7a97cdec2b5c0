"""What the launch runs on: nodes, processes per node, GPUs, Transformer Engine. The launcher's one probe."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patch import hardware
from megatron_patch.errors import UserError
from megatron_patch.launch.positional import Launch, _int


@dataclass(frozen=True)
class Machine:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    has_gpu: bool
    has_te: bool
    has_flash_attn: bool = False
    gpu_capability: int = 0  # major*10 + minor of the GPUs (90: Hopper); 0 without a GPU

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def detect_machine(launch: Launch, environ: dict[str, str]) -> Machine:
    gpus = hardware.gpu_count()
    has_gpu = gpus > 0
    has_te = has_gpu and hardware.transformer_engine_importable()
    has_flash_attn = has_gpu and hardware.flash_attn_importable()
    gpu_capability = hardware.gpu_compute_capability()
    override = environ.get("MP_NPROC_PER_NODE")
    if launch.env == "dlc":
        missing = [k for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise UserError(
                f"error: ENV=dlc needs the scheduler's {', '.join(missing)} in the environment "
                "(WORLD_SIZE = number of nodes, RANK = this node's rank). For one machine use ENV=dsw."
            )
        per_node = override or environ.get("KUBERNETES_CONTAINER_RESOURCE_GPU")
        if not per_node:
            raise UserError("error: ENV=dlc needs KUBERNETES_CONTAINER_RESOURCE_GPU (GPUs per node).")
        return Machine(
            nnodes=_int("WORLD_SIZE", environ["WORLD_SIZE"], 1),
            node_rank=_int("RANK", environ["RANK"], 0),
            nproc_per_node=_int("GPUs per node", per_node, 1),
            master_addr=environ["MASTER_ADDR"],
            master_port=_int("MASTER_PORT", environ["MASTER_PORT"], 1),
            has_gpu=has_gpu,
            has_te=has_te,
            has_flash_attn=has_flash_attn,
            gpu_capability=gpu_capability,
        )
    if override:
        nproc = _int("MP_NPROC_PER_NODE", override, 1)
    elif has_gpu:
        nproc = gpus
    else:
        # On the CPU, start just enough processes for the requested model-parallel layout.
        nproc = launch.tp * launch.pp * launch.cp
    return Machine(1, 0, nproc, "localhost", hardware.free_port(), has_gpu, has_te, has_flash_attn, gpu_capability)


def packed_samples_need_masks(launch: Launch) -> str | None:
    """Why this launch's packed samples (MP_SFT_PACKING) train on the local spec, whose attention takes them as
    block masks, rather than as boundaries in TE's "thd" format (data/providers.py); None where TE can take them."""
    if not launch.sft_packing:
        return None
    if launch.cuda_graph:
        return "MP_CUDA_GRAPH=true (a replay refills the samples' boundaries in fixed-size buffers on the GPU, which " \
               "the local spec's attention takes; TE's thd boundaries are read on the host)"
    if launch.cp > 1:
        return f"CP={launch.cp} (TE's thd format needs every sample's length divisible by 2 x CP)"
    if launch.pp > 1 and launch.batch_size > 1:
        return "PP > 1 with BATCH_SIZE > 1 (thd puts a micro-batch's rows into one, not the activation shape " \
               "pipeline stages exchange)"
    if launch.precision == "fp32":
        return "PR=fp32 (TE's thd attention kernels take 16-bit inputs)"
    return None


def uses_te(launch: Launch, machine: Machine) -> bool:
    """The Transformer Engine spec: TE is here, and packed samples (if any) can go to its attention as thd."""
    return machine.has_te and packed_samples_need_masks(launch) is None
