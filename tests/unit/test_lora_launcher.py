"""LoRA through the launcher and the entrypoint's own checks: MP_LORA_* become the entrypoint's flags (which
megatron-core's parser plus ours read back as the same settings), and every combination LoRA cannot run is
refused before torchrun with its own message."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from megatron_patch.errors import UserError
from megatron_patch.harness.launcher_runs import clean_environ
from megatron_patch.launch import positional, run as launch_run
from megatron_patch.lora.targets import LoraSettings
from test_launcher import GPU_TE, api_flags, argv, dry_run, paths, run_script  # noqa: F401  (paths: a fixture)
from test_launcher import test_invalid_combination_never_starts_torchrun as refused_before_torchrun

pytestmark = pytest.mark.timeout(120)

LORA = {"MP_LORA_RANK": "16"}


def finetune(paths, **overrides: str) -> list[str]:
    return argv(paths, **{"SFT": "true", "PRETRAIN_CHECKPOINT_PATH": str(paths.checkpoint), **overrides})


def test_lora_knobs_become_the_entrypoints_flags_and_name_the_run_folder(paths):
    run = dry_run(paths, finetune(paths), MP_LORA_RANK="16", MP_LORA_METHOD="dora",
                  MP_LORA_TARGETS="q_proj,k_proj,v_proj,o_proj")
    assert (run.value("--lora-rank"), run.value("--lora-alpha"), run.value("--lora-targets"),
            run.value("--lora-method"), run.value("--lora-dropout")) == ("16", "32", "linear_qkv,linear_proj",
                                                                         "dora", "0")
    # The base is the pretrained checkpoint, as for full fine-tuning; runs with other adapters never share a folder.
    assert run.value("--pretrained-checkpoint") == str(paths.checkpoint)
    assert run.value("--save").endswith("-data-idxmap-dora-r16-a32-linear_qkv+linear_proj")
    full = dry_run(paths, finetune(paths))
    assert not any(flag.startswith("--lora") for flag in full.flags)


def test_the_flags_read_back_as_the_same_settings(paths):
    """Knobs -> launcher flags -> megatron-core's parser plus ours -> the settings the model provider builds from."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_patch.megatron_flags import add_extra_args, expand_model_size

    environ = dict(LORA, MP_LORA_ALPHA="8", MP_LORA_DROPOUT="0.05", MP_LORA_TARGETS="linear_fc1,down_proj")
    planned, flags = api_flags(paths, environ=environ, SFT="true", PRETRAIN_CHECKPOINT_PATH=str(paths.checkpoint))
    parser = add_extra_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(expand_model_size(flags))
    assert LoraSettings.from_args(args) == planned.lora == LoraSettings(16, 8.0, 0.05, ("linear_fc1", "linear_fc2"))


def test_lora_keeps_te_layer_norm_linears_off_the_userbuffers_overlap(paths):
    _, flags = api_flags(paths, TP="2", SP="true", PRETRAIN_CHECKPOINT_PATH=str(paths.checkpoint))
    assert "--sequence-parallel" in flags and "--tp-comm-overlap" in flags
    _, flags = api_flags(paths, environ=LORA, TP="2", SP="true", PRETRAIN_CHECKPOINT_PATH=str(paths.checkpoint))
    assert "--sequence-parallel" in flags and "--tp-comm-overlap" not in flags


def test_a_lora_checkpoint_is_sized_by_its_adapters(paths):
    full = positional.parse(finetune(paths, MODEL_SIZE="7B"), {})
    lora = positional.parse(finetune(paths, MODEL_SIZE="7B"), LORA)
    # 7B, rank 16, every linear layer: 35.6M adapter parameters (peft's 40.4M less the A's that q/k/v and gate/up
    # share here), 16 bytes each in bf16 (master copy, Adam's moments).
    assert launch_run.checkpoint_bytes(lora) == 35_553_280 * 16
    assert launch_run.checkpoint_bytes(full) == full.size.parameter_count * 16


INVALID = [
    # (id, overrides, environment, machine, distinctive part of the message)
    ("negative_rank", {}, {"MP_LORA_RANK": "-8"}, None, "MP_LORA_RANK must be at least 0, got -8."),
    ("unknown_target", {}, dict(LORA, MP_LORA_TARGETS="q_proj,k_proj,v_proj,lm_head"), None,
     "MP_LORA_TARGETS names lm_head, which Qwen2.5 has no adapter for. Choose from linear_qkv, linear_proj"),
    ("part_of_a_fused_layer", {}, dict(LORA, MP_LORA_TARGETS="q_proj,v_proj"), None,
     "MP_LORA_TARGETS names q_proj, v_proj but not k_proj: Megatron computes q_proj, k_proj, v_proj in one fused "
     "layer (linear_qkv), and its adapter covers all of them. Name all of q_proj,k_proj,v_proj (or linear_qkv)"),
    ("method", {}, dict(LORA, MP_LORA_METHOD="qlora"), None, "MP_LORA_METHOD must be one of lora, dora; got 'qlora'"),
    ("alpha", {}, dict(LORA, MP_LORA_ALPHA="0"), None, "MP_LORA_ALPHA=0 must be positive"),
    ("dropout", {}, dict(LORA, MP_LORA_DROPOUT="1"), None, "MP_LORA_DROPOUT=1 must be at least 0 and below 1."),
    ("dora_dropout", {}, dict(LORA, MP_LORA_METHOD="dora", MP_LORA_DROPOUT="0.1"), None,
     "MP_LORA_METHOD=dora with MP_LORA_DROPOUT=0.1 is not supported"),
    ("no_base", {"PRETRAIN_CHECKPOINT_PATH": "none"}, LORA, None,
     "MP_LORA_RANK=16 trains adapters over a base model, but PRETRAIN_CHECKPOINT_PATH is none"),
    ("base_of_another_size", {"PRETRAIN_CHECKPOINT_PATH": "{checkpoint_05b}"}, LORA, None,
     "MODEL_SIZE=tiny does not match"),
    ("dora_fp8", {"PR": "fp8"}, dict(LORA, MP_LORA_METHOD="dora"), GPU_TE,
     "MP_LORA_METHOD=dora with PR=fp8 is not supported: the adapters (and DoRA's weight norms) are not fp8 kernels"),
    ("lora_fp8", {"PR": "fp8"}, LORA, GPU_TE, "MP_LORA_METHOD=lora with PR=fp8 is not supported"),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_what_lora_cannot_run_is_refused_before_torchrun(paths, case, monkeypatch, capsys):
    case_id, overrides, environ, machine, message = case
    overrides = {"SFT": "true", "PRETRAIN_CHECKPOINT_PATH": "{checkpoint}", **overrides}
    if machine is None:
        refused_before_torchrun(paths, (case_id, overrides, environ, message), monkeypatch, capsys)
        return
    # A GPU with Transformer Engine, which this machine lacks: the launcher's checks only.
    with pytest.raises(UserError) as err:
        api_flags(paths, machine, environ, **{k: v.format(checkpoint=paths.checkpoint) for k, v in overrides.items()})
    assert message in str(err.value)


def test_a_refusal_through_the_shell_script(paths):
    proc = run_script(finetune(paths, PRETRAIN_CHECKPOINT_PATH="none"),
                      clean_environ(MP_TOKENIZER_PATH=str(paths.tokenizer), **LORA), paths.root)
    assert proc.returncode == 2 and proc.stderr.startswith("error: MP_LORA_RANK=16 trains adapters"), proc.stderr
    assert not paths.out.exists()


def entrypoint_args(**changes):
    args = dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="all", lora_method="lora", fp8=None,
                pretrained_checkpoint="/base", pretrained_hf=None, ckpt_format="torch_dist")
    return SimpleNamespace(**dict(args, **changes))


@pytest.mark.parametrize("changes,message", [
    ({"lora_rank": -1}, "error: --lora-rank must be at least 1 for LoRA (0: full fine-tuning), got -1."),
    ({"pretrained_checkpoint": None},
     "error: --lora-rank needs the base model: --pretrained-hf (a Hugging Face folder) or --pretrained-checkpoint"),
    ({"ckpt_format": "torch"}, "--ckpt-format torch is not supported"),
    ({"fp8": "hybrid", "lora_method": "dora"}, "error: --lora-method=dora with --fp8-format is not supported"),
    ({"lora_targets": "up_proj"}, "error: --lora-targets names up_proj but not gate_proj"),
    ({"pretrained_checkpoint": "/nowhere"}, "error: the LoRA base checkpoint /nowhere holds no Megatron checkpoint"),
])
def test_the_entrypoint_refuses_the_same_for_a_direct_torchrun(changes, message):
    from megatron_patch.lora.attach import settle_args

    with pytest.raises(UserError) as err:
        settle_args(entrypoint_args(**changes))
    assert message in str(err.value)


def test_the_entrypoint_moves_the_base_out_of_megatrons_reach(tmp_path):
    """Megatron would load --pretrained-checkpoint into the adapted model; the model provider loads it instead."""
    from megatron_patch.lora.attach import settle_args

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "latest_checkpointed_iteration.txt").write_text("release")
    args = entrypoint_args(pretrained_checkpoint=str(tmp_path / "base"))
    settle_args(args)
    assert args.pretrained_checkpoint is None and args.lora_base_checkpoint == str(tmp_path / "base")
    assert args.lora_base_iteration == "release"  # the record the checkpoints keep
    full = entrypoint_args(lora_rank=0)
    settle_args(full)
    assert full.pretrained_checkpoint == "/base" and not hasattr(full, "lora_base_checkpoint")


def test_optimizer_offload_is_sized_by_what_trains(paths, monkeypatch):
    """OPTIMIZER_OFFLOAD=auto keeps on the GPU what fits: a LoRA run's optimizer state is its adapters'."""
    from megatron_patch import hardware

    monkeypatch.setattr(hardware, "free_gpu_bytes", lambda: 2**28)  # 256 MiB free on each of 8 GPUs
    overrides = dict(MODEL_SIZE="0.5B", OPTIMIZER_OFFLOAD="auto", PRETRAIN_CHECKPOINT_PATH=str(paths.checkpoint_05b))
    _, full = api_flags(paths, **overrides)
    _, lora = api_flags(paths, environ=LORA, **overrides)
    assert float(full[full.index("--optimizer-offload-fraction") + 1]) > 0.5
    assert float(lora[lora.index("--optimizer-offload-fraction") + 1]) == 0.0
