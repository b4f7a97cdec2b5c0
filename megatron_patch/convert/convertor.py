"""The conversion engine: walks the Qwen2.5 mapping table in either direction.

HF -> Megatron (`hf_to_mcore`): HF tensors are read one at a time, fused by the table and copied into the
training entrypoint's own model (built by `megatron_patch.model.model_provider`, TP=1/PP=1), which megatron's
`save_checkpoint` writes as a `torch_dist` release checkpoint. torch_dist stores global tensors, so training
loads it with any TP/PP (dist_checkpointing reshards on load).

Megatron -> HF (`mcore_to_hf`): the model weights of a torch_dist checkpoint (any TP/PP; optimizer state is never
read) are read one decoder layer at a time as global tensors, split by the table and written to safetensors
shards that are flushed as they fill. A LoRA run's checkpoint (adapters only) becomes a PEFT adapter folder, or
with --merge-lora the weights of the base it recorded with the adapters merged in (megatron_patch.lora.peft_export).

Every input is validated before anything is written (a truncated or corrupt file is named, with what is wrong);
output goes to a hidden folder beside SAVE_DIR and takes its place only when complete (`StagedFolder`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_patch.convert.hf_io import DTYPES, HF_DTYPE_NAMES, HFCheckpointReader, HFShardWriter
from megatron_patch.convert.mapping import (
    HF_IGNORED_SUFFIXES,
    Mapping,
    TiedLMHead,
    hf_shapes,
    mcore_shapes,
    qwen2_5_mappings,
    stacked_key,
)
from megatron_patch.atomic_write import StagedFolder
from megatron_patch.checkpoint_state import iteration_folder_name
from megatron_patch.convert.staging import check_save_dir
from megatron_patch.convert.torch_dist_io import checkpoint_args, mcore_tensor_metadata, read_mcore_tensors
from megatron_patch.errors import UserError
from megatron_patch.hf_checkpoint import TOKENIZER_FILES, is_hf_checkpoint
from megatron_patch.model_sizes import (
    Qwen25Size,
    YarnScaling,
    following_config_note,
    hf_config_with,
    layout_problems,
    model_from_hf_config,
    non_shape_differences,
    read_checkpoint_json,
    resolve_size,
)

# Files that travel with the weights: the HF config and everything the tokenizer and generation need.
SIDE_FILES = ("config.json", *TOKENIZER_FILES)
TRACKER_FILE = "latest_checkpointed_iteration.txt"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


@dataclass
class LogitCheck:
    max_abs_logit_diff: float
    hf_loss: float
    mcore_loss: float

    def __str__(self) -> str:
        return (f"max abs logit diff {self.max_abs_logit_diff:.3e}; loss HF {self.hf_loss:.8f} vs Megatron "
                f"{self.mcore_loss:.8f} (diff {abs(self.hf_loss - self.mcore_loss):.3e})")


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _precision(pr: str) -> torch.dtype:
    if pr not in DTYPES:
        raise UserError(f"error: PR must be one of {', '.join(DTYPES)}, got '{pr}'.")
    return DTYPES[pr]


def _size(model_size: str, config_dir: Path, label: str, tp: int, pp: int) -> Qwen25Size:
    """The shape config_dir's config.json gives (checked against MODEL_SIZE), splittable into TP x PP."""
    if not config_dir.is_dir():
        raise UserError(f"error: {label} {config_dir} does not exist (expected a HF checkpoint folder).")
    size = _config_size(model_size, config_dir)
    check_parallel_layout(size, tp, pp)
    return size


def _config_size(model_size: str, config_dir: Path) -> Qwen25Size:
    config = config_dir / "config.json"
    if not config.is_file():
        raise UserError(f"error: no config.json in {config_dir}: the HF folder must hold the model's config.json.")
    model = resolve_size(model_size, config_dir)
    note = following_config_note(model, config, model_size)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return model


def check_parallel_layout(size: Qwen25Size, tp: int, pp: int) -> None:
    """TP/PP of the older script: torch_dist reshards on load, so they only have to be a layout training can use."""
    problems = layout_problems(size, tp, pp)
    if problems:
        raise UserError("error: " + "; ".join(problems) + ". The checkpoint itself loads with any valid TP/PP.")


def _copy_side_files(src_dir: Path, dst_dir: Path, dtype: torch.dtype | None = None,
                     model: Qwen25Size | None = None, only: tuple[str, ...] = SIDE_FILES) -> list[str]:
    """The config and tokenizer files (or `only` those); with `dtype` the config names it, with `model` it records
    that model's RoPE and norm settings."""
    copied = []
    for name in only:
        src = src_dir / name
        if not src.is_file():
            continue
        if name == "config.json" and dtype is not None:
            config = json.loads(src.read_text())
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for k in keys:
                config[k] = HF_DTYPE_NAMES[dtype]
            if model is not None:
                config = hf_config_with(config, model)
            (dst_dir / name).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copy2(src, dst_dir / name)
        copied.append(name)
    return copied


def _progress(iterable, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="tensor", dynamic_ncols=True)


def _use_device(use_cuda: bool) -> None:
    """USE_CUDA=true needs a visible GPU (a clear error, never a silent CPU run); false hides any GPU so
    megatron takes the CPU/gloo path of megatron_patch.patches.cpu_backend."""
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError("error: USE_CUDA=true but no CUDA GPU is visible to this process. Run with "
                            "USE_CUDA=false to convert on the CPU.")
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if torch.cuda.is_available():  # CUDA was initialised before we could hide it
            raise UserError("error: USE_CUDA=false, but CUDA was already initialised in this process; set "
                            "CUDA_VISIBLE_DEVICES= before starting it.")


# ---------------------------------------------------------------------------------------------------------------
# HF -> Megatron
# ---------------------------------------------------------------------------------------------------------------


def validate_hf_checkpoint(reader: HFCheckpointReader, size: Qwen25Size) -> None:
    """Every tensor the table needs is present with its shape, and nothing unknown is there."""
    expected = hf_shapes(size)
    present = set(reader.names())
    ignorable = {n for n in present if n.endswith(HF_IGNORED_SUFFIXES)}
    if size.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the (identical) head anyway
    problems = []
    missing = set(expected) - present
    if missing:
        problems.append(f"{len(missing)} tensors missing from {reader.folder}: {_listing(missing)}")
    unknown = present - set(expected) - ignorable
    if unknown:
        problems.append(f"{len(unknown)} tensors in {reader.folder} that a Qwen2.5 of this shape does not have: "
                        f"{_listing(unknown)}")
    bad = [f"{n}: {reader.shape(n)} (expected {expected[n]})" for n in sorted(present & set(expected))
           if reader.shape(n) != expected[n]]
    if bad:
        problems.append("tensors with the wrong shape for this config: " + "; ".join(bad[:8])
                        + (f" ... and {len(bad) - 8} more" if len(bad) > 8 else ""))
    if problems:
        raise UserError("error: the HF checkpoint does not match its Qwen2.5 config:\n  " + "\n  ".join(problems))


def hf_to_mcore(model_size: str, load_dir: str | Path, save_dir: str | Path, precision: str = "bf16",
                use_cuda: bool = False, check_logits: bool = False, tp: int = 1, pp: int = 1,
                overwrite: bool = False) -> LogitCheck | None:
    """Convert a HF Qwen2.5 folder into a torch_dist release checkpoint (+ config and tokenizer) in save_dir."""
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    dtype = _precision(precision)
    size = _size(model_size, load_dir, "LOAD_DIR", tp, pp)
    reader = HFCheckpointReader(load_dir)
    validate_hf_checkpoint(reader, size)
    check_save_dir(save_dir, overwrite, {"LOAD_DIR": load_dir})
    _use_device(use_cuda)

    from megatron_patch.convert import mcore_runtime

    mcore_runtime.init_megatron(size, dtype)
    model = mcore_runtime.build_model()
    weights = mcore_runtime.named_weights(model)
    table = [m for m in qwen2_5_mappings(size) if not isinstance(m, TiedLMHead)]
    unmapped = set(weights) - {m.mcore for m in table}
    if unmapped:
        raise RuntimeError(f"the Megatron model has parameters the mapping table does not cover: "
                           f"{_listing(unmapped)}")
    check = None
    with StagedFolder(save_dir, "convert") as out, torch.no_grad():
        for m in _progress(table, "HF -> Megatron"):
            tensor = m.to_mcore([reader.get(name) for name in m.hf], size)
            target = weights[m.mcore]
            if tuple(tensor.shape) != tuple(target.shape):
                raise RuntimeError(f"{m.mcore}: built {tuple(tensor.shape)} from {', '.join(m.hf)} but the "
                                   f"model has {tuple(target.shape)}")
            target.copy_(tensor)
            del tensor
        print(f"saving the torch_dist checkpoint (megatron save_checkpoint) into {out}", flush=True)
        mcore_runtime.save_release_checkpoint(model, out)
        _copy_side_files(load_dir, out)
        if check_logits:
            for p in model.parameters():  # a load that misses a tensor must show up in the logits
                p.zero_()
            mcore_runtime.load_checkpoint_into(model, out)
            check = compare_logits(load_dir, model.float())
            print(f"check-logits (HF vs converted Megatron, fp32): {check}", flush=True)
    print(f"wrote a torch_dist checkpoint of Qwen2.5 ({precision}) to {save_dir}", flush=True)
    return check


# ---------------------------------------------------------------------------------------------------------------
# Megatron -> HF
# ---------------------------------------------------------------------------------------------------------------


def find_mcore_checkpoint(load_dir: Path) -> Path:
    """The torch_dist folder to read: LOAD_DIR itself, or the newest iteration of a training --save folder."""
    if not load_dir.is_dir():
        raise UserError(f"error: LOAD_DIR {load_dir} does not exist (expected a Megatron checkpoint folder).")
    tracker = load_dir / TRACKER_FILE
    if (load_dir / "metadata.json").is_file():
        ckpt = load_dir
    elif tracker.is_file():
        tag = tracker.read_text().strip()
        if tag != "release" and not tag.isdigit():
            iterations = sorted(load_dir.glob("iter_*")) or [load_dir / "iter_0000100"]
            raise UserError(f"error: {tracker} should name an iteration (a number or 'release') but reads {tag!r} "
                            "(a run killed while writing it?); pass one iteration folder (e.g. "
                            f"{iterations[-1]}) as LOAD_DIR instead.")
        ckpt = load_dir / iteration_folder_name(tag)
        if not ckpt.is_dir():
            raise UserError(f"error: {tracker} names iteration '{tag}', but {ckpt} is missing.")
    else:
        raise UserError(f"error: no Megatron checkpoint in {load_dir}: expected {TRACKER_FILE} (a training --save "
                        "folder) or metadata.json (one iteration folder).")
    meta = ckpt / "metadata.json"
    backend = read_checkpoint_json(meta).get("sharded_backend") if meta.is_file() else "torch (legacy)"
    if backend != "torch_dist":
        raise UserError(f"error: {ckpt} is a '{backend}' checkpoint; only torch_dist is read. Re-save it from "
                        "training with --ckpt-format torch_dist.")
    return ckpt


def validate_mcore_checkpoint(ckpt: Path, size: Qwen25Size) -> dict:
    """Model tensors of the checkpoint against the table (names and global shapes); returns their metadata."""
    meta = mcore_tensor_metadata(ckpt)
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in mcore_shapes(size).items():
        key, layer = stacked_key(name)
        expected[key] = (size.num_layers, *shape) if layer is not None else shape
    problems = []
    missing = set(expected) - set(meta)
    if missing:
        problems.append(f"{len(missing)} model tensors missing: {_listing(missing)}")
    unknown = set(meta) - set(expected)
    if unknown:
        problems.append(f"{len(unknown)} model tensors that a Qwen2.5 of this shape does not have: "
                        f"{_listing(unknown)}")
    bad = [f"{k}: {tuple(meta[k].size)} (expected {expected[k]})" for k in sorted(set(meta) & set(expected))
           if tuple(meta[k].size) != expected[k]]
    if bad:
        problems.append("tensors with the wrong shape: " + "; ".join(bad[:8]))
    ckpt_args = checkpoint_args(ckpt)
    if ckpt_args is not None:
        groups = getattr(ckpt_args, "num_query_groups", None) if getattr(ckpt_args, "group_query_attention", False) \
            else getattr(ckpt_args, "num_attention_heads", None)
        for what, theirs, ours in (("num_attention_heads", getattr(ckpt_args, "num_attention_heads", None),
                                    size.num_attention_heads),
                                   ("num_query_groups", groups, size.num_query_groups)):
            if theirs is not None and theirs != ours:
                problems.append(f"{what}: {theirs} (checkpoint args) vs {ours} (MODEL_SIZE/config.json)")
    if problems:
        raise UserError(f"error: the Megatron checkpoint {ckpt} does not match the Qwen2.5 config:\n  "
                              + "\n  ".join(problems))
    return meta


def trained_model(ckpt_args, model: Qwen25Size) -> Qwen25Size:
    """`model` (HF_DIR's config.json) with the RoPE and norm settings the checkpoint's saved arguments trained
    with, e.g. the YaRN scaling of a run with MP_ROPE_SCALING=yarn:F."""
    if ckpt_args is None:
        return model
    yarn = None
    if getattr(ckpt_args, "position_embedding_type", "rope") == "yarn":
        # megatron-core's own fallbacks where a flag was not given
        yarn = YarnScaling(float(ckpt_args.rotary_scaling_factor),
                           int(ckpt_args.yarn_original_max_position_embeddings or 4096),
                           float(ckpt_args.yarn_beta_fast or 32.0), float(ckpt_args.yarn_beta_slow or 1.0))
    return replace(model, rope_theta=float(getattr(ckpt_args, "rotary_base", model.rope_theta)),
                   rms_norm_eps=getattr(ckpt_args, "norm_epsilon", model.rms_norm_eps), rope_scaling=yarn)


def _groups(table: list[Mapping]) -> list[list[Mapping]]:
    """The table cut into read units: each decoder layer, and each tensor outside the layers."""
    groups: list[list[Mapping]] = []
    for m in table:
        layer = stacked_key(m.mcore)[1]
        if layer is not None and groups and stacked_key(groups[-1][0].mcore)[1] == layer:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups


def mcore_to_hf(model_size: str, load_dir: str | Path, save_dir: str | Path, hf_dir: str | Path | None,
                precision: str = "bf16", use_cuda: bool = False, check_logits: bool = False,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tp: int = 1, pp: int = 1,
                overwrite: bool = False, merge_lora: bool = False) -> LogitCheck | None:
    """Convert a torch_dist checkpoint into HF safetensors shards with HF_DIR's config and tokenizer. A LoRA run's
    checkpoint becomes a PEFT adapter folder over HF_DIR, or with `merge_lora` the base's weights with the
    adapters merged in."""
    load_dir, save_dir = Path(load_dir), Path(save_dir)
    dtype = _precision(precision)
    if hf_dir is None or str(hf_dir) == "":
        raise UserError("error: Megatron -> HF (MG2HF=true) needs HF_DIR: the reference HF checkpoint folder "
                        "whose config.json and tokenizer files go with the output.")
    hf_dir = Path(hf_dir)
    size = _size(model_size, hf_dir, "HF_DIR", tp, pp)
    ckpt = find_mcore_checkpoint(load_dir)
    check_save_dir(save_dir, overwrite, {"LOAD_DIR": load_dir, "HF_DIR": hf_dir})
    _use_device(use_cuda)

    from megatron_patch.lora.peft_export import lora_checkpoint, write_adapter

    mcore_tensor_metadata(ckpt)  # a missing or truncated file is named before anything else reads the folder
    ckpt_args = checkpoint_args(ckpt)
    lora = lora_checkpoint(ckpt, ckpt_args)
    if merge_lora and lora is None:
        raise UserError(f"error: --merge-lora: {ckpt} is a full checkpoint, not a LoRA run's; drop --merge-lora.")
    trained = trained_model(ckpt_args, size)
    if trained != size:
        print(f"note: the checkpoint was trained with {', '.join(non_shape_differences(size, trained, 'HF_DIR'))}: "
              "the output's config.json records it.", file=sys.stderr, flush=True)
    check = None
    with StagedFolder(save_dir, "convert") as out, torch.no_grad():
        if lora is not None and not merge_lora:
            written = f"a PEFT adapter ({write_adapter(lora, size, out, hf_dir.resolve(), dtype)} tensors)"
            _copy_side_files(hf_dir, out, only=TOKENIZER_FILES)
        else:
            written = f"{_write_hf_weights(ckpt, lora, size, out, dtype, max_shard_bytes)} safetensors shard(s)"
            _copy_side_files(hf_dir, out, dtype, trained if trained != size else None)
        if check_logits:
            check = _check_mcore_against_hf(trained, ckpt, out, lora, hf_dir if lora and not merge_lora else None)
            print(f"check-logits (converted HF vs Megatron checkpoint, fp32): {check}", flush=True)
    print(f"wrote {written} of Qwen2.5 ({precision}) to {save_dir}", flush=True)
    return check


def _write_hf_weights(ckpt: Path, lora, size: Qwen25Size, out: Path, dtype: torch.dtype,
                      max_shard_bytes: int) -> int:
    """The model's weights as HF shards in `out` (a LoRA run's: its base's, adapters merged); returns the number of
    shards."""
    from megatron_patch.lora.peft_export import merge_adapters

    read_group = _weight_reader(ckpt if lora is None else lora.base, ckpt, size)
    adapter_meta = mcore_tensor_metadata(ckpt) if lora is not None else None
    table = qwen2_5_mappings(size)
    writer = HFShardWriter(out, max_shard_bytes)
    progress = _progress(None, "Megatron -> HF", total=len(table))
    for group in _groups(table):
        tensors = read_group(group)
        if lora is not None:
            merge_adapters(tensors, lora, adapter_meta)
        for m in group:
            if not isinstance(m, TiedLMHead):
                for name, t in zip(m.hf, m.to_hf(tensors.pop(m.mcore), size)):
                    writer.add(name, t.to(dtype))
            progress.update(1)
    progress.close()
    return len(writer.close())


def _weight_reader(weights: Path, ckpt: Path, size: Qwen25Size):
    """A function giving the whole Megatron tensors of a group of mappings from `weights`: a torch_dist folder, or
    (a LoRA run's base) a Hugging Face folder, through the table. Both are checked against the model first."""
    if weights != ckpt and not weights.is_dir():
        raise UserError(f"error: {ckpt} holds LoRA adapters trained over the base checkpoint {weights}, which is "
                        "missing; merged weights need it. Restore it, or export the adapter alone (no --merge-lora).")
    if is_hf_checkpoint(weights):
        from megatron_patch.convert.hf_direct import read_mcore_tensors_from_hf

        reader = HFCheckpointReader(weights)
        validate_hf_checkpoint(reader, size)
        return lambda group: read_mcore_tensors_from_hf(reader, group, size)
    meta = validate_mcore_checkpoint(weights, size)

    def read_group(group: list[Mapping]) -> dict[str, torch.Tensor]:
        wanted = [m.mcore for m in group if not isinstance(m, TiedLMHead)]
        return read_mcore_tensors(weights, wanted, meta) if wanted else {}

    return read_group


def _check_mcore_against_hf(size: Qwen25Size, ckpt: Path, hf_out: Path, lora=None,
                            adapter_base: Path | None = None) -> LogitCheck:
    """The checkpoint through megatron.training's own load_checkpoint into the entrypoint's model (a LoRA run's:
    its base, then its adapters), vs the HF output through transformers (a PEFT adapter: over `adapter_base`)."""
    from megatron_patch.convert import mcore_runtime

    mcore_runtime.init_megatron(size, torch.float32)
    model = mcore_runtime.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    if lora is not None and is_hf_checkpoint(lora.base):
        from megatron_patch.convert.hf_direct import load_hf_weights

        load_hf_weights(model, lora.base)
    else:
        _load_iteration(model, ckpt if lora is None else lora.base)
    if not any(p.abs().sum() > 0 for p in model.parameters()):
        raise UserError(f"error: --check-logits: megatron's load_checkpoint found nothing to load under "
                        f"{ckpt.parent}; pass the checkpoint's top folder (with latest_checkpointed_iteration.txt).")
    if lora is not None:
        from megatron_patch.lora.attach import add_adapters, adapters_only_in_checkpoints

        add_adapters(model, lora.settings, seed=0)  # values replaced by the checkpoint's
        adapters_only_in_checkpoints(model)
        _load_iteration(model, ckpt)
    if adapter_base is None:
        return compare_logits(hf_out, model)
    return compare_logits(adapter_base, model, adapter_dir=hf_out)


def _load_iteration(model, folder: Path) -> None:
    """One torch_dist iteration (or release) folder into `model`, through megatron.training's load_checkpoint."""
    from megatron.training import get_args

    from megatron_patch.convert import mcore_runtime

    get_args().ckpt_step = int(folder.name.removeprefix("iter_")) if folder.name.startswith("iter_") else None
    mcore_runtime.load_checkpoint_into(model, folder.parent)


# ---------------------------------------------------------------------------------------------------------------
# Logit parity
# ---------------------------------------------------------------------------------------------------------------


def check_tokens(size: Qwen25Size, batch: int = 2, seq_length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(size.vocab_size, 151_643), (batch, seq_length), generator=generator)


@torch.no_grad()
def compare_logits(hf_dir: Path, mcore_model, tokens: torch.Tensor | None = None,
                   adapter_dir: Path | None = None) -> LogitCheck:
    """HF transformers (with `adapter_dir`: peft's PeftModel of that adapter over it) and a Megatron model on the
    same tokens, both fp32: max abs logit difference and each one's mean next-token loss."""
    from transformers import AutoModelForCausalLM

    from megatron_patch.convert import mcore_runtime

    if tokens is None:
        tokens = check_tokens(model_from_hf_config(read_checkpoint_json(Path(hf_dir) / "config.json")))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise UserError("error: --check-logits of a PEFT adapter loads it with peft, which is not installed "
                            "here: pip install peft (or convert without --check-logits).") from None
        hf = PeftModel.from_pretrained(hf, adapter_dir).eval()
    hf_out = hf(input_ids=tokens, labels=tokens)
    mcore_logits = mcore_runtime.forward(mcore_model, tokens).float().cpu()
    # Megatron's labels are the next tokens; the last position has none (masked out of the mean).
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    mcore_losses = mcore_runtime.forward(mcore_model, tokens, labels).float().cpu()
    return LogitCheck(
        max_abs_logit_diff=(hf_out.logits.float() - mcore_logits).abs().max().item(),
        hf_loss=hf_out.loss.item(),
        mcore_loss=mcore_losses[:, :-1].mean().item(),
    )
