"""The 25 positional arguments of the upstream best practice and the MP_* environment knobs, parsed into a
Launch. Parsing only: no file system, no machine probe; a bad value is a UserError naming the argument."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_patch.errors import UserError, parse_bool
from megatron_patch.lora.targets import ALL_TARGETS, DEFAULT_ALPHA, METHODS, LoraSettings, adapter_parameter_count, \
    parse_targets
from megatron_patch.model_sizes import QWEN2_5_SIZES, Qwen25Size, shape_name

POSITIONAL = (
    "ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP SP DO FL SFT AC "
    "OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH "
    "TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH"
).split()

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
AC_MODES = ("sel", "full", "offload", "false")
AC_METHODS = ("uniform", "block")
OPTIMIZER_OFFLOAD_MODES = ("false", "static", "auto")
# megatron-core 0.19.2's TE fp8 recipes ('custom' takes a quantizer factory: not offered). mxfp8 needs Blackwell.
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_FPROP_ACCUMULATIONS = ("fast", "fp32")
SAVE_HF_MODES = ("false", "true", "merged")

# Every environment variable the launcher reads: name -> (default, meaning). README's table is checked against it.
ENV_KNOBS = {
    "MP_DATASET_TYPE": ("idxmap", "`idxmap` (Megatron .bin/.idx) or `raw` (JSON/JSONL SFT records, tokenized on the fly)"),
    "MP_AC_LAYERS": ("1", "AC=full: layers per recompute group (uniform) or layers recomputed per pipeline stage "
                          "(block); AC=offload: layers offloaded"),
    "MP_AC_METHOD": ("uniform", "AC=full's method: `uniform` (every layer recomputed, in groups of MP_AC_LAYERS; "
                                "upstream's) or `block` (only the first MP_AC_LAYERS layers of each stage: faster, "
                                "more memory; close to the GPU's memory add "
                                "`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`, without which 7B/32k CP2 with 12 "
                                "of 28 layers recomputed ran out of memory on H200s by fragmentation)"),
    "MP_VP": ("", "layers per virtual pipeline stage (upstream's meaning; needs PP >= 2), e.g. 4 with 24 layers "
                  "and PP=2 gives 3 virtual stages per pipeline rank"),
    "MP_SFT_PACKING": ("false", "`true`: several SFT samples per sequence, never attending across them"),
    "MP_FUSED_KERNELS": ("true", "`false`: megatron-core's plain modules only (its DotProductAttention, norms, "
                                 "RoPE and logits + cross-entropy), for comparison"),
    "MP_FP8_RECIPE": ("delayed", "PR=fp8's scaling: `delayed` (amax history, upstream's), `tensorwise` (current "
                                 "scaling), `blockwise` (128-element blocks), `mxfp8` (Blackwell GPUs only)"),
    "MP_FP8_BF16_LAYERS": ("0", "PR=fp8: decoder layers kept in bf16 at each end of the model (megatron-core's "
                                "--first-last-layers-bf16), e.g. `1`; `0`: every decoder layer in fp8; needs "
                                "MP_FP8_RECIPE other than `delayed`"),
    "MP_FP8_FORMAT": ("hybrid", "PR=fp8's formats: `hybrid` (e4m3 forward, e5m2 gradients; upstream's) or `e4m3` "
                                "(gradients too)"),
    "MP_FP8_FPROP_ACCUMULATION": ("fast", "PR=fp8 on Hopper: `fast` (TE's default: forward GEMMs accumulate in the fp8 "
                                          "tensor cores' own reduced precision) or `fp32` (partial sums promoted to "
                                          "fp32, as TE does for the backward's GEMMs; slower)"),
    "MP_ROPE_SCALING": ("", "`yarn:F`: YaRN RoPE scaling by F over the model's positions for this run, e.g. "
                            "`yarn:4` takes a 32k model to 128k (Qwen2.5's documented long-context setting); "
                            "without it a checkpoint's config.json rope_scaling is followed"),
    "MP_CUDA_GRAPH": ("false", "`true`: replay each iteration from one CUDA graph (GPU, PP=1); packed SFT samples "
                      "keep the variable-length kernel, their boundaries refilled in fixed-size buffers each replay"),
    "MP_SAVE": ("true", "`false`: save no checkpoint at all (throughput runs): no `--save`, SAVE_INTERVAL is ignored, "
                        "no free-space check, and a stop keeps nothing of the run"),
    "MP_LORA_RANK": ("0", "LoRA/DoRA adapter rank, e.g. `16`; `0`: full fine-tuning. With a rank, "
                         "PRETRAIN_CHECKPOINT_PATH is the frozen base (read, never copied or changed) and checkpoints "
                         "hold the adapters and their optimizer state only"),
    "MP_LORA_ALPHA": (f"{DEFAULT_ALPHA:g}", "LoRA's alpha: the adapters' update is scaled by alpha / rank"),
    "MP_LORA_DROPOUT": ("0", "dropout on the adapters' input (LoRA only)"),
    "MP_LORA_TARGETS": ("all", "layers with adapters: Megatron's `linear_qkv,linear_proj,linear_fc1,linear_fc2` or "
                               "PEFT's `q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj` (q/k/v and gate/up "
                               "only together: Megatron fuses them); `all`: every one"),
    "MP_LORA_METHOD": ("lora", "`lora`, or `dora` (weight-decomposed LoRA, PEFT's use_dora)"),
    "MP_SAVE_HF": ("false", "`true`: at every checkpoint save and at the end, also write a Hugging Face folder "
                            "`OUTPUT_BASEPATH/hf/iter_NNNNNNN` (safetensors, config.json, tokenizer and generation "
                            "files; a LoRA run's: its PEFT adapter folder), in the background from the saved "
                            "checkpoint; `merged`: a LoRA run's adapters merged into its base's full weights"),
    "MP_SAVE_HF_KEEP": ("", "with MP_SAVE_HF: keep the newest N Hugging Face folders, deleting older ones (default: "
                            "all)"),
    "MP_DRY_RUN": ("", "`1`: print the command that would run (and its environment) and run nothing; every "
                       "script of the project takes it"),
    "MP_TOKENIZER_PATH": ("", "tokenizer folder when the checkpoint has none (default: the embedded Qwen2.5 "
                              "tokenizer)"),
    "MP_NPROC_PER_NODE": ("", "processes per node instead of the GPU count (CPU: TP x PP x CP)"),
    "MEGATRON_PATCH_CACHE": ("~/.cache/megatron_patch", "where the embedded tokenizer and sample data are cached"),
    "WORLD_SIZE": ("", "ENV=dlc: number of nodes (set by the scheduler)"),
    "RANK": ("", "ENV=dlc: this node's rank"),
    "MASTER_ADDR": ("", "ENV=dlc: the rendezvous host"),
    "MASTER_PORT": ("", "ENV=dlc: the rendezvous port"),
    "KUBERNETES_CONTAINER_RESOURCE_GPU": ("", "ENV=dlc: GPUs per node"),
}


@dataclass(frozen=True)
class Launch:
    """One run's settings, as the user gave them (validate.settle makes the adjustments a layout needs)."""

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
    ac_method: str = "uniform"
    layers_per_virtual_stage: int | None = None
    sft_packing: bool = False
    fused_kernels: bool = True
    cuda_graph: bool = False
    save_checkpoints: bool = True  # MP_SAVE
    fp8_recipe: str = "delayed"
    fp8_bf16_layers: int = 0
    fp8_format: str = "hybrid"
    fp8_fprop_accumulation: str = "fast"
    tokenizer_path: str | None = None
    yarn_factor: float | None = None  # MP_ROPE_SCALING=yarn:F
    # The model to train, set by validate.settle: the checkpoint's config.json (model_config) where it has one,
    # else MODEL_SIZE's size-table entry; with MP_ROPE_SCALING's YaRN.
    model: Qwen25Size | None = None
    model_config: Path | None = None
    pretrain_is_hf: bool = False  # PRETRAIN_CHECKPOINT_PATH is a Hugging Face folder (set by validate.settle)
    lora: LoraSettings | None = None  # None: full fine-tuning
    save_hf: str = "false"  # MP_SAVE_HF: false, true or merged
    save_hf_keep: int | None = None  # MP_SAVE_HF_KEEP; None: every export stays

    @property
    def size(self) -> Qwen25Size:
        return self.model or QWEN2_5_SIZES[self.model_size]

    @property
    def model_name(self) -> str:
        """MODEL_SIZE, or for `auto` the size-table name of the checkpoint's shape ('custom' for a shape of its
        own): what run folders and messages call the model."""
        if self.model_size != "auto":
            return self.model_size
        return shape_name(self.size) or "custom"

    @property
    def trained_parameters(self) -> int:
        """Parameters the optimizer steps and checkpoints save: the whole model, or a LoRA run's adapters."""
        size = self.size
        if self.lora is None:
            return size.parameter_count
        return adapter_parameter_count(self.lora, size.num_layers, size.hidden_size, size.num_attention_heads,
                                       size.num_query_groups, size.ffn_hidden_size)

    @property
    def virtual_stages(self) -> int | None:
        """Virtual pipeline stages per pipeline rank (MP_VP gives layers per virtual stage)."""
        if self.layers_per_virtual_stage is None:
            return None
        return self.size.num_layers // self.pp // self.layers_per_virtual_stage

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
            f"mcore-qwen2.5-{self.model_name}-{kind}", f"lr-{self.lr:g}", f"minlr-{self.min_lr:g}",
            f"bs-{self.batch_size}", f"gbs-{self.global_batch_size}", f"seqlen-{self.seq_len}",
            f"pr-{self.precision}", f"tp-{self.tp}", f"pp-{self.pp}", f"cp-{self.cp}",
            f"ac-{self.activation_checkpointing}", f"do-{str(self.distributed_optimizer).lower()}",
            f"sp-{str(self.sp and self.tp > 1).lower()}", f"ti-{self.train_iters}", f"wi-{self.warmup_iters}",
        ]
        if self.size.rope_scaling:
            parts.append(f"yarn-{self.size.rope_scaling.factor:g}")
        if self.sft:
            parts.append(f"data-{self.dataset_type}" + ("-packed" if self.sft_packing else ""))
        if self.lora:
            parts.append(f"{self.lora.method}-r{self.lora.rank}-a{self.lora.alpha:g}"
                         + ("" if self.lora.targets == ALL_TARGETS else "-" + "+".join(self.lora.targets)))
        return "-".join(parts)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_basepath / "checkpoint" / self.run_name


def _int(name: str, value: str, minimum: int = 0) -> int:
    try:
        number = int(float(value)) if "e" in value.lower() else int(value)
    except ValueError:
        raise UserError(f"error: {name} must be a whole number, got '{value}'.") from None
    if number < minimum:
        raise UserError(f"error: {name} must be at least {minimum}, got {number}.")
    return number


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"error: {name} must be a number such as 1e-5, got '{value}'.") from None


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UserError(f"error: {name} must be one of {', '.join(choices)}; got '{value}'.")
    return value


def parse(argv: list[str], environ: dict[str, str]) -> Launch:
    if len(argv) != len(POSITIONAL):
        given = len(argv)
        missing = " ".join(POSITIONAL[given:]) if given < len(POSITIONAL) else ""
        raise UserError(
            f"error: run_mcore_qwen.sh takes {len(POSITIONAL)} arguments, got {given}."
            + (f" Missing: {missing}." if missing else " Remove the extra ones.")
            + f"\nusage: run_mcore_qwen.sh {' '.join(POSITIONAL)}"
        )
    a = dict(zip(POSITIONAL, argv))
    if a["MODEL_SIZE"] not in (*QWEN2_5_SIZES, "auto"):
        raise UserError(f"error: MODEL_SIZE must be one of {', '.join(QWEN2_5_SIZES)}, or auto (the model of "
                        f"PRETRAIN_CHECKPOINT_PATH's config.json); got '{a['MODEL_SIZE']}'.")

    def knob(name: str) -> str:
        return environ.get(name, "").strip() or ENV_KNOBS[name][0]

    vp, keep = knob("MP_VP"), knob("MP_SAVE_HF_KEEP")
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
        sp=parse_bool("SP", a["SP"]),
        distributed_optimizer=parse_bool("DO", a["DO"]),
        flash_attention=parse_bool("FL", a["FL"]),
        sft=parse_bool("SFT", a["SFT"]),
        activation_checkpointing=_choice("AC", a["AC"], AC_MODES),
        optimizer_offload=_choice("OPTIMIZER_OFFLOAD", a["OPTIMIZER_OFFLOAD"], OPTIMIZER_OFFLOAD_MODES),
        save_interval=_int("SAVE_INTERVAL", a["SAVE_INTERVAL"], 1),
        dataset_path=a["DATASET_PATH"],
        valid_dataset_path=a["VALID_DATASET_PATH"],
        pretrain_checkpoint=None if ckpt.lower() == "none" else ckpt,
        train_tokens_or_iters=_int("TRAIN_TOKENS_OR_ITERS", a["TRAIN_TOKENS_OR_ITERS"], 1),
        warmup_tokens_or_iters=_int("WARMUP_TOKENS_OR_ITERS", a["WARMUP_TOKENS_OR_ITERS"], 0),
        output_basepath=Path(a["OUTPUT_BASEPATH"]).absolute(),
        dataset_type=_choice("MP_DATASET_TYPE", knob("MP_DATASET_TYPE"), ("idxmap", "raw")),
        ac_layers=_int("MP_AC_LAYERS", knob("MP_AC_LAYERS"), 1),
        ac_method=_choice("MP_AC_METHOD", knob("MP_AC_METHOD"), AC_METHODS),
        layers_per_virtual_stage=_int("MP_VP", vp, 1) if vp else None,
        sft_packing=parse_bool("MP_SFT_PACKING", knob("MP_SFT_PACKING")),
        fused_kernels=parse_bool("MP_FUSED_KERNELS", knob("MP_FUSED_KERNELS")),
        cuda_graph=parse_bool("MP_CUDA_GRAPH", knob("MP_CUDA_GRAPH")),
        save_checkpoints=parse_bool("MP_SAVE", knob("MP_SAVE")),
        fp8_recipe=_choice("MP_FP8_RECIPE", knob("MP_FP8_RECIPE"), FP8_RECIPES),
        fp8_bf16_layers=_int("MP_FP8_BF16_LAYERS", knob("MP_FP8_BF16_LAYERS"), 0),
        fp8_format=_choice("MP_FP8_FORMAT", knob("MP_FP8_FORMAT"), FP8_FORMATS),
        fp8_fprop_accumulation=_choice("MP_FP8_FPROP_ACCUMULATION", knob("MP_FP8_FPROP_ACCUMULATION"),
                                       FP8_FPROP_ACCUMULATIONS),
        tokenizer_path=knob("MP_TOKENIZER_PATH") or None,
        yarn_factor=_yarn_factor(knob("MP_ROPE_SCALING")),
        lora=_lora(knob),
        save_hf=_choice("MP_SAVE_HF", knob("MP_SAVE_HF").lower(), SAVE_HF_MODES),
        save_hf_keep=_int("MP_SAVE_HF_KEEP", keep, 1) if keep else None,
    )


def _yarn_factor(value: str) -> float | None:
    """MP_ROPE_SCALING=yarn:F -> F (above 1); empty -> None."""
    if not value:
        return None
    kind, _, factor = value.partition(":")
    try:
        number = float(factor)
    except ValueError:
        number = 0.0
    if kind.strip().lower() != "yarn" or not number > 1:
        raise UserError(f"error: MP_ROPE_SCALING must be yarn:FACTOR with a factor above 1, e.g. yarn:4 (32k -> 128k "
                        f"positions); got '{value}'. YaRN is the only RoPE scaling offered.")
    return number


def _lora(knob) -> LoraSettings | None:
    rank = _int("MP_LORA_RANK", knob("MP_LORA_RANK"), 0)
    if rank == 0:
        return None
    return LoraSettings(rank, _float("MP_LORA_ALPHA", knob("MP_LORA_ALPHA")),
                        _float("MP_LORA_DROPOUT", knob("MP_LORA_DROPOUT")), parse_targets(knob("MP_LORA_TARGETS")),
                        _choice("MP_LORA_METHOD", knob("MP_LORA_METHOD"), METHODS))
