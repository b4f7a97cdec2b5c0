"""Launch + Machine -> megatron-core 0.19.2 flags for megatron_patch.pretrain_qwen, the torchrun command and its
environment. Nothing here touches the file system or starts anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_patch import hardware
from megatron_patch.megatron_flags import NO_TE_GPU_FLAGS, qwen2_5_model_flags
from megatron_patch.data.blend import split_data_path
from megatron_patch.launch.positional import Launch
from megatron_patch.launch.machine import Machine, uses_te

REPO_ROOT = Path(__file__).resolve().parents[2]
# MP_CUDA_GRAPH=true: each training iteration's forward and backward replayed from one graph. The NaN check reads the
# loss on the host, which a graph replay cannot do.
CUDA_GRAPH_FLAGS = ["--cuda-graph-impl", "full_iteration", "--no-check-for-nan-in-loss-and-grad"]
TRAINING_SEED = 1234  # --seed: weights' init and the SFT train split's epochs (data/sft_providers.py)


def megatron_flags(launch: Launch, machine: Machine, tokenizer: str) -> list[str]:
    out = launch.output_basepath
    # The model as settle resolved it (config.json's where the checkpoint has one): the entrypoint takes these as
    # they are.
    flags = [
        *qwen2_5_model_flags(launch.size),
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
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer,
        "--seed", str(TRAINING_SEED),
        # Loss is summed per token and divided by the global batch's token count: exact under any layout.
        "--calculate-per-token-loss",
        "--load", str(launch.checkpoint_dir), "--ckpt-format", "torch_dist",
        "--exit-signal-handler",
        "--eval-interval", "10000", "--eval-iters", "10",
        "--log-interval", "1", "--log-throughput",
        "--tensorboard-dir", str(out / "tensorboard" / launch.run_name),
        "--tensorboard-queue-size", "1", "--tensorboard-log-interval", "1",
        "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--log-memory-to-tensorboard",
    ]
    if launch.save_checkpoints:  # without --save Megatron saves nothing, not even at the end or on a stop
        flags += ["--save", str(launch.checkpoint_dir), "--save-interval", str(launch.save_interval)]
    if launch.pretrain_checkpoint:
        # Megatron loads --load when it holds a checkpoint (a relaunch resumes, optimizer included) and
        # otherwise starts from these weights alone; a Hugging Face folder each rank reads itself (the same rule).
        flags += ["--pretrained-hf" if launch.pretrain_is_hf else "--pretrained-checkpoint", launch.pretrain_checkpoint]
    flags += _precision_flags(launch)
    flags += _parallel_flags(launch, machine)
    flags += _attention_flags(launch, machine)
    if not launch.fused_kernels:
        flags.append("--plain-kernels")
    if launch.cuda_graph:
        flags += CUDA_GRAPH_FLAGS
    flags += _recompute_flags(launch)
    flags += _optimizer_offload_flags(launch, machine)
    flags += _data_flags(launch)
    flags += _lora_flags(launch)
    return flags


def _lora_flags(launch: Launch) -> list[str]:
    lora = launch.lora
    if lora is None:
        return []
    return ["--lora-rank", str(lora.rank), "--lora-alpha", f"{lora.alpha:g}", "--lora-dropout", f"{lora.dropout:g}",
            "--lora-targets", ",".join(lora.targets), "--lora-method", lora.method]


def _precision_flags(launch: Launch) -> list[str]:
    if launch.precision == "bf16":
        return ["--bf16"]
    if launch.precision == "fp16":
        # --calculate-per-token-loss backpropagates the sum over a micro-batch's tokens, not their mean: start the
        # dynamic loss scale that many times lower than the usual 2^16 (it grows back by itself when there is room).
        tokens = launch.batch_size * launch.seq_len
        scale = 2 ** max(0, (65536 // tokens).bit_length() - 1)
        return ["--fp16", "--initial-loss-scale", str(scale)]
    if launch.precision == "fp8":
        # hybrid (upstream's): e4m3 forward, e5m2 gradients; the amax history is delayed scaling's.
        flags = ["--bf16", "--fp8-format", launch.fp8_format, "--fp8-recipe", launch.fp8_recipe]
        if launch.fp8_recipe == "delayed":
            flags += ["--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max"]
        if launch.fp8_bf16_layers:
            n = str(launch.fp8_bf16_layers)
            flags += ["--first-last-layers-bf16", "--num-layers-at-start-in-bf16", n, "--num-layers-at-end-in-bf16", n]
        if launch.fp8_fprop_accumulation == "fp32":
            flags.append("--fp8-fprop-fp32-accumulation")
        return flags
    return []


def _parallel_flags(launch: Launch, machine: Machine) -> list[str]:
    flags = []
    if launch.sp and launch.tp > 1:
        flags.append("--sequence-parallel")
    if launch.layers_per_virtual_stage is not None:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(launch.layers_per_virtual_stage)]
    if launch.distributed_optimizer:
        flags.append("--use-distributed-optimizer")
    if machine.has_gpu:
        # Overlap only where it exists: param gather needs the distributed optimizer (upstream adds it always).
        flags.append("--overlap-grad-reduce")
        # The overlapped gather is waited on in forward hooks, outside a captured graph's reach; AC=full runs
        # each layer's forward (and its hooks) again in backward, which starts a second gather of a bucket
        # whose first is still pending (megatron-core 0.19.2 asserts); PR=fp8 through TE meets the same
        # assertion (docs/benchmarks.md, "Lab notes moved out of the code").
        if launch.distributed_optimizer and not launch.cuda_graph and launch.activation_checkpointing != "full" \
                and launch.precision != "fp8":
            flags.append("--overlap-param-gather")
        # LoRA asks TE's layer-norm linears for their normalized input, which TE's userbuffers all-gather
        # overlap does not hand out.
        if launch.tp > 1 and launch.sp and uses_te(launch, machine) and launch.lora is None:
            flags.append("--tp-comm-overlap")
    return flags


def _attention_flags(launch: Launch, machine: Machine) -> list[str]:
    if uses_te(launch, machine):
        # TE's flash and cuDNN fused attention take 16-bit inputs only; fp32 gets TE's unfused attention.
        backend = "unfused" if launch.precision == "fp32" else "flash" if launch.flash_attention else "fused"
        return ["--transformer-impl", "transformer_engine", "--attention-backend", backend,
                "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native"]
    if not machine.has_gpu:
        return ["--transformer-impl", "local"]  # the entrypoint's CPU backend adds the rest
    return list(NO_TE_GPU_FLAGS)


def _recompute_flags(launch: Launch) -> list[str]:
    mode = launch.activation_checkpointing
    if mode == "sel":
        return ["--recompute-activations"]
    if mode == "full":
        return ["--recompute-granularity", "full", "--recompute-method", launch.ac_method,
                "--recompute-num-layers", str(launch.ac_layers)]
    if mode == "offload":
        return ["--cpu-offloading-num-layers", str(launch.ac_layers)]
    return []


def _optimizer_offload_flags(launch: Launch, machine: Machine) -> list[str]:
    if launch.optimizer_offload == "false":
        return []
    return ["--optimizer-cpu-offload", "--use-precision-aware-optimizer",
            "--optimizer-offload-fraction", f"{offload_fraction(launch, machine):.2f}",
            "--overlap-cpu-optimizer-d2h-h2d"]


# Adam's state per trained parameter: fp32 master weights and two fp32 moments. Offloaded, megatron-core's hybrid
# optimizer also keeps a pinned fp32 copy of the gradients on the host for its CPU step.
ADAM_STATE_BYTES = 12
OFFLOADED_HOST_BYTES = 16


def optimizer_shard_parameters(launch: Launch, machine: Machine) -> float:
    """Trained parameters (the real shape's count, or a LoRA run's adapters) whose optimizer state one rank holds:
    split over TP and PP, and by the distributed optimizer over the data- and context-parallel ranks."""
    model_parallel = launch.tp * launch.pp
    return launch.trained_parameters / model_parallel / max(1, machine.world_size // model_parallel)


def offload_fraction(launch: Launch, machine: Machine) -> float:
    """Share of the optimizer state OPTIMIZER_OFFLOAD puts on the host: all of it (static), or what auto sizes."""
    if launch.optimizer_offload == "static":
        return 1.0
    return auto_offload_fraction(launch, machine, hardware.free_gpu_bytes())


def offloaded_host_bytes(launch: Launch, machine: Machine) -> float:
    """Host memory the offloaded optimizer state of this node's ranks takes."""
    return OFFLOADED_HOST_BYTES * optimizer_shard_parameters(launch, machine) * offload_fraction(launch, machine) \
        * machine.nproc_per_node


def auto_offload_fraction(launch: Launch, machine: Machine, free_gpu_bytes: int | None) -> float:
    """Share of optimizer state to keep on the CPU so the rest fits in free GPU memory; half of the GPU's free
    memory is left for weights, grads and activations."""
    if free_gpu_bytes is None:
        return 1.0
    state_bytes = ADAM_STATE_BYTES * optimizer_shard_parameters(launch, machine)
    on_gpu = min(1.0, 0.5 * free_gpu_bytes / state_bytes)
    return round(max(0.0, 1.0 - on_gpu), 2)


def _data_flags(launch: Launch) -> list[str]:
    # A blend's words are separate arguments: Megatron's data path flags take lists.
    train, valid = split_data_path(launch.dataset_path), split_data_path(launch.valid_dataset_path)
    if launch.sft:
        flags = ["--instruction-tuning", "--dataset-type", launch.dataset_type,
                 "--train-data-path", *train, "--valid-data-path", *valid]
        if launch.dataset_type == "raw":
            flags += ["--max-padding-length", str(launch.pad_len)]
        if launch.sft_packing:
            flags.append("--sft-packing")
        return flags
    if launch.valid_dataset_path == launch.dataset_path:
        return ["--dataset-type", "idxmap", "--data-path", *train, "--split", "99,1,0"]
    return ["--dataset-type", "idxmap", "--train-data-path", *train, "--valid-data-path", *valid]


def torchrun_command(launch: Launch, machine: Machine, tokenizer: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(machine.nproc_per_node), "--nnodes", str(machine.nnodes),
        "--node-rank", str(machine.node_rank),
        "--master-addr", machine.master_addr, "--master-port", str(machine.master_port),
        # Not SIGINT/SIGTERM/SIGHUP (its default): the launcher stops the ranks itself (launch/run.py).
        "--signals-to-handle", "SIGQUIT",
        "-m", "megatron_patch.pretrain_qwen", *megatron_flags(launch, machine, tokenizer),
    ]


def launch_env(machine: Machine, environ: dict[str, str]) -> dict[str, str]:
    """What torchrun's environment gets on top of the caller's."""
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), environ.get("PYTHONPATH", "")) if p)}
    # NVLink multicast (NVLS) hangs or fails on some hosts; plain NCCL rings and trees are safe everywhere.
    env["NCCL_NVLS_ENABLE"] = environ.get("NCCL_NVLS_ENABLE", "0")
    if not machine.has_gpu:
        env["OMP_NUM_THREADS"] = environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // machine.nproc_per_node)))
    return env
