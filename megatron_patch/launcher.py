"""run_mcore_qwen.sh's logic: the 25 positional arguments of the upstream best practice, validated and
mapped onto megatron-core 0.19.2 flags, then one torchrun.

    sh examples/qwen2_5/run_mcore_qwen.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN \
        PR TP PP CP SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH \
        PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH

Environment knobs: MP_DATASET_TYPE (idxmap|raw), MP_AC_LAYERS (layers to recompute/offload, default 1),
MP_VP (virtual pipeline stages), MP_SFT_PACKING (true|false), MP_FUSED_KERNELS (true|false, default true: our
fused RMSNorm/RoPE without TE and the chunked linear + cross-entropy; false: megatron-core's plain path),
MP_CUDA_GRAPH (true|false, default false: capture each training iteration's forward and backward in one CUDA graph,
which removes the host's kernel-launch time; GPU, PP=1),
MP_DRY_RUN=1 (print the command, run nothing), MP_TOKENIZER_PATH (tokenizer folder when the checkpoint has none),
MP_NPROC_PER_NODE (processes per node, overriding the GPU count). ENV=dlc reads WORLD_SIZE (nodes), RANK (node rank), MASTER_ADDR, MASTER_PORT and
KUBERNETES_CONTAINER_RESOURCE_GPU (GPUs per node) from the scheduler.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.model_sizes import QWEN2_5_SIZES, Qwen25Size, hf_config_mismatches

REPO_ROOT = Path(__file__).resolve().parents[1]

POSITIONAL = (
    "ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP SP DO FL SFT AC "
    "OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH "
    "TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH"
).split()

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
AC_MODES = ("sel", "full", "offload", "false")
OPTIMIZER_OFFLOAD_MODES = ("false", "static", "auto")


class LaunchError(SystemExit):
    """A user error found before torchrun starts: one message, exit status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


@dataclass
class Machine:
    """What the launch runs on: nodes, processes per node, GPUs, Transformer Engine."""

    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    has_gpu: bool
    has_te: bool
    has_flash_attn: bool = False

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclass
class Launch:
    env: str
    model_size: str
    batch_size: int
    global_batch_size: int
    lr: float
    min_lr: float
    seq_len: int
    pad_len: int
    precision: str
    tp: int
    pp: int
    cp: int
    sp: bool
    distributed_optimizer: bool
    flash_attention: bool
    sft: bool
    activation_checkpointing: str
    optimizer_offload: str
    save_interval: int
    dataset_path: str
    valid_dataset_path: str
    pretrain_checkpoint: str | None
    train_tokens_or_iters: int
    warmup_tokens_or_iters: int
    output_basepath: Path
    # environment knobs
    dataset_type: str = "idxmap"
    ac_layers: int = 1
    virtual_pipeline: int | None = None
    sft_packing: bool = False
    fused_kernels: bool = True
    cuda_graph: bool = False
    tokenizer_path: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # suggestions, not problems

    @property
    def size(self) -> Qwen25Size:
        return QWEN2_5_SIZES[self.model_size]

    @property
    def train_iters(self) -> int:
        """SFT budgets are iterations; pre-training budgets are tokens (upstream semantics)."""
        if self.sft:
            return self.train_tokens_or_iters
        return self.train_tokens_or_iters // self.global_batch_size // self.seq_len

    @property
    def warmup_iters(self) -> int:
        if self.sft:
            return self.warmup_tokens_or_iters
        return self.warmup_tokens_or_iters // self.global_batch_size // self.seq_len

    @property
    def run_name(self) -> str:
        """Encodes the settings, so runs with different settings never share a checkpoint folder."""
        kind = "finetune" if self.sft else "pretrain"
        parts = [
            f"mcore-qwen2.5-{self.model_size}-{kind}", f"lr-{self.lr:g}", f"minlr-{self.min_lr:g}",
            f"bs-{self.batch_size}", f"gbs-{self.global_batch_size}", f"seqlen-{self.seq_len}",
            f"pr-{self.precision}", f"tp-{self.tp}", f"pp-{self.pp}", f"cp-{self.cp}",
            f"ac-{self.activation_checkpointing}", f"do-{str(self.distributed_optimizer).lower()}",
            f"sp-{str(self.sp and self.tp > 1).lower()}", f"ti-{self.train_iters}", f"wi-{self.warmup_iters}",
        ]
        if self.sft:
            parts.append(f"data-{self.dataset_type}" + ("-packed" if self.sft_packing else ""))
        return "-".join(parts)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_basepath / "checkpoint" / self.run_name


def _bool(name: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise LaunchError(f"error: {name} must be true or false, got '{value}'.")


def _int(name: str, value: str, minimum: int = 0) -> int:
    try:
        number = int(float(value)) if "e" in value.lower() else int(value)
    except ValueError:
        raise LaunchError(f"error: {name} must be a whole number, got '{value}'.") from None
    if number < minimum:
        raise LaunchError(f"error: {name} must be at least {minimum}, got {number}.")
    return number


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LaunchError(f"error: {name} must be a number such as 1e-5, got '{value}'.") from None


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise LaunchError(f"error: {name} must be one of {', '.join(choices)}; got '{value}'.")
    return value


def parse(argv: list[str], environ: dict[str, str]) -> Launch:
    if len(argv) != len(POSITIONAL):
        given = len(argv)
        missing = " ".join(POSITIONAL[given:]) if given < len(POSITIONAL) else ""
        raise LaunchError(
            f"error: run_mcore_qwen.sh takes {len(POSITIONAL)} arguments, got {given}."
            + (f" Missing: {missing}." if missing else " Remove the extra ones.")
            + f"\nusage: run_mcore_qwen.sh {' '.join(POSITIONAL)}"
        )
    a = dict(zip(POSITIONAL, argv))
    if a["MODEL_SIZE"] not in QWEN2_5_SIZES:
        raise LaunchError(f"error: MODEL_SIZE must be one of {', '.join(QWEN2_5_SIZES)}; got '{a['MODEL_SIZE']}'.")
    vp = environ.get("MP_VP", "").strip()
    ckpt = a["PRETRAIN_CHECKPOINT_PATH"]
    return Launch(
        env=_choice("ENV", a["ENV"], ("dsw", "dlc")),
        model_size=a["MODEL_SIZE"],
        batch_size=_int("BATCH_SIZE", a["BATCH_SIZE"], 1),
        global_batch_size=_int("GLOBAL_BATCH_SIZE", a["GLOBAL_BATCH_SIZE"], 1),
        lr=_float("LR", a["LR"]),
        min_lr=_float("MIN_LR", a["MIN_LR"]),
        seq_len=_int("SEQ_LEN", a["SEQ_LEN"], 1),
        pad_len=_int("PAD_LEN", a["PAD_LEN"], 1),
        precision=_choice("PR", a["PR"], PRECISIONS),
        tp=_int("TP", a["TP"], 1),
        pp=_int("PP", a["PP"], 1),
        cp=_int("CP", a["CP"], 1),
        sp=_bool("SP", a["SP"]),
        distributed_optimizer=_bool("DO", a["DO"]),
        flash_attention=_bool("FL", a["FL"]),
        sft=_bool("SFT", a["SFT"]),
        activation_checkpointing=_choice("AC", a["AC"], AC_MODES),
        optimizer_offload=_choice("OPTIMIZER_OFFLOAD", a["OPTIMIZER_OFFLOAD"], OPTIMIZER_OFFLOAD_MODES),
        save_interval=_int("SAVE_INTERVAL", a["SAVE_INTERVAL"], 1),
        dataset_path=a["DATASET_PATH"],
        valid_dataset_path=a["VALID_DATASET_PATH"],
        pretrain_checkpoint=None if ckpt.lower() == "none" else ckpt,
        train_tokens_or_iters=_int("TRAIN_TOKENS_OR_ITERS", a["TRAIN_TOKENS_OR_ITERS"], 1),
        warmup_tokens_or_iters=_int("WARMUP_TOKENS_OR_ITERS", a["WARMUP_TOKENS_OR_ITERS"], 0),
        output_basepath=Path(a["OUTPUT_BASEPATH"]).absolute(),
        dataset_type=_choice("MP_DATASET_TYPE", environ.get("MP_DATASET_TYPE", "idxmap") or "idxmap",
                             ("idxmap", "raw")),
        ac_layers=_int("MP_AC_LAYERS", environ.get("MP_AC_LAYERS", "1") or "1", 1),
        virtual_pipeline=_int("MP_VP", vp, 1) if vp else None,
        sft_packing=_bool("MP_SFT_PACKING", environ.get("MP_SFT_PACKING", "false") or "false"),
        fused_kernels=_bool("MP_FUSED_KERNELS", environ.get("MP_FUSED_KERNELS", "true") or "true"),
        cuda_graph=_bool("MP_CUDA_GRAPH", environ.get("MP_CUDA_GRAPH", "false") or "false"),
        tokenizer_path=environ.get("MP_TOKENIZER_PATH") or None,
    )


def detect_machine(launch: Launch, environ: dict[str, str]) -> Machine:
    gpus = _gpu_count()
    has_gpu = gpus > 0
    has_te = has_gpu and importlib.util.find_spec("transformer_engine") is not None
    has_flash_attn = has_gpu and flash_attn_importable()
    override = environ.get("MP_NPROC_PER_NODE")
    if launch.env == "dlc":
        missing = [k for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise LaunchError(
                f"error: ENV=dlc needs the scheduler's {', '.join(missing)} in the environment "
                "(WORLD_SIZE = number of nodes, RANK = this node's rank). For one machine use ENV=dsw."
            )
        per_node = override or environ.get("KUBERNETES_CONTAINER_RESOURCE_GPU")
        if not per_node:
            raise LaunchError("error: ENV=dlc needs KUBERNETES_CONTAINER_RESOURCE_GPU (GPUs per node).")
        return Machine(
            nnodes=_int("WORLD_SIZE", environ["WORLD_SIZE"], 1),
            node_rank=_int("RANK", environ["RANK"], 0),
            nproc_per_node=_int("GPUs per node", per_node, 1),
            master_addr=environ["MASTER_ADDR"],
            master_port=_int("MASTER_PORT", environ["MASTER_PORT"], 1),
            has_gpu=has_gpu,
            has_te=has_te,
            has_flash_attn=has_flash_attn,
        )
    if override:
        nproc = _int("MP_NPROC_PER_NODE", override, 1)
    elif has_gpu:
        nproc = gpus
    else:
        # On the CPU, start just enough processes for the requested model-parallel layout.
        nproc = launch.tp * launch.pp * launch.cp
    return Machine(1, 0, nproc, "localhost", free_port(), has_gpu, has_te, has_flash_attn)


def flash_attn_importable() -> bool:
    """TE's flash backend takes flash-attn 2 (flash_attn) or 3 (flash_attn_3 / flash_attn_interface)."""
    return any(importlib.util.find_spec(name) is not None
               for name in ("flash_attn", "flash_attn_3", "flash_attn_interface"))


def nvidia_driver_present() -> bool:
    """An NVIDIA driver's traces (/dev/dxg: WSL's GPU). Without them there is no GPU for torch to count."""
    return (Path("/proc/driver/nvidia").exists() or Path("/dev/dxg").exists()
            or any(Path("/dev").glob("nvidia[0-9]*")))


def _gpu_count() -> int:
    if not nvidia_driver_present():
        return 0  # skips torch's import: 2 s on every launch and dry run of a CPU machine
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def free_port() -> int:
    """A TCP port nothing listens on now, for a rendezvous on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset_files_missing(prefix: str) -> list[str]:
    return [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]


def _sft_dataset_files_missing(prefix: str) -> list[str]:
    """build_idxmap_sft_dataset.py writes a token and an answer-mask idxmap under one prefix."""
    return _dataset_files_missing(f"{prefix}_text_document") + _dataset_files_missing(f"{prefix}_label_document")


def _checkpoint_config(path: Path) -> dict | None:
    config = path / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def validate(launch: Launch, machine: Machine) -> None:
    """Every check that can fail before torchrun, each with its own message."""
    size = launch.size
    if launch.flash_attention and uses_te(launch, machine) and not machine.has_flash_attn:
        # TE's flash backend is flash-attn's kernels; without them TE stops at the first attention call.
        raise LaunchError("error: FL=true asks Transformer Engine for flash-attn's attention kernels, but the "
                          "flash_attn package is not installed. Install it (pip install flash-attn "
                          "--no-build-isolation), or set FL=false for TE's cuDNN fused attention.")
    if launch.sft_packing and machine.has_te:
        # Packed samples need block masks; the TE attention configured here is causal only and would let them
        # attend to each other. The local spec's SDPA attention takes the masks.
        if launch.precision == "fp8" or launch.activation_checkpointing == "offload":
            raise LaunchError("error: MP_SFT_PACKING=true trains on megatron-core's local spec (packed samples need "
                              "block attention masks), but PR=fp8 and AC=offload need the Transformer Engine spec. "
                              "Turn packing off, or use PR=bf16 with AC=sel/full/false.")
        launch.warnings.append("MP_SFT_PACKING=true: training on the local spec, whose attention keeps packed "
                               "samples apart (variable-length flash kernel on the GPU, block masks elsewhere).")
    if launch.precision == "fp8" and not machine.has_te:
        raise LaunchError("error: PR=fp8 needs Transformer Engine on a GPU, and it is not importable here. "
                          "Use PR=bf16, or run in the NGC PyTorch image (see the Dockerfile).")
    if launch.activation_checkpointing == "offload" and not machine.has_te:
        raise LaunchError("error: AC=offload uses Transformer Engine's CPU offload, which is not importable here. "
                          "Use AC=sel or AC=full, or run in the NGC PyTorch image.")
    graph_obstacle = _cuda_graph_obstacle(launch, machine)
    if launch.cuda_graph and graph_obstacle:
        raise LaunchError(f"error: MP_CUDA_GRAPH=true, but {graph_obstacle}. Unset MP_CUDA_GRAPH (or set it to "
                          "false).")
    if launch.sft and not launch.cuda_graph and not graph_obstacle:
        launch.notes.append("SFT steps at small micro-batches wait on the host's kernel launches; MP_CUDA_GRAPH=true "
                            "replays each iteration from one CUDA graph (the guide's SFT command: 81 instead of "
                            "1,160 ms per iteration on one H200, docs/benchmarks.md).")
    model_parallel = launch.tp * launch.pp * launch.cp
    if machine.world_size % model_parallel:
        raise LaunchError(f"error: TP*PP*CP = {launch.tp}*{launch.pp}*{launch.cp} = {model_parallel} does not divide "
                          f"the {machine.world_size} processes ({machine.nnodes} node(s) x {machine.nproc_per_node}).")
    if size.num_attention_heads % launch.tp or size.num_query_groups % launch.tp:
        raise LaunchError(f"error: TP={launch.tp} must divide Qwen2.5-{launch.model_size}'s {size.num_attention_heads} "
                          f"attention heads and {size.num_query_groups} key/value heads. Choose TP from "
                          f"{[t for t in range(1, size.num_query_groups + 1) if size.num_query_groups % t == 0]}.")
    if size.num_layers % launch.pp:
        raise LaunchError(f"error: PP={launch.pp} must divide Qwen2.5-{launch.model_size}'s {size.num_layers} layers.")
    if launch.virtual_pipeline is not None:
        if launch.pp < 2:
            raise LaunchError("error: MP_VP (virtual pipeline stages) needs PP >= 2.")
        if size.num_layers % (launch.pp * launch.virtual_pipeline):
            raise LaunchError(f"error: PP*MP_VP = {launch.pp * launch.virtual_pipeline} must divide the "
                              f"{size.num_layers} layers of Qwen2.5-{launch.model_size}.")
    layers_per_stage = size.num_layers // launch.pp // (launch.virtual_pipeline or 1)
    if launch.activation_checkpointing == "full" and layers_per_stage % launch.ac_layers:
        raise LaunchError(f"error: MP_AC_LAYERS={launch.ac_layers} must divide the {layers_per_stage} layers per "
                          "pipeline stage for AC=full (uniform recompute).")
    if launch.activation_checkpointing == "offload":
        if launch.pp > 1:
            raise LaunchError("error: AC=offload does not work with PP > 1 in megatron-core 0.19.2.")
        if launch.ac_layers >= size.num_layers:
            raise LaunchError(f"error: MP_AC_LAYERS={launch.ac_layers} must be below the model's {size.num_layers} "
                              "layers for AC=offload.")
    dp = machine.world_size // model_parallel
    if launch.global_batch_size % (launch.batch_size * dp):
        raise LaunchError(f"error: GLOBAL_BATCH_SIZE={launch.global_batch_size} must be a multiple of BATCH_SIZE x "
                          f"data-parallel size = {launch.batch_size} x {dp} = {launch.batch_size * dp}.")
    if launch.seq_len > size.max_position_embeddings:
        raise LaunchError(f"error: SEQ_LEN={launch.seq_len} exceeds Qwen2.5-{launch.model_size}'s "
                          f"{size.max_position_embeddings} positions.")
    if launch.cp > 1 and launch.seq_len % (2 * launch.cp):
        raise LaunchError(f"error: SEQ_LEN={launch.seq_len} must be divisible by 2*CP = {2 * launch.cp}.")
    if launch.sft and launch.dataset_type == "raw" and launch.pad_len > launch.seq_len:
        raise LaunchError(f"error: PAD_LEN={launch.pad_len} exceeds SEQ_LEN={launch.seq_len}: raw JSON samples are "
                          "padded to PAD_LEN, which must fit in the sequence. Lower PAD_LEN or raise SEQ_LEN.")
    if launch.dataset_type == "raw" and not launch.sft:
        raise LaunchError("error: MP_DATASET_TYPE=raw is for fine-tuning (SFT=true); pre-training reads idxmap data.")
    if launch.sft_packing and not launch.sft:
        raise LaunchError("error: MP_SFT_PACKING=true needs SFT=true.")
    if launch.train_iters < 1:
        raise LaunchError(f"error: TRAIN_TOKENS_OR_ITERS={launch.train_tokens_or_iters} tokens is less than one "
                          f"iteration of GLOBAL_BATCH_SIZE x SEQ_LEN = {launch.global_batch_size * launch.seq_len} "
                          "tokens.")
    # Megatron checks both only after startup, with a bare AssertionError in its LR scheduler.
    if launch.warmup_iters >= launch.train_iters:
        raise LaunchError(f"error: WARMUP_TOKENS_OR_ITERS={launch.warmup_tokens_or_iters} gives {launch.warmup_iters} "
                          f"warmup iterations, but training has only {launch.train_iters}; warmup must end before "
                          "training does. Lower WARMUP_TOKENS_OR_ITERS or raise TRAIN_TOKENS_OR_ITERS "
                          + ("(both are iterations for SFT)." if launch.sft else "(both are tokens for pre-training)."))
    if launch.min_lr > launch.lr or launch.min_lr < 0:
        raise LaunchError(f"error: MIN_LR={launch.min_lr:g} is above LR={launch.lr:g} or negative: the cosine schedule "
                          "decays from LR down to MIN_LR. Pass 0 <= MIN_LR <= LR.")
    _validate_paths(launch)
    if launch.sp and launch.tp == 1:
        launch.warnings.append("SP=true has no effect with TP=1: sequence parallelism is left off.")
    elif launch.sp and not uses_te(launch, machine):
        # megatron-core's local (torch) norms refuse sequence parallelism; only TE's fused norms support it.
        launch.sp = False
        launch.warnings.append("SP=true needs Transformer Engine (megatron-core's local norms cannot shard the "
                               "sequence): sequence parallelism is left off.")
    if launch.optimizer_offload != "false" and not launch.distributed_optimizer:
        launch.distributed_optimizer = True
        launch.warnings.append(f"OPTIMIZER_OFFLOAD={launch.optimizer_offload} needs the distributed optimizer: "
                               "DO is turned on.")


def _validate_paths(launch: Launch) -> None:
    for label, path in (("DATASET_PATH", launch.dataset_path), ("VALID_DATASET_PATH", launch.valid_dataset_path)):
        if launch.dataset_type == "raw":
            if not Path(path).is_file():
                raise LaunchError(f"error: {label} {path} is not a file; MP_DATASET_TYPE=raw reads a JSON/JSONL file.")
        elif launch.sft:
            missing = _sft_dataset_files_missing(path)
            if missing:
                raise LaunchError(
                    f"error: {label} {path} is not an SFT idxmap prefix: missing {', '.join(missing)}. Pass the "
                    "--output-prefix given to toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py (without "
                    "_text_document); for a JSON file set MP_DATASET_TYPE=raw."
                )
        else:
            missing = _dataset_files_missing(path)
            if missing:
                raise LaunchError(
                    f"error: {label} {path} is not an idxmap dataset prefix: missing {', '.join(missing)}. Pass the "
                    "prefix without .bin/.idx, as written by toolkits/pretrain_data_preprocessing/preprocess_data.py"
                    "; SFT=true reads a JSON file with MP_DATASET_TYPE=raw."
                )
    if launch.pretrain_checkpoint is not None:
        ckpt = Path(launch.pretrain_checkpoint)
        if not (ckpt / "latest_checkpointed_iteration.txt").is_file():
            raise LaunchError(
                f"error: PRETRAIN_CHECKPOINT_PATH {ckpt} is not a Megatron checkpoint (no "
                "latest_checkpointed_iteration.txt). Convert a Hugging Face checkpoint first with "
                "toolkits/distributed_checkpoints_convertor/scripts/qwen2_5/run_8xH20.sh, or pass none to start "
                "from random weights."
            )
        config = _checkpoint_config(ckpt)
        if config is not None:
            bad = hf_config_mismatches(launch.size, config)
            if bad:
                raise LaunchError(f"error: MODEL_SIZE={launch.model_size} does not match {ckpt}/config.json:\n  "
                                  + "\n  ".join(bad) + "\nPass the MODEL_SIZE this checkpoint was converted as.")


def tokenizer_dir(launch: Launch) -> str:
    """The checkpoint's own tokenizer, else MP_TOKENIZER_PATH, else the embedded default Qwen2.5 tokenizer."""
    if launch.tokenizer_path:
        return launch.tokenizer_path
    if launch.pretrain_checkpoint and (Path(launch.pretrain_checkpoint) / "tokenizer_config.json").is_file():
        return launch.pretrain_checkpoint
    from megatron_patch.tokenizer import cached_default_tokenizer

    return str(cached_default_tokenizer())


def _cuda_graph_obstacle(launch: Launch, machine: Machine) -> str | None:
    """Why this layout's whole iteration cannot replay from one graph (fixed shapes, no host work inside the
    step), or None."""
    if not machine.has_gpu:
        return "it needs a GPU"
    if launch.pp > 1:
        return "it captures PP=1 layouts only (TP, CP and data parallelism)"
    if launch.activation_checkpointing == "offload":
        return "AC=offload copies activations to the host inside the step"
    if launch.precision == "fp8":
        return "PR=fp8 updates its scaling factors outside the step"
    return None


def megatron_flags(launch: Launch, machine: Machine) -> list[str]:
    out = launch.output_basepath
    flags = [
        "--model-size", launch.model_size,
        "--micro-batch-size", str(launch.batch_size),
        "--global-batch-size", str(launch.global_batch_size),
        "--seq-length", str(launch.seq_len),
        "--lr", str(launch.lr), "--min-lr", str(launch.min_lr), "--lr-decay-style", "cosine",
        "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0",
        "--init-method-std", "0.008",
        "--train-iters", str(launch.train_iters),
        "--lr-warmup-iters", str(launch.warmup_iters),
        "--lr-decay-iters", str(launch.train_iters),
        "--tensor-model-parallel-size", str(launch.tp),
        "--pipeline-model-parallel-size", str(launch.pp),
        "--context-parallel-size", str(launch.cp),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir(launch),
        "--seed", "1234",
        # Loss is summed per token and divided by the global batch's token count: exact under any layout.
        "--calculate-per-token-loss",
        "--save", str(launch.checkpoint_dir), "--load", str(launch.checkpoint_dir),
        "--save-interval", str(launch.save_interval), "--ckpt-format", "torch_dist",
        "--exit-signal-handler",
        "--eval-interval", "10000", "--eval-iters", "10",
        "--log-interval", "1", "--log-throughput",
        "--tensorboard-dir", str(out / "tensorboard" / launch.run_name),
        "--tensorboard-queue-size", "1", "--tensorboard-log-interval", "1",
        "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--log-memory-to-tensorboard",
    ]
    if launch.pretrain_checkpoint:
        # Megatron loads --load when it holds a checkpoint (a relaunch resumes, optimizer included) and
        # otherwise starts from these weights alone.
        flags += ["--pretrained-checkpoint", launch.pretrain_checkpoint]
    flags += _precision_flags(launch)
    flags += _parallel_flags(launch, machine)
    flags += _attention_flags(launch, machine)
    if not launch.fused_kernels:
        flags.append("--plain-kernels")
    if launch.cuda_graph:
        # The NaN check reads the loss on the host, which a graph replay cannot do.
        flags += ["--cuda-graph-impl", "full_iteration", "--no-check-for-nan-in-loss-and-grad"]
    flags += _recompute_flags(launch)
    flags += _optimizer_offload_flags(launch, machine)
    flags += _data_flags(launch)
    return flags


def _precision_flags(launch: Launch) -> list[str]:
    if launch.precision == "bf16":
        return ["--bf16"]
    if launch.precision == "fp16":
        return ["--fp16", "--initial-loss-scale", "65536"]
    if launch.precision == "fp8":
        return ["--bf16", "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
                "--fp8-amax-compute-algo", "max"]
    return []


def _parallel_flags(launch: Launch, machine: Machine) -> list[str]:
    flags = []
    if launch.sp and launch.tp > 1:
        flags.append("--sequence-parallel")
    if launch.virtual_pipeline is not None:
        flags += ["--num-layers-per-virtual-pipeline-stage",
                  str(launch.size.num_layers // launch.pp // launch.virtual_pipeline)]
    if launch.distributed_optimizer:
        flags.append("--use-distributed-optimizer")
    if machine.has_gpu:
        # Overlap only where it exists: param gather needs the distributed optimizer (upstream adds it always).
        flags.append("--overlap-grad-reduce")
        # The overlapped gather is waited on in forward hooks, outside a captured graph's reach.
        if launch.distributed_optimizer and not launch.cuda_graph:
            flags.append("--overlap-param-gather")
        if launch.tp > 1 and launch.sp and uses_te(launch, machine):
            flags.append("--tp-comm-overlap")
    return flags


def uses_te(launch: Launch, machine: Machine) -> bool:
    """The Transformer Engine spec, when TE is here and no packed samples need block masks."""
    return machine.has_te and not launch.sft_packing


def _attention_flags(launch: Launch, machine: Machine) -> list[str]:
    if uses_te(launch, machine):
        return ["--transformer-impl", "transformer_engine",
                "--attention-backend", "flash" if launch.flash_attention else "fused",
                "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native"]
    flags = ["--transformer-impl", "local"]
    if not machine.has_gpu:
        return flags
    # Without TE, Apex's fused kernels are absent too (the entrypoint supplies the gradient-accumulation GEMM).
    flags += ["--no-persist-layer-norm", "--no-masked-softmax-fusion"]
    return flags


def _recompute_flags(launch: Launch) -> list[str]:
    mode = launch.activation_checkpointing
    if mode == "sel":
        return ["--recompute-activations"]
    if mode == "full":
        return ["--recompute-granularity", "full", "--recompute-method", "uniform",
                "--recompute-num-layers", str(launch.ac_layers)]
    if mode == "offload":
        return ["--cpu-offloading-num-layers", str(launch.ac_layers)]
    return []


def _optimizer_offload_flags(launch: Launch, machine: Machine) -> list[str]:
    if launch.optimizer_offload == "false":
        return []
    fraction = 1.0 if launch.optimizer_offload == "static" else auto_offload_fraction(launch, machine)
    return ["--optimizer-cpu-offload", "--use-precision-aware-optimizer",
            "--optimizer-offload-fraction", f"{fraction:.2f}", "--overlap-cpu-optimizer-d2h-h2d"]


def auto_offload_fraction(launch: Launch, machine: Machine) -> float:
    """Share of optimizer state to keep on the CPU so the rest fits in free GPU memory.

    Adam keeps fp32 master weights and two moments: 12 bytes per parameter, split over data-parallel ranks by
    the distributed optimizer. Half of the GPU's free memory is left for weights, grads and activations.
    """
    size = launch.size
    params = 12 * size.num_layers * size.hidden_size ** 2 + 2 * size.vocab_size * size.hidden_size
    dp = max(1, machine.world_size // (launch.tp * launch.pp * launch.cp))
    state_bytes = 12 * params / (launch.tp * launch.pp) / dp
    free_bytes = _free_gpu_bytes()
    if free_bytes is None:
        return 1.0
    on_gpu = min(1.0, 0.5 * free_bytes / state_bytes)
    return round(max(0.0, 1.0 - on_gpu), 2)


def _free_gpu_bytes() -> int | None:
    try:
        import torch

        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    except Exception:
        return None


def _data_flags(launch: Launch) -> list[str]:
    if launch.sft:
        flags = ["--instruction-tuning", "--dataset-type", launch.dataset_type,
                 "--train-data-path", launch.dataset_path,
                 "--valid-data-path", launch.valid_dataset_path]
        if launch.dataset_type == "raw":
            flags += ["--max-padding-length", str(launch.pad_len)]
        if launch.sft_packing:
            flags.append("--sft-packing")
        return flags
    if launch.valid_dataset_path == launch.dataset_path:
        return ["--dataset-type", "idxmap", "--data-path", launch.dataset_path, "--split", "99,1,0"]
    return ["--dataset-type", "idxmap", "--train-data-path", launch.dataset_path,
            "--valid-data-path", launch.valid_dataset_path]


def torchrun_command(launch: Launch, machine: Machine) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(machine.nproc_per_node), "--nnodes", str(machine.nnodes),
        "--node-rank", str(machine.node_rank),
        "--master-addr", machine.master_addr, "--master-port", str(machine.master_port),
        "-m", "megatron_patch.pretrain_qwen", *megatron_flags(launch, machine),
    ]


def launch_env(machine: Machine) -> dict[str, str]:
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    # NVLink multicast (NVLS) hangs or fails on some hosts; plain NCCL rings and trees are safe everywhere.
    env["NCCL_NVLS_ENABLE"] = os.environ.get("NCCL_NVLS_ENABLE", "0")
    if not machine.has_gpu:
        env["OMP_NUM_THREADS"] = os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // machine.nproc_per_node)))
    return env


def run(command: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run torchrun, copying its output to the terminal and to the log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Line-buffered, and stdout flushed per line: a job killed with SIGKILL (OOM, preemption) keeps its last lines.
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:
        log.write(f"# {datetime.datetime.now().isoformat()} {shlex.join(command)}\n")
        proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
        return proc.wait()


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    environ = dict(os.environ) if environ is None else environ
    try:
        launch = parse(argv, environ)
        machine = detect_machine(launch, environ)
        validate(launch, machine)
        command = torchrun_command(launch, machine)
    except LaunchError as err:
        print(err.message, file=sys.stderr)
        return 2
    for warning in launch.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for note in launch.notes:
        print(f"note: {note}", file=sys.stderr)
    env = launch_env(machine)
    if environ.get("MP_DRY_RUN", "") not in ("", "0", "false"):
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
        return 0
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = launch.output_basepath / "log" / f"{stamp}_{launch.run_name}_node{machine.node_rank}.log"
    print(f"run_mcore_qwen: {launch.run_name}\n  checkpoints: {launch.checkpoint_dir}\n  log: {log_path}", flush=True)
    return run(command, env, log_path)


if __name__ == "__main__":
    sys.exit(main())
