"""Before torchrun: `settle` reads the model (the checkpoint's config.json, else the size table) and makes the
adjustments a layout needs, saying each one; `problems` returns what stops the run (errors), what the user should
know (warnings) and notes, changing nothing."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch import hardware
from megatron_patch.data.blend import data_path_problem
from megatron_patch.data.dataset_checks import dataset_problem
from megatron_patch.launch.flags import OFFLOADED_HOST_BYTES, offloaded_host_bytes
from megatron_patch.launch.positional import Launch
from megatron_patch.launch.machine import Machine, packed_samples_need_masks, uses_te
from megatron_patch.errors import UserError
from megatron_patch.hf_checkpoint import INDEX_FILE, SINGLE_FILE, is_hf_checkpoint
from megatron_patch.lora.targets import KNOB_NAMES, settings_problems
from megatron_patch.model_sizes import (
    QWEN2_5_SIZES,
    following_config_note,
    layout_problems,
    model_from_hf_config,
    read_checkpoint_json,
    shape_differences,
    with_yarn,
)


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # suggestions, not problems


def settle(launch: Launch, machine: Machine) -> tuple[Launch, list[str]]:
    """The launch with its model and the adjustments its layout needs, and one line per adjustment made."""
    launch, changes = resolve_model(launch)
    if launch.sp and launch.tp > 1 and not uses_te(launch, machine):
        # megatron-core's local (torch) norms refuse sequence parallelism; only TE's fused norms support it.
        launch = dataclasses.replace(launch, sp=False)
        changes.append("SP=true needs Transformer Engine (megatron-core's local norms cannot shard the sequence): "
                       "sequence parallelism is left off.")
    if launch.optimizer_offload != "false" and not launch.distributed_optimizer:
        launch = dataclasses.replace(launch, distributed_optimizer=True)
        changes.append(f"OPTIMIZER_OFFLOAD={launch.optimizer_offload} needs the distributed optimizer: DO is turned on.")
    return launch, changes


def resolve_model(launch: Launch) -> tuple[Launch, list[str]]:
    """The launch with its model: PRETRAIN_CHECKPOINT_PATH's config.json (a Hugging Face folder's, or the copy the
    convertor keeps beside a checkpoint) where there is one, else MODEL_SIZE's size-table entry; MP_ROPE_SCALING
    adds YaRN. A config.json that cannot be trained as written is a UserError naming the field and the file."""
    config = Path(launch.pretrain_checkpoint) / "config.json" if launch.pretrain_checkpoint else None
    if config is not None and config.is_file():
        model = model_from_hf_config(read_checkpoint_json(config), config)
    elif launch.model_size == "auto":
        where = f"there is no {config}" if config else "PRETRAIN_CHECKPOINT_PATH is none"
        raise UserError(f"error: MODEL_SIZE=auto takes the model from PRETRAIN_CHECKPOINT_PATH's config.json, but "
                        f"{where}. Pass a Hugging Face folder or a checkpoint converted by the toolkit's convertor "
                        f"(it keeps config.json beside the checkpoint), or name a size: {', '.join(QWEN2_5_SIZES)}.")
    else:
        model, config = QWEN2_5_SIZES[launch.model_size], None
    changes = []
    if launch.yarn_factor:
        if model.rope_scaling and model.rope_scaling.factor != launch.yarn_factor:
            changes.append(f"MP_ROPE_SCALING=yarn:{launch.yarn_factor:g} replaces the YaRN factor "
                           f"{model.rope_scaling.factor:g} of {config}.")
        model = with_yarn(model, launch.yarn_factor)
    is_hf = launch.pretrain_checkpoint is not None and is_hf_checkpoint(launch.pretrain_checkpoint)
    return dataclasses.replace(launch, model=model, model_config=config, pretrain_is_hf=is_hf), changes


def cuda_graph_obstacle(launch: Launch, machine: Machine) -> str | None:
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
    if launch.cp > 1 and not uses_te(launch, machine):
        return ("CP > 1 without Transformer Engine checks its GPU attention kernel on the host at the first step, "
                "which a capture cannot hold (not supported yet)")
    return None


def problems(launch: Launch, machine: Machine) -> Findings:
    found = Findings()
    found.errors += _feature_problems(launch, machine, found)
    found.errors += _layout_problems(launch, machine)
    found.errors += _schedule_problems(launch)
    found.errors += _path_problems(launch)
    found.errors += _lora_problems(launch)
    found.errors += _host_memory_problems(launch, machine)
    if launch.save_hf != "false" and not launch.save_checkpoints:
        found.errors.append(f"MP_SAVE_HF={launch.save_hf} exports each saved checkpoint, but MP_SAVE=false saves "
                            "none. Unset one of them.")
    found.warnings += _save_hf_warnings(launch)
    if launch.model_config is not None:
        # MP_ROPE_SCALING's YaRN is the run's choice, not config.json's
        from_config = dataclasses.replace(launch.size, rope_scaling=None) if launch.yarn_factor else launch.size
        note = following_config_note(from_config, launch.model_config, launch.model_size)
        found.notes += [note] if note else []
    if launch.sp and launch.tp == 1:
        found.warnings.append("SP=true has no effect with TP=1: sequence parallelism is left off.")
    if not launch.save_checkpoints:
        found.warnings.append(f"MP_SAVE=false: this run saves no checkpoint (SAVE_INTERVAL={launch.save_interval} is "
                              "ignored); when it ends or is stopped, nothing of its training is kept.")
    return found


def _host_memory_problems(launch: Launch, machine: Machine) -> list[str]:
    """An offloaded optimizer state this host cannot hold: refused now, not killed by the kernel's OOM killer
    minutes into the run, after the model has been built."""
    if launch.optimizer_offload == "false" or not machine.has_gpu:
        return []
    available = hardware.available_host_bytes()
    needed = offloaded_host_bytes(launch, machine)
    if available is None or needed <= available:
        return []
    return [f"OPTIMIZER_OFFLOAD={launch.optimizer_offload} keeps the optimizer state of this node's "
            f"{machine.nproc_per_node} rank(s) on the host: about {needed / 2**30:.0f} GiB ({OFFLOADED_HOST_BYTES} "
            f"bytes per trained parameter: fp32 master weights, Adam's two fp32 moments and a pinned fp32 copy of "
            f"the gradients; {launch.trained_parameters / 1e9:.2f}B parameters trained, split over "
            f"TP*PP = {launch.tp * launch.pp} and the data-parallel ranks), but only {available / 2**30:.0f} GiB of "
            "host memory is available (MemAvailable). Use OPTIMIZER_OFFLOAD=auto (it keeps on the GPU what fits), "
            "more GPUs, or LoRA (MP_LORA_RANK), or free host memory."]


def _feature_problems(launch: Launch, machine: Machine, found: Findings) -> list[str]:
    """Options that need something this machine lacks, or that rule each other out."""
    errors = []
    if launch.flash_attention and uses_te(launch, machine) and not machine.has_flash_attn:
        # TE's flash backend is flash-attn's kernels; without them TE stops at the first attention call.
        errors.append("FL=true asks Transformer Engine for flash-attn's attention kernels, but the flash_attn package "
                      "is not installed. Install it (pip install flash-attn --no-build-isolation), or set FL=false "
                      "for TE's cuDNN fused attention.")
    needs_masks = packed_samples_need_masks(launch)
    if needs_masks and machine.has_te:
        # TE's attention takes packed samples as thd boundaries only; the local spec's SDPA attention takes masks.
        if launch.precision == "fp8" or launch.activation_checkpointing == "offload":
            errors.append(f"MP_SFT_PACKING=true with {needs_masks} trains on megatron-core's local spec (packed "
                          "samples through its own attention), but PR=fp8 and AC=offload need the Transformer Engine "
                          "spec. Change that setting, turn packing off, or use PR=bf16 with AC=sel/full/false.")
        found.warnings.append(f"MP_SFT_PACKING=true with {needs_masks}: training on the local spec, whose attention "
                              "keeps packed samples apart (variable-length flash kernel on the GPU, block masks "
                              "elsewhere).")
    if launch.precision == "fp16" and not machine.has_gpu:
        errors.append("PR=fp16 needs a GPU: a CPU has no fast fp16 arithmetic (a tiny model's iteration takes ~80 s "
                      "instead of 3 s in fp32). Use PR=fp32 or PR=bf16 here.")
    if launch.optimizer_offload != "false" and not machine.has_gpu:
        errors.append(f"OPTIMIZER_OFFLOAD={launch.optimizer_offload} moves optimizer state from the GPU to the host; "
                      "without a GPU everything is on the host already (and megatron-core's hybrid optimizer fails "
                      "there). Use OPTIMIZER_OFFLOAD=false.")
    if launch.precision == "fp8" and not machine.has_te:
        errors.append("PR=fp8 needs Transformer Engine on a GPU, and it is not importable here. Use PR=bf16, or run "
                      "in the NGC PyTorch image (see the Dockerfile).")
    if launch.precision == "fp8" and launch.fp8_recipe == "mxfp8" and machine.has_gpu and machine.gpu_capability < 100:
        errors.append(f"MP_FP8_RECIPE=mxfp8 needs a Blackwell GPU (compute capability 10.0 or newer); this one is "
                      f"{machine.gpu_capability // 10}.{machine.gpu_capability % 10}. Use MP_FP8_RECIPE=delayed, "
                      "tensorwise or blockwise.")
    if launch.ac_method != "uniform" and launch.activation_checkpointing != "full":
        found.warnings.append(f"MP_AC_METHOD={launch.ac_method} has no effect with AC={launch.activation_checkpointing} "
                              "(it is AC=full's recompute method).")
    if launch.fp8_bf16_layers and launch.precision != "fp8":
        found.warnings.append(f"MP_FP8_BF16_LAYERS={launch.fp8_bf16_layers} has no effect with PR={launch.precision} "
                              "(it keeps layers of a PR=fp8 run in bf16).")
    if launch.fp8_recipe != "delayed" and launch.precision != "fp8":
        found.warnings.append(f"MP_FP8_RECIPE={launch.fp8_recipe} has no effect with PR={launch.precision} "
                              "(it applies to PR=fp8).")
    for knob, value, default in (("MP_FP8_FORMAT", launch.fp8_format, "hybrid"),
                                 ("MP_FP8_FPROP_ACCUMULATION", launch.fp8_fprop_accumulation, "fast")):
        if value != default and launch.precision != "fp8":
            found.warnings.append(f"{knob}={value} has no effect with PR={launch.precision} (it applies to PR=fp8).")
    if launch.precision == "fp8" and launch.fp8_bf16_layers and launch.fp8_recipe == "delayed":
        errors.append(f"MP_FP8_BF16_LAYERS={launch.fp8_bf16_layers} needs current or block scaling: megatron-core "
                      "0.19.2 refuses bf16 layers under delayed scaling (MP_FP8_RECIPE=delayed, the default), whose "
                      "amax reduction spans every layer. Set MP_FP8_RECIPE=tensorwise (or blockwise), or "
                      "MP_FP8_BF16_LAYERS=0.")
    if launch.activation_checkpointing == "offload" and not machine.has_te:
        errors.append("AC=offload uses Transformer Engine's CPU offload, which is not importable here. Use AC=sel or "
                      "AC=full, or run in the NGC PyTorch image.")
    if launch.cp > 1 and not uses_te(launch, machine) and not launch.fused_kernels:
        errors.append(f"CP={launch.cp} without Transformer Engine runs context parallelism in our SDPA attention, but "
                      "MP_FUSED_KERNELS=false asks for megatron-core's plain DotProductAttention, which has none. "
                      "Unset MP_FUSED_KERNELS, or use CP=1.")
    graph_obstacle = cuda_graph_obstacle(launch, machine)
    if launch.cuda_graph and graph_obstacle:
        errors.append(f"MP_CUDA_GRAPH=true, but {graph_obstacle}. Unset MP_CUDA_GRAPH (or set it to false).")
    if launch.sft and not launch.cuda_graph and not graph_obstacle:
        found.notes.append("SFT steps at small micro-batches wait on the host's kernel launches; MP_CUDA_GRAPH=true "
                           "replays each iteration from one CUDA graph (the guide's SFT command: 81 instead of "
                           "1,160 ms per iteration on one H200, docs/benchmarks.md).")
    if launch.dataset_type == "raw" and not launch.sft:
        errors.append("MP_DATASET_TYPE=raw is for fine-tuning (SFT=true); pre-training reads idxmap data.")
    if launch.sft_packing and not launch.sft:
        errors.append("MP_SFT_PACKING=true needs SFT=true.")
    return errors


def _layout_problems(launch: Launch, machine: Machine) -> list[str]:
    size = launch.size
    errors = []
    model_parallel = launch.tp * launch.pp * launch.cp
    if machine.world_size % model_parallel:
        errors.append(f"TP*PP*CP = {launch.tp}*{launch.pp}*{launch.cp} = {model_parallel} does not divide the "
                      f"{machine.world_size} processes ({machine.nnodes} node(s) x {machine.nproc_per_node}).")
    errors += [f"{p} of Qwen2.5-{launch.model_name}." for p in layout_problems(size, launch.tp, launch.pp)]
    layers_per_stage = size.num_layers // launch.pp
    vp = launch.layers_per_virtual_stage
    if vp is not None:
        if launch.pp < 2:
            errors.append("MP_VP (layers per virtual pipeline stage) needs PP >= 2.")
        elif layers_per_stage % vp or vp >= layers_per_stage:
            choices = [n for n in range(1, layers_per_stage) if layers_per_stage % n == 0]
            errors.append(f"MP_VP={vp} layers per virtual pipeline stage must divide the {layers_per_stage} layers of "
                          f"each of the PP={launch.pp} stages into two or more virtual stages: choose MP_VP from "
                          f"{choices}.")
        else:
            layers_per_stage = vp
    if launch.activation_checkpointing == "full":
        if launch.ac_method == "uniform" and layers_per_stage % launch.ac_layers:
            errors.append(f"MP_AC_LAYERS={launch.ac_layers} must divide the {layers_per_stage} layers per pipeline "
                          "stage for AC=full (uniform recompute).")
        if launch.ac_method == "block" and launch.ac_layers > layers_per_stage:
            errors.append(f"MP_AC_LAYERS={launch.ac_layers} exceeds the {layers_per_stage} layers per pipeline stage "
                          f"(MP_AC_METHOD=block recomputes that many of them): choose 1 to {layers_per_stage}.")
    if launch.precision == "fp8" and 2 * launch.fp8_bf16_layers >= size.num_layers:
        errors.append(f"MP_FP8_BF16_LAYERS={launch.fp8_bf16_layers} keeps {launch.fp8_bf16_layers} layers at each end "
                      f"of Qwen2.5-{launch.model_name}'s {size.num_layers} in bf16, leaving none in fp8: choose 0 to "
                      f"{(size.num_layers - 1) // 2}, or PR=bf16.")
    if launch.activation_checkpointing == "offload":
        if launch.pp > 1:
            errors.append("AC=offload does not work with PP > 1 in megatron-core 0.19.2.")
        if launch.ac_layers >= size.num_layers:
            errors.append(f"MP_AC_LAYERS={launch.ac_layers} must be below the model's {size.num_layers} layers for "
                          "AC=offload.")
    if model_parallel and machine.world_size % model_parallel == 0:
        dp = machine.world_size // model_parallel
        if launch.global_batch_size % (launch.batch_size * dp):
            errors.append(f"GLOBAL_BATCH_SIZE={launch.global_batch_size} must be a multiple of BATCH_SIZE x "
                          f"data-parallel size = {launch.batch_size} x {dp} = {launch.batch_size * dp}.")
    if launch.seq_len > size.positions:
        errors.append(_positions_problem(launch))
    if launch.cp > 1 and launch.seq_len % (2 * launch.cp):
        errors.append(f"SEQ_LEN={launch.seq_len} must be divisible by 2*CP = {2 * launch.cp}.")
    if launch.sft and launch.dataset_type == "raw" and launch.pad_len > launch.seq_len:
        errors.append(f"PAD_LEN={launch.pad_len} exceeds SEQ_LEN={launch.seq_len}: raw JSON samples are padded to "
                      "PAD_LEN, which must fit in the sequence. Lower PAD_LEN or raise SEQ_LEN.")
    return errors


def _positions_problem(launch: Launch) -> str:
    size = launch.size
    if size.rope_scaling:
        source = (f"YaRN's factor {size.rope_scaling.factor:g} x {size.rope_scaling.original_max_position_embeddings}"
                  f" original positions")
        fix = "Lower SEQ_LEN, or raise the YaRN factor (MP_ROPE_SCALING=yarn:F)."
    else:
        source = f"max_position_embeddings in {launch.model_config}" if launch.model_config else "the size table"
        fix = (f"Lower SEQ_LEN, or extend the context with YaRN: MP_ROPE_SCALING=yarn:"
               f"{math.ceil(launch.seq_len / size.positions)}.")
    return (f"SEQ_LEN={launch.seq_len} exceeds Qwen2.5-{launch.model_name}'s {size.positions} positions ({source}). "
            + fix)


def _schedule_problems(launch: Launch) -> list[str]:
    if launch.train_iters < 1:
        return [f"TRAIN_TOKENS_OR_ITERS={launch.train_tokens_or_iters} tokens is less than one iteration of "
                f"GLOBAL_BATCH_SIZE x SEQ_LEN = {launch.global_batch_size * launch.seq_len} tokens."]
    errors = []
    # Megatron checks both only after startup, with a bare AssertionError in its LR scheduler.
    if launch.warmup_iters >= launch.train_iters:
        errors.append(f"WARMUP_TOKENS_OR_ITERS={launch.warmup_tokens_or_iters} gives {launch.warmup_iters} warmup "
                      f"iterations, but training has only {launch.train_iters}; warmup must end before training does. "
                      "Lower WARMUP_TOKENS_OR_ITERS or raise TRAIN_TOKENS_OR_ITERS "
                      + ("(both are iterations for SFT)." if launch.sft else "(both are tokens for pre-training)."))
    if launch.min_lr > launch.lr or launch.min_lr < 0:
        errors.append(f"MIN_LR={launch.min_lr:g} is above LR={launch.lr:g} or negative: the cosine schedule decays from "
                      "LR down to MIN_LR. Pass 0 <= MIN_LR <= LR.")
    return errors


def _lora_problems(launch: Launch) -> list[str]:
    if launch.lora is None:
        return []
    errors = settings_problems(launch.lora, "PR=fp8" if launch.precision == "fp8" else None, KNOB_NAMES)
    if launch.pretrain_checkpoint is None:
        errors.append(f"MP_LORA_RANK={launch.lora.rank} trains adapters over a base model, but "
                      "PRETRAIN_CHECKPOINT_PATH is none: pass the model to fine-tune (its Hugging Face folder, or a "
                      "checkpoint converted by toolkits/distributed_checkpoints_convertor), or unset MP_LORA_RANK for "
                      "full training.")
    return errors


def _path_problems(launch: Launch) -> list[str]:
    kind = "raw" if launch.dataset_type == "raw" else ("sft" if launch.sft else "pretrain")
    datasets = [("DATASET_PATH", launch.dataset_path)]
    if launch.valid_dataset_path != launch.dataset_path:
        datasets.append(("VALID_DATASET_PATH", launch.valid_dataset_path))
    errors = []
    for label, text in datasets:
        blend, problem = data_path_problem(label, text)
        paths = blend.paths if blend else []
        errors += [problem] if problem else [p for path in paths if (p := dataset_problem(label, path, kind))]
    if launch.pretrain_checkpoint is not None:
        errors += _checkpoint_problems(launch, Path(launch.pretrain_checkpoint))
    return errors


def _checkpoint_problems(launch: Launch, ckpt: Path) -> list[str]:
    if launch.pretrain_is_hf:
        errors = _hf_checkpoint_problems(launch, ckpt)
    elif not (ckpt / "latest_checkpointed_iteration.txt").is_file():
        return [f"PRETRAIN_CHECKPOINT_PATH {ckpt} is neither a Hugging Face folder (config.json beside "
                f"{SINGLE_FILE} or {INDEX_FILE}) nor a Megatron checkpoint (no latest_checkpointed_iteration.txt). "
                "Pass a Hugging Face Qwen2.5 folder, a checkpoint converted by "
                "toolkits/distributed_checkpoints_convertor/scripts/qwen2_5/run_8xH20.sh, or none to start from "
                "random weights."]
    else:
        errors = []
    if launch.model_config is None or launch.model_size == "auto":
        return errors
    bad = shape_differences(QWEN2_5_SIZES[launch.model_size], launch.size)
    if bad:
        errors.insert(0, f"MODEL_SIZE={launch.model_size} does not match {launch.model_config}:\n  " + "\n  ".join(bad)
                      + "\nPass the MODEL_SIZE of this checkpoint, or MODEL_SIZE=auto.")
    return errors


def _hf_checkpoint_problems(launch: Launch, folder: Path) -> list[str]:
    """A Hugging Face folder's weights: every shard its index names is there and readable, and every tensor the
    model needs is present with its shape (headers only: no weight is read)."""
    from megatron_patch.convert.convertor import validate_hf_checkpoint
    from megatron_patch.convert.hf_io import HFCheckpointReader

    try:
        validate_hf_checkpoint(HFCheckpointReader(folder), launch.size)
    except UserError as err:
        return [str(err).removeprefix("error: ")]
    return []


def _save_hf_warnings(launch: Launch) -> list[str]:
    if launch.save_hf == "false" and launch.save_hf_keep is not None:
        return [f"MP_SAVE_HF_KEEP={launch.save_hf_keep} has no effect without MP_SAVE_HF."]
    if launch.save_hf == "true" and launch.lora is not None and launch.pretrain_checkpoint and \
            not launch.pretrain_is_hf:
        return ["MP_SAVE_HF=true writes each LoRA checkpoint as a PEFT adapter folder, whose base model is named by "
                "a folder of the run's config.json and tokenizer (the base here is a converted checkpoint, not a "
                "Hugging Face folder): load the adapters over the original Hugging Face model, pass that folder as "
                "PRETRAIN_CHECKPOINT_PATH, or set MP_SAVE_HF=merged for full weights."]
    if launch.save_hf == "merged" and launch.lora is None:
        return ["MP_SAVE_HF=merged merges a LoRA run's adapters into its base; this run trains every weight, so it "
                "exports full weights, as MP_SAVE_HF=true does."]
    return []
