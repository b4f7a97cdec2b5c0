"""LoRA/DoRA settings and target names, without torch: the launcher checks them before torchrun, the entrypoint
builds adapters from them, the convertor exports with them.

Megatron fuses q/k/v into one layer (linear_qkv) and gate/up into another (linear_fc1); one adapter covers each
fused layer (a shared A, one B whose rows are the fused layer's rows). PEFT's names for the HF modules are
accepted, but only in whole groups: `q_proj` alone would need an adapter on part of linear_qkv's rows, which this
design does not have (name q_proj,k_proj,v_proj or linear_qkv instead). On export the shared A becomes identical
A's for the group's HF modules and B's rows are split exactly (megatron_patch.convert.mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patch.errors import UserError

# Megatron module -> the HF Qwen2 modules (PEFT's target names) it holds, in the order the fused rows are stacked.
HF_MODULES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
ALL_TARGETS = tuple(HF_MODULES)
ALL_WORDS = ("all", "all-linear")  # PEFT's word for every linear layer but the output head
METHODS = ("lora", "dora")
# Where each Megatron module sits inside a decoder layer.
PARENTS = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}
DEFAULT_ALPHA = 32.0  # ms-swift's and Megatron-Bridge's default
HF_BASE = "hf"  # the base iteration a LoRA run records when its base is a Hugging Face folder


@dataclass(frozen=True)
class LoraSettings:
    """One run's adapter settings. scaling = alpha / rank, as PEFT's LoRA (not rsLoRA)."""

    rank: int
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    method: str = "lora"

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def dora(self) -> bool:
        return self.method == "dora"

    @property
    def hf_targets(self) -> list[str]:
        """PEFT's target_modules for these targets."""
        return [hf for target in self.targets for hf in HF_MODULES[target]]

    @classmethod
    def from_args(cls, args) -> "LoraSettings | None":
        """The entrypoint's --lora-* flags (None: full fine-tuning)."""
        if not getattr(args, "lora_rank", 0):
            return None
        targets = parse_targets(args.lora_targets, "--lora-targets")
        return cls(args.lora_rank, args.lora_alpha, args.lora_dropout, targets, args.lora_method)


def parse_targets(text: str, source: str = "MP_LORA_TARGETS") -> tuple[str, ...]:
    """'linear_qkv,linear_fc2', 'q_proj,k_proj,v_proj,o_proj' or 'all' -> Megatron targets in model order.
    `source` names the setting in messages."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names or any(n in ALL_WORDS for n in names):
        return ALL_TARGETS
    hf_owner = {hf: target for target, hfs in HF_MODULES.items() for hf in hfs}
    unknown = [n for n in names if n not in HF_MODULES and n not in hf_owner]
    if unknown:
        raise UserError(f"error: {source} names {', '.join(unknown)}, which Qwen2.5 has no adapter for. Choose from "
                        f"{', '.join(ALL_TARGETS)} (Megatron's names), {', '.join(hf_owner)} (PEFT's names), or "
                        "all.")
    chosen = {n for n in names if n in HF_MODULES}
    for target, hfs in HF_MODULES.items():
        named = [hf for hf in hfs if hf in names]
        if named and len(named) < len(hfs):
            missing = [hf for hf in hfs if hf not in named]
            raise UserError(f"error: {source} names {', '.join(named)} but not {', '.join(missing)}: Megatron computes "
                            f"{', '.join(hfs)} in one fused layer ({target}), and its adapter covers all of them. "
                            f"Name all of {','.join(hfs)} (or {target}), or none.")
        if named:
            chosen.add(target)
    return tuple(t for t in ALL_TARGETS if t in chosen)


# How each setting is spelled where the user gave it: the launcher's knobs, the entrypoint's flags.
KNOB_NAMES = {"rank": "MP_LORA_RANK", "alpha": "MP_LORA_ALPHA", "dropout": "MP_LORA_DROPOUT",
              "targets": "MP_LORA_TARGETS", "method": "MP_LORA_METHOD"}
FLAG_NAMES = {key: "--lora-" + key for key in KNOB_NAMES}


def settings_problems(settings: LoraSettings, fp8: str | None, names: dict[str, str]) -> list[str]:
    """What stops a LoRA run with these settings, one line each; `fp8` says how the run asks for fp8 ('PR=fp8'),
    None when it does not; `names` spells the settings (KNOB_NAMES or FLAG_NAMES)."""
    errors = []
    if settings.alpha <= 0:
        errors.append(f"{names['alpha']}={settings.alpha:g} must be positive: the update is scaled by alpha/rank.")
    if not 0 <= settings.dropout < 1:
        errors.append(f"{names['dropout']}={settings.dropout:g} must be at least 0 and below 1.")
    elif settings.dora and settings.dropout > 0:
        errors.append(f"{names['method']}=dora with {names['dropout']}={settings.dropout:g} is not supported: DoRA "
                      "with dropout runs each base layer a second time on the dropped-out input. Set "
                      f"{names['dropout']}=0, or {names['method']}=lora.")
    if fp8:
        errors.append(f"{names['method']}={settings.method} with {fp8} is not supported: the adapters (and DoRA's "
                      "weight norms) are not fp8 kernels. Use PR=bf16 (7B LoRA fits one 80 GB GPU in bf16).")
    return errors

def adapter_dims(target: str, hidden: int, heads: int, groups: int, ffn: int) -> tuple[int, int]:
    """(input features, output features) of the whole (unsplit) Megatron layer a target adapts."""
    head_dim = hidden // heads
    return {
        "linear_qkv": (hidden, (heads + 2 * groups) * head_dim),
        "linear_proj": (heads * head_dim, hidden),
        "linear_fc1": (hidden, 2 * ffn),
        "linear_fc2": (ffn, hidden),
    }[target]


def adapter_parameter_count(settings: LoraSettings, layers: int, hidden: int, heads: int, groups: int,
                            ffn: int) -> int:
    """Trainable parameters of the whole model's adapters: A [rank, in] and B [out, rank] per target and layer,
    and DoRA's magnitude [out]."""
    per_layer = 0
    for target in settings.targets:
        fan_in, fan_out = adapter_dims(target, hidden, heads, groups, ffn)
        per_layer += settings.rank * (fan_in + fan_out) + (fan_out if settings.dora else 0)
    return layers * per_layer


def trainable_parameters_line(trainable: int, base: int) -> str:
    """PEFT's print_trainable_parameters line; `base` is the frozen model's count."""
    total = trainable + base
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def add_lora_args(parser) -> None:
    """The entrypoint's LoRA flags (the launcher maps MP_LORA_* onto them)."""
    group = parser.add_argument_group("LoRA/DoRA fine-tuning (megatron_patch.lora)")
    group.add_argument("--lora-rank", type=int, default=0,
                       help="adapter rank; 0: full fine-tuning. The base weights come from --pretrained-checkpoint, "
                            "are frozen and never saved")
    group.add_argument("--lora-alpha", type=float, default=DEFAULT_ALPHA, help="scaling alpha (update x alpha/rank)")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    group.add_argument("--lora-targets", default="all",
                       help=f"comma-separated layers: {', '.join(ALL_TARGETS)} or PEFT's q_proj,...,down_proj "
                            "(q/k/v and gate/up together), or all")
    group.add_argument("--lora-method", choices=METHODS, default="lora", help="lora, or dora (weight-decomposed)")
