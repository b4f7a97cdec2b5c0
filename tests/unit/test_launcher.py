"""run_mcore_qwen.sh without training: the flags each argument combination produces (MP_DRY_RUN=1), and the
invalid combinations that stop before torchrun, each with its own message.

The shell script is driven as a user would (`sh`/`bash`, from a folder outside the repository); combinations that
need a GPU with Transformer Engine (fp8, AC=offload, OPTIMIZER_OFFLOAD=auto) go through megatron_patch.launcher
with a pretend Machine, since neither exists here (megatron_patch.launch's modules: parse, settle, problems,
flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_patch import hardware
from megatron_patch.errors import UserError
from megatron_patch.launch import positional, flags as launch_flags, run as launch_run, validate
from megatron_patch.launch.positional import POSITIONAL
from megatron_patch.launch.machine import Machine, detect_machine
from megatron_patch.model_sizes import get_size

from megatron_patch.harness.launcher_runs import clean_environ
from training_utils import REPO_ROOT  # noqa: E402
SCRIPT = REPO_ROOT / "examples" / "qwen2_5" / "run_mcore_qwen.sh"

pytestmark = pytest.mark.timeout(120)

# The pre-training command of the best-practice guide, MODEL_SIZE tiny; paths are filled in by `argv()`.
BEST_PRACTICE = dict(
    ENV="dsw", MODEL_SIZE="tiny", BATCH_SIZE="1", GLOBAL_BATCH_SIZE="8", LR="1e-5", MIN_LR="1e-6", SEQ_LEN="128",
    PAD_LEN="128", PR="bf16", TP="1", PP="1", CP="1", SP="true", DO="true", FL="true", SFT="false", AC="false",
    OPTIMIZER_OFFLOAD="false", SAVE_INTERVAL="100000", TRAIN_TOKENS_OR_ITERS="10000", WARMUP_TOKENS_OR_ITERS="100",
)


@dataclass
class Paths:
    root: Path
    train: Path  # pre-training idxmap prefix
    valid: Path  # pre-training idxmap prefix
    sft: Path  # SFT idxmap prefix (build_idxmap_sft_dataset.py --output-prefix)
    sft_valid: Path
    train_json: Path
    valid_json: Path
    checkpoint: Path  # a converted tiny checkpoint folder
    checkpoint_05b: Path  # converted as 0.5B
    hf_05b: Path  # a Hugging Face folder whose config.json is 0.5B's
    hf_missing_shard: Path  # a Hugging Face folder whose index names a shard that is not there
    tokenizer: Path
    out: Path


def write_small_idxmaps(data: Path) -> None:
    """A few documents per idxmap: the launcher reads each one's index (and refuses an empty or mismatched pair)."""
    from data_files import write_idxmap, write_sft_idxmap

    documents = [list(range(n + 5)) for n in range(3)]
    write_idxmap(data / "train_text_document", documents)
    write_idxmap(data / "valid_text_document", documents)
    for prefix in ("sft", "sft_valid"):
        write_sft_idxmap(data / prefix, [(tokens, [0, 1] * (len(tokens) // 2) + [1] * (len(tokens) % 2))
                                         for tokens in documents])


def converted_checkpoint(folder: Path, size, overrides: dict | None = None) -> Path:
    """A converted checkpoint's folder as the launcher reads it: the tracker, and the config.json the convertor
    keeps beside the weights (of `size`, a size-table name or a Qwen25Size; `overrides`: more config.json keys)."""
    from megatron_patch.hf_checkpoint import hf_config_for
    from megatron_patch.model_sizes import get_size

    folder.mkdir()
    (folder / "latest_checkpointed_iteration.txt").write_text("release")
    config = hf_config_for(get_size(size) if isinstance(size, str) else size, overrides=overrides)
    config.to_json_file(folder / "config.json")
    return folder


def hf_folder(folder: Path, size: str, shards: list[str], present: int | None = None) -> Path:
    """A Hugging Face folder's files as the launcher reads them before torchrun (config.json, shard headers, the
    index of a sharded one): with one shard, every tensor of the model (zeros); with several, one small tensor
    each, of which only the first `present` shards are written."""
    import torch
    from safetensors.torch import save_file

    from megatron_patch.convert.mapping import hf_shapes
    from megatron_patch.hf_checkpoint import INDEX_FILE, hf_config_for

    folder.mkdir()
    hf_config_for(get_size(size)).to_json_file(folder / "config.json")
    if len(shards) == 1:
        save_file({name: torch.zeros(shape) for name, shape in hf_shapes(get_size(size)).items()},
                  str(folder / shards[0]))
        return folder
    weight_map = {f"model.layers.{i}.input_layernorm.weight": shard for i, shard in enumerate(shards)}
    for name, shard in list(weight_map.items())[:present]:
        save_file({name: torch.zeros(4)}, str(folder / shard))
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def paths(tmp_path, default_tokenizer_dir) -> Paths:
    data = tmp_path / "data"
    write_small_idxmaps(data)
    for name in ("train.json", "valid.json"):
        (data / name).write_text(json.dumps([{"instruction": "你好", "output": "你好！"}], ensure_ascii=False))
    checkpoints = {size: converted_checkpoint(tmp_path / f"qwen2.5-{size}-to-mcore", size) for size in ("tiny", "0.5B")}
    return Paths(tmp_path, data / "train_text_document", data / "valid_text_document", data / "sft",
                 data / "sft_valid", data / "train.json",
                 data / "valid.json", checkpoints["tiny"], checkpoints["0.5B"],
                 hf_folder(tmp_path / "Qwen2.5-0.5B", "0.5B", ["model-00001-of-00002.safetensors",
                                                               "model-00002-of-00002.safetensors"]),
                 hf_folder(tmp_path / "Qwen2.5-tiny", "tiny", ["model-00001-of-00002.safetensors",
                                                               "model-00002-of-00002.safetensors"], present=1),
                 default_tokenizer_dir, tmp_path / "output_mcore_qwen2.5")


def argv(paths: Paths, **overrides: str) -> list[str]:
    values = dict(BEST_PRACTICE, DATASET_PATH=str(paths.train), VALID_DATASET_PATH=str(paths.train),
                  PRETRAIN_CHECKPOINT_PATH="none", OUTPUT_BASEPATH=str(paths.out))
    if overrides.get("SFT") == "true":
        values.update(TRAIN_TOKENS_OR_ITERS="10000", WARMUP_TOKENS_OR_ITERS="100", DATASET_PATH=str(paths.sft),
                      VALID_DATASET_PATH=str(paths.sft))
    values.update(overrides)
    assert set(values) == set(POSITIONAL), set(values) ^ set(POSITIONAL)
    return [values[name] for name in POSITIONAL]


@dataclass
class DryRun:
    env: dict[str, str]  # what the launcher exports for torchrun
    torchrun: dict[str, str]  # torchrun's own options
    flags: list[str]  # pretrain_qwen's flags
    stderr: str

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def value(self, flag: str) -> str:
        assert flag in self.flags, f"{flag} missing from {self.flags}"
        return self.flags[self.flags.index(flag) + 1]


def parse_dry_run(stdout: str, stderr: str) -> DryRun:
    words = shlex.split(stdout.strip().splitlines()[-1])
    env = {}
    while "=" in words[0] and not words[0].startswith("/"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[1:3] == ["-m", "torch.distributed.run"], words[:3]
    split = words.index("megatron_patch.pretrain_qwen")
    assert words[split - 1] == "-m"
    opts = words[3 : split - 1]
    torchrun = dict(zip(opts[::2], opts[1::2]))
    return DryRun(env, torchrun, words[split + 1 :], stderr)


def run_script(args: list[str], env: dict[str, str], cwd: Path, shell: str = "sh", timeout: int = 60):
    return subprocess.run([shell, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def dry_run(paths: Paths, args: list[str], shell: str = "sh", tokenizer: bool = True, **env: str) -> DryRun:
    """The script with MP_DRY_RUN=1, run from a folder outside the repository."""
    cwd = paths.root / "elsewhere"
    cwd.mkdir(exist_ok=True)
    if tokenizer:
        env.setdefault("MP_TOKENIZER_PATH", str(paths.tokenizer))
    proc = run_script(args, clean_environ(MP_DRY_RUN="1", **env), cwd, shell)
    assert proc.returncode == 0, proc.stderr
    assert not paths.out.exists(), "a dry run must not create the output folder"
    return parse_dry_run(proc.stdout, proc.stderr)


RECOMPUTE_FLAGS = ("--recompute-activations", "--recompute-granularity", "--recompute-method",
                   "--recompute-num-layers", "--cpu-offloading-num-layers")
OFFLOAD_FLAGS = ("--optimizer-cpu-offload", "--use-precision-aware-optimizer", "--optimizer-offload-fraction")


# ---- valid combinations through the shell script ----


def test_best_practice_pretraining_command(paths):
    run = dry_run(paths, argv(paths))
    name = ("mcore-qwen2.5-tiny-pretrain-lr-1e-05-minlr-1e-06-bs-1-gbs-8-seqlen-128-pr-bf16-tp-1-pp-1-cp-1-ac-false"
            "-do-true-sp-false-ti-9-wi-0")
    assert run.torchrun == {"--nproc-per-node": "1", "--nnodes": "1", "--node-rank": "0",
                            "--master-addr": "localhost", "--master-port": run.torchrun["--master-port"],
                            "--signals-to-handle": "SIGQUIT"}  # the launcher stops the ranks itself
    # The model's own flags (tiny's, from the size table): the entrypoint expands no size name.
    assert not run.has("--model-size") and run.value("--num-layers") == "2" and run.value("--hidden-size") == "64"
    assert run.value("--rotary-base") == "1000000" and run.value("--position-embedding-type") == "rope"
    assert run.value("--micro-batch-size") == "1" and run.value("--global-batch-size") == "8"
    assert run.value("--seq-length") == "128"
    assert float(run.value("--lr")) == 1e-5 and float(run.value("--min-lr")) == 1e-6
    # 10000 tokens / (8 x 128) = 9 iterations; 100 warmup tokens are less than one iteration.
    assert run.value("--train-iters") == "9" and run.value("--lr-decay-iters") == "9"
    assert run.value("--lr-warmup-iters") == "0"
    assert run.has("--bf16") and not run.has("--fp16")
    assert run.has("--use-distributed-optimizer")
    assert not run.has("--sequence-parallel")  # SP=true is meaningless with TP=1 ...
    assert "SP=true has no effect with TP=1" in run.stderr  # ... and the user is told
    assert not any(run.has(f) for f in RECOMPUTE_FLAGS + OFFLOAD_FLAGS)
    assert not run.has("--pretrained-checkpoint") and not run.has("--instruction-tuning")
    assert run.value("--data-path") == str(paths.train) and run.value("--split") == "99,1,0"
    assert run.value("--dataset-type") == "idxmap"
    assert run.value("--save") == run.value("--load") == str(paths.out / "checkpoint" / name)
    assert run.value("--tensorboard-dir") == str(paths.out / "tensorboard" / name)
    assert run.value("--save-interval") == "100000"
    assert run.value("--tokenizer-model") == str(paths.tokenizer)
    assert run.value("--transformer-impl") == "local"  # no Transformer Engine here
    assert run.has("--calculate-per-token-loss")
    assert run.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert str(REPO_ROOT) in run.env["PYTHONPATH"].split(os.pathsep)


@pytest.mark.parametrize("pr, present, absent", [
    ("fp32", [], ["--bf16", "--fp16", "--fp8-format"]),
    ("bf16", ["--bf16"], ["--fp16", "--fp8-format"]),
])
def test_precision(paths, pr, present, absent):
    run = dry_run(paths, argv(paths, PR=pr))
    assert all(run.has(f) for f in present) and not any(run.has(f) for f in absent)
    assert f"-pr-{pr}-" in run.value("--save")


@pytest.mark.parametrize("batch, seq_len, scale", [("1", "128", "512"), ("2", "1024", "32"), ("8", "4096", "2")])
def test_fp16_loss_scale_starts_below_the_summed_token_losses(paths, batch, seq_len, scale):
    # Per-token loss backpropagates the sum over the micro-batch's tokens: 2^16 / tokens, as a power of two.
    _, flags = api_flags(paths, PR="fp16", BATCH_SIZE=batch, SEQ_LEN=seq_len, PAD_LEN=seq_len,
                         GLOBAL_BATCH_SIZE=str(8 * int(batch)), TRAIN_TOKENS_OR_ITERS="100000000")
    assert "--fp16" in flags and "--bf16" not in flags and value(flags, "--initial-loss-scale") == scale


@pytest.mark.parametrize("ac, env, expected", [
    ("sel", {}, ["--recompute-activations"]),
    ("full", {}, ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]),
    ("full", {"MP_AC_LAYERS": "2"},
     ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"]),
    ("full", {"MP_AC_METHOD": "block", "MP_AC_LAYERS": "2"},
     ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"]),
    ("false", {}, []),
])
def test_activation_checkpointing(paths, ac, env, expected):
    run = dry_run(paths, argv(paths, AC=ac), **env)
    recompute = [f for i, f in enumerate(run.flags)
                 if f in RECOMPUTE_FLAGS or (i and run.flags[i - 1] in RECOMPUTE_FLAGS[1:])]
    assert recompute == expected


def test_static_optimizer_offload_turns_the_distributed_optimizer_on(paths):
    planned, flags = api_flags(paths, DO="false", OPTIMIZER_OFFLOAD="static")
    assert "--use-distributed-optimizer" in flags
    assert "OPTIMIZER_OFFLOAD=static needs the distributed optimizer: DO is turned on." in planned.warnings
    assert "--optimizer-cpu-offload" in flags and "--use-precision-aware-optimizer" in flags
    assert value(flags, "--optimizer-offload-fraction") == "1.00"
    assert "-do-true-" in value(flags, "--save")


def test_no_optimizer_offload_and_no_distributed_optimizer(paths):
    run = dry_run(paths, argv(paths, DO="false", OPTIMIZER_OFFLOAD="false"))
    assert not run.has("--use-distributed-optimizer")
    assert not any(run.has(f) for f in OFFLOAD_FLAGS)
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: SP=true has no effect with TP=1: sequence parallelism is left off."]


@pytest.mark.parametrize("sp", ["true", "false"])
def test_tensor_parallel_with_and_without_sequence_parallel(paths, sp):
    run = dry_run(paths, argv(paths, TP="2", SP=sp), MP_NPROC_PER_NODE="2")
    assert run.value("--tensor-model-parallel-size") == "2"
    assert run.torchrun["--nproc-per-node"] == "2"
    # Here (no Transformer Engine) sequence parallelism is dropped with a warning; with TE see the next test.
    assert not run.has("--sequence-parallel") and "-tp-2-pp-1-cp-1-" in run.value("--save")
    assert ("SP=true needs Transformer Engine" in run.stderr) == (sp == "true")
    assert "SP=true has no effect" not in run.stderr


@pytest.mark.parametrize("tp, sp, expected", [("2", "true", True), ("2", "false", False), ("1", "true", False)])
def test_sequence_parallel_with_transformer_engine(paths, tp, sp, expected):
    launch, flags = api_flags(paths, TP=tp, SP=sp)
    assert ("--sequence-parallel" in flags) == expected
    assert f"-sp-{str(expected).lower()}-" in launch.run_name
    assert any("SP=true has no effect with TP=1" in w for w in launch.warnings) == (tp == "1" and sp == "true")


def test_pipeline_and_context_parallel_on_four_processes(paths):
    run = dry_run(paths, argv(paths, MODEL_SIZE="0.5B", PP="2", CP="2"), MP_NPROC_PER_NODE="4")
    assert run.value("--pipeline-model-parallel-size") == "2"
    assert run.value("--context-parallel-size") == "2"
    assert run.torchrun["--nproc-per-node"] == "4"


def test_virtual_pipeline(paths):
    # Upstream's meaning: MP_VP is layers per virtual stage. 0.5B has 24 layers: PP=2 stages of 12, MP_VP=4 -> three
    # virtual stages of 4 layers on each pipeline rank.
    run = dry_run(paths, argv(paths, MODEL_SIZE="0.5B", PP="2"), MP_VP="4", MP_NPROC_PER_NODE="2")
    assert run.value("--num-layers-per-virtual-pipeline-stage") == "4"


def test_dsw_uses_every_local_process(paths):
    run = dry_run(paths, argv(paths), MP_NPROC_PER_NODE="4")  # four GPUs: DP=4, GBS 8 = 1 x 4 x 2 micro-batches
    assert run.torchrun["--nproc-per-node"] == "4" and run.torchrun["--nnodes"] == "1"
    assert run.torchrun["--master-addr"] == "localhost"


def test_dlc_takes_the_layout_from_the_scheduler(paths):
    run = dry_run(paths, argv(paths, GLOBAL_BATCH_SIZE="32", TRAIN_TOKENS_OR_ITERS="409600", ENV="dlc"),
                  WORLD_SIZE="2", RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="23456",
                  KUBERNETES_CONTAINER_RESOURCE_GPU="8")
    assert run.torchrun == {"--nproc-per-node": "8", "--nnodes": "2", "--node-rank": "1",
                            "--master-addr": "10.0.0.7", "--master-port": "23456", "--signals-to-handle": "SIGQUIT"}
    assert run.value("--train-iters") == "100"  # 409600 / 32 / 128


def test_pretraining_budgets_are_tokens(paths):
    run = dry_run(paths, argv(paths, TRAIN_TOKENS_OR_ITERS="1000000", WARMUP_TOKENS_OR_ITERS="10000"))
    assert run.value("--train-iters") == str(1000000 // 8 // 128) == "976"
    assert run.value("--lr-warmup-iters") == str(10000 // 8 // 128) == "9"
    assert run.value("--lr-decay-iters") == "976"
    assert "-ti-976-wi-9" in run.value("--save")


def test_pretraining_with_a_separate_validation_set(paths):
    run = dry_run(paths, argv(paths, VALID_DATASET_PATH=str(paths.valid)))
    assert not run.has("--data-path") and not run.has("--split")
    assert run.value("--train-data-path") == str(paths.train)
    assert run.value("--valid-data-path") == str(paths.valid)


def test_blends_go_to_megatron_as_lists(paths):
    # Upstream passes DATASET_PATH unquoted to --data-path: a blend is one argument with spaces.
    blend = f"0.7 {paths.train} 0.3 {paths.valid}"
    run = dry_run(paths, argv(paths, DATASET_PATH=blend, VALID_DATASET_PATH=blend))
    at = run.flags.index("--data-path")
    assert run.flags[at + 1 : at + 6] == ["0.7", str(paths.train), "0.3", str(paths.valid), "--split"]
    _, flags = api_flags(paths, SFT="true", DATASET_PATH=f"1 {paths.sft} 3 {paths.sft_valid}")
    at = flags.index("--train-data-path")
    assert flags[at + 1 : at + 7] == ["1", str(paths.sft), "3", str(paths.sft_valid), "--valid-data-path",
                                      str(paths.sft)]


def test_best_practice_finetuning_command_on_idxmap(paths):
    run = dry_run(paths, argv(paths, SFT="true", VALID_DATASET_PATH=str(paths.sft_valid)))
    # SFT budgets are iterations.
    assert run.value("--train-iters") == "10000" and run.value("--lr-warmup-iters") == "100"
    assert run.value("--lr-decay-iters") == "10000"
    assert run.has("--instruction-tuning") and run.value("--dataset-type") == "idxmap"
    assert run.value("--train-data-path") == str(paths.sft)
    assert run.value("--valid-data-path") == str(paths.sft_valid)
    assert not run.has("--max-padding-length") and not run.has("--sft-packing")
    assert "-finetune-" in run.value("--save") and run.value("--save").endswith("-data-idxmap")


def test_finetuning_on_raw_json_pads_to_pad_len(paths):
    run = dry_run(paths, argv(paths, SFT="true", PAD_LEN="96", DATASET_PATH=str(paths.train_json),
                              VALID_DATASET_PATH=str(paths.valid_json)), MP_DATASET_TYPE="raw")
    assert run.value("--dataset-type") == "raw" and run.value("--max-padding-length") == "96"
    assert run.value("--train-data-path") == str(paths.train_json)
    assert run.value("--valid-data-path") == str(paths.valid_json)
    assert run.value("--save").endswith("-data-raw")


def test_packed_finetuning(paths):
    run = dry_run(paths, argv(paths, SFT="true"), MP_SFT_PACKING="true")
    assert run.has("--sft-packing") and run.value("--save").endswith("-data-idxmap-packed")


def test_no_save_knob_leaves_out_every_save(paths):
    run = dry_run(paths, argv(paths, SAVE_INTERVAL="50"), MP_SAVE="false")
    # Without --save Megatron writes no checkpoint, periodic, final or on a stop; --load still resumes a folder's.
    assert not run.has("--save") and not run.has("--save-interval")
    assert run.value("--load") == str(paths.out / "checkpoint" / Path(run.value("--load")).name)
    assert "warning: MP_SAVE=false: this run saves no checkpoint (SAVE_INTERVAL=50 is ignored); when it ends or is " \
           "stopped, nothing of its training is kept." in run.stderr
    saved = dry_run(paths, argv(paths, SAVE_INTERVAL="50"))
    assert saved.value("--save-interval") == "50" and "MP_SAVE" not in saved.stderr
    with pytest.raises(UserError, match="MP_SAVE must be true or false"):
        positional.parse(argv(paths), {"MP_SAVE": "never"})


def test_free_space_check_names_the_no_save_knob_and_is_skipped_by_it(paths, monkeypatch, capsys):
    import shutil
    from types import SimpleNamespace

    full_disk = shutil._ntuple_diskusage(2**40, 2**40 - 2**20, 2**20)  # 1 MiB free
    monkeypatch.setattr(launch_run.shutil, "disk_usage", lambda path: full_disk)
    started = []

    def run_owned(command, env, log, exports=None):  # stands in for torchrun: the launch got past its checks
        started.append(command)
        return SimpleNamespace(proc=SimpleNamespace(returncode=0), stopped_by=None)

    monkeypatch.setattr(launch_run, "run_owned", run_owned)
    environ = {"MP_TOKENIZER_PATH": str(paths.tokenizer)}
    assert launch_run.main(argv(paths, MODEL_SIZE="0.5B"), environ) == 2 and not started
    err = capsys.readouterr().err
    assert f"error: OUTPUT_BASEPATH {paths.out} has 0.00 GiB free, but one checkpoint of Qwen2.5-0.5B takes about" \
           in err and "a run that needs no checkpoint (a throughput measurement) can set MP_SAVE=false" in err
    assert launch_run.main(argv(paths, MODEL_SIZE="0.5B"), {**environ, "MP_SAVE": "false"}) == 0
    assert len(started) == 1 and "--save" not in started[0]


def test_fused_kernels_are_the_default_and_can_be_turned_off(paths):
    assert not dry_run(paths, argv(paths)).has("--plain-kernels")
    assert dry_run(paths, argv(paths), MP_FUSED_KERNELS="false").has("--plain-kernels")


def test_converted_checkpoint_is_the_starting_point(paths):
    run = dry_run(paths, argv(paths, PRETRAIN_CHECKPOINT_PATH=str(paths.checkpoint)))
    assert run.value("--pretrained-checkpoint") == str(paths.checkpoint)
    # --load stays the run's own folder, so a relaunch resumes there instead of restarting from the checkpoint.
    assert run.value("--load") == run.value("--save") != str(paths.checkpoint)


def test_a_hugging_face_folder_is_the_starting_point_as_it_is(paths):
    """The HF folder itself (no conversion): each rank reads it (--pretrained-hf), its config.json is the model;
    --load stays the run's own folder."""
    folder = hf_folder(paths.root / "Qwen2.5-tiny-hf", "tiny", ["model.safetensors"])
    run = dry_run(paths, argv(paths, MODEL_SIZE="auto", PRETRAIN_CHECKPOINT_PATH=str(folder)))
    assert run.value("--pretrained-hf") == str(folder) and not run.has("--pretrained-checkpoint")
    assert run.value("--num-layers") == "2" and run.value("--load") == run.value("--save")


def test_a_direct_torchrun_given_a_hugging_face_folder_as_a_megatron_checkpoint_is_told_the_flag(paths):
    """Megatron would read --pretrained-checkpoint (or --load) as a torch_dist checkpoint and fail deep inside."""
    from types import SimpleNamespace

    from megatron_patch.convert.hf_direct import settle_args

    folder = hf_folder(paths.root / "Qwen2.5-tiny-hf", "tiny", ["model.safetensors"])
    for flag in ("pretrained_checkpoint", "load"):
        args = SimpleNamespace(**{"pretrained_checkpoint": None, "load": str(paths.out), "pretrained_hf": None,
                                  flag: str(folder)})
        with pytest.raises(UserError) as err:
            settle_args(args)
        assert f"--{flag.replace('_', '-')} {folder} is a Hugging Face folder" in str(err.value)
        assert "Pass it as --pretrained-hf" in str(err.value)
    settle_args(SimpleNamespace(pretrained_checkpoint=None, load=str(paths.out), pretrained_hf=str(folder)))


def test_bash_from_another_folder_with_a_relative_output_path(paths):
    cwd = paths.root / "elsewhere"
    cwd.mkdir()
    proc = run_script(argv(paths, OUTPUT_BASEPATH="runs/out"), clean_environ(MP_DRY_RUN="1",
                      MP_TOKENIZER_PATH=str(paths.tokenizer)), cwd, shell="bash")
    assert proc.returncode == 0, proc.stderr
    run = parse_dry_run(proc.stdout, proc.stderr)
    assert run.value("--save").startswith(str(cwd / "runs" / "out" / "checkpoint") + "/")
    assert run.value("--tensorboard-dir").startswith(str(cwd / "runs" / "out" / "tensorboard") + "/")
    assert not (cwd / "runs").exists()


@pytest.mark.skipif(hardware.nvidia_driver_present(), reason="this machine has an NVIDIA driver")
def test_without_an_nvidia_driver_the_launcher_counts_no_gpu_without_importing_torch():
    # torch's import takes seconds: every launch and dry run on a CPU machine used to pay it to count zero GPUs.
    code = "import sys; from megatron_patch.hardware import gpu_count; print(gpu_count(), 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert proc.stdout.split() == ["0", "False"], proc.stderr


def test_default_tokenizer_lives_in_the_cache_and_a_dry_run_writes_nothing(paths, monkeypatch):
    cache = paths.root / "cache"
    run = dry_run(paths, argv(paths), tokenizer=False, XDG_CACHE_HOME=str(cache))
    assert run.value("--tokenizer-model") == str(cache / "megatron_patch" / "qwen2.5-tokenizer")
    assert not cache.exists()
    run = dry_run(paths, argv(paths), tokenizer=False, MEGATRON_PATCH_CACHE=str(paths.root / "mine"))
    assert run.value("--tokenizer-model") == str(paths.root / "mine" / "qwen2.5-tokenizer")
    # A real launch writes it there once (the launcher's step before torchrun).
    launch = positional.parse(argv(paths), {})
    monkeypatch.setenv("MEGATRON_PATCH_CACHE", str(paths.root / "mine"))
    written = launch_run.tokenizer_dir(launch)
    assert written == str(paths.root / "mine" / "qwen2.5-tokenizer")
    assert (Path(written) / "tokenizer_config.json").is_file()


# ---- combinations that need a GPU with Transformer Engine: the Python API with a pretend machine ----

GPU_TE = Machine(nnodes=1, node_rank=0, nproc_per_node=8, master_addr="localhost", master_port=6000,
                 has_gpu=True, has_te=True, has_flash_attn=True, gpu_capability=90)  # Hopper


@dataclass
class Planned:
    """A launch after settle() and problems(), with what they reported."""
    launch: positional.Launch
    warnings: list[str]
    notes: list[str]

    def __getattr__(self, name):
        return getattr(self.launch, name)


def plan(paths: Paths, machine: Machine, environ: dict, args: list[str]) -> Planned:
    """What the launcher's main does before torchrun; its errors raised as one UserError."""
    launch = positional.parse(args, {"MP_TOKENIZER_PATH": str(paths.tokenizer), **environ})
    launch, changes = validate.settle(launch, machine)
    found = validate.problems(launch, machine)
    if found.errors:
        raise UserError("\n".join(found.errors))
    return Planned(launch, changes + found.warnings, found.notes)


def api_flags(paths: Paths, machine: Machine = GPU_TE, environ: dict | None = None, **overrides: str):
    planned = plan(paths, machine, environ or {}, argv(paths, **overrides))
    return planned, launch_flags.megatron_flags(planned.launch, machine, str(paths.tokenizer))


def value(flags: list[str], flag: str) -> str:
    return flags[flags.index(flag) + 1]


def test_fp8_with_transformer_engine(paths):
    _, flags = api_flags(paths, PR="fp8")
    assert "--bf16" in flags and value(flags, "--fp8-format") == "hybrid"
    assert value(flags, "--fp8-amax-history-len") == "1024" and value(flags, "--fp8-amax-compute-algo") == "max"
    assert value(flags, "--transformer-impl") == "transformer_engine"
    assert value(flags, "--fp8-recipe") == "delayed"


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
def test_fp8_recipes_other_than_delayed_take_no_amax_history(paths, recipe):
    _, flags = api_flags(paths, environ={"MP_FP8_RECIPE": recipe}, PR="fp8")
    assert value(flags, "--fp8-recipe") == recipe and value(flags, "--fp8-format") == "hybrid"
    assert "--fp8-amax-history-len" not in flags and "--fp8-amax-compute-algo" not in flags


# megatron-core's own parser over the launcher's flags as the entrypoint hands them over, in a fresh process
# (it keeps global state).
MEGATRON_PARSES = """
import json, os, sys
from megatron_patch.megatron_startup import importing_megatron
with importing_megatron():
    from megatron.training.arguments import parse_and_validate_args
    from megatron_patch.megatron_flags import add_extra_args, expand_model_size
os.environ.update(WORLD_SIZE="8", RANK="0")
sys.argv = ["pretrain_qwen", *expand_model_size(json.loads(sys.argv[1]))]
args = parse_and_validate_args(extra_args_provider=add_extra_args)
print(json.dumps([args.fp8, args.fp8_recipe, args.first_last_layers_bf16, args.num_layers_at_start_in_bf16,
                  args.num_layers_at_end_in_bf16, args.fp8_fprop_fp32_accumulation]))
"""


def test_fp8_knobs_reach_megatron_cores_parser(paths):
    """MP_FP8_BF16_LAYERS=2, MP_FP8_FORMAT=e4m3 and MP_FP8_FPROP_ACCUMULATION=fp32 reach megatron-core's arguments
    (checked with its parser plus ours) as two bf16 layers at each end, e4m3 and the fp32-accumulation flag the
    manifest's `fp8-forward-fp32-accumulation` entry keys on; unset, every layer is fp8, hybrid, fast."""
    knobs = {"MP_FP8_RECIPE": "tensorwise", "MP_FP8_BF16_LAYERS": "2", "MP_FP8_FORMAT": "e4m3",
             "MP_FP8_FPROP_ACCUMULATION": "fp32"}
    _, flags = api_flags(paths, MODEL_SIZE="0.5B", PR="fp8", environ=knobs)
    proc = subprocess.run([sys.executable, "-c", MEGATRON_PARSES, json.dumps(flags)], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["e4m3", "tensorwise", True, 2, 2, True]
    _, defaults = api_flags(paths, MODEL_SIZE="0.5B", PR="fp8")
    assert value(defaults, "--fp8-format") == "hybrid"
    assert "--first-last-layers-bf16" not in defaults and "--fp8-fprop-fp32-accumulation" not in defaults


def test_fp8_knobs_without_fp8_are_warnings(paths):
    launch, flags = api_flags(paths, PR="bf16", environ={"MP_FP8_FORMAT": "e4m3", "MP_FP8_FPROP_ACCUMULATION": "fp32"})
    assert "--fp8-format" not in flags and "--fp8-fprop-fp32-accumulation" not in flags
    assert any("MP_FP8_FORMAT=e4m3 has no effect with PR=bf16" in w for w in launch.warnings)
    assert any("MP_FP8_FPROP_ACCUMULATION=fp32 has no effect with PR=bf16" in w for w in launch.warnings)


def test_fp8_bf16_layers_must_leave_some_layers_in_fp8(paths):
    with pytest.raises(UserError) as err:
        api_flags(paths, MODEL_SIZE="0.5B", PR="fp8", environ={"MP_FP8_BF16_LAYERS": "12"})
    assert ("MP_FP8_BF16_LAYERS=12 keeps 12 layers at each end of Qwen2.5-0.5B's 24 in bf16, leaving none in fp8: "
            "choose 0 to 11, or PR=bf16.") in str(err.value)
    with pytest.raises(UserError) as err:  # megatron-core 0.19.2 asserts at the first forward otherwise
        api_flags(paths, MODEL_SIZE="0.5B", PR="fp8", environ={"MP_FP8_BF16_LAYERS": "1"})
    assert ("MP_FP8_BF16_LAYERS=1 needs current or block scaling: megatron-core 0.19.2 refuses bf16 layers under "
            "delayed scaling (MP_FP8_RECIPE=delayed, the default)") in str(err.value)
    launch, flags = api_flags(paths, MODEL_SIZE="0.5B", PR="bf16", environ={"MP_FP8_BF16_LAYERS": "1"})
    assert "--first-last-layers-bf16" not in flags
    assert any("MP_FP8_BF16_LAYERS=1 has no effect with PR=bf16" in w for w in launch.warnings)


def test_mxfp8_needs_a_blackwell_gpu(paths):
    with pytest.raises(UserError) as err:
        api_flags(paths, environ={"MP_FP8_RECIPE": "mxfp8"}, PR="fp8")
    assert "MP_FP8_RECIPE=mxfp8 needs a Blackwell GPU (compute capability 10.0 or newer); this one is 9.0" in str(err.value)
    blackwell = dataclasses.replace(GPU_TE, gpu_capability=100)
    _, flags = api_flags(paths, blackwell, environ={"MP_FP8_RECIPE": "mxfp8"}, PR="fp8")
    assert value(flags, "--fp8-recipe") == "mxfp8"


def test_a_recompute_method_without_full_recompute_is_a_warning(paths):
    launch, flags = api_flags(paths, environ={"MP_AC_METHOD": "block"}, AC="sel")
    assert "--recompute-method" not in flags
    assert any("MP_AC_METHOD=block has no effect with AC=sel" in w for w in launch.warnings)


def test_an_fp8_recipe_without_fp8_is_a_warning(paths):
    launch, flags = api_flags(paths, environ={"MP_FP8_RECIPE": "tensorwise"}, PR="bf16")
    assert "--fp8-recipe" not in flags
    assert any("MP_FP8_RECIPE=tensorwise has no effect with PR=bf16" in w for w in launch.warnings)


@pytest.mark.parametrize("fl, backend", [("true", "flash"), ("false", "fused")])
def test_flash_attention_switch_with_transformer_engine(paths, fl, backend):
    _, flags = api_flags(paths, FL=fl)
    assert value(flags, "--attention-backend") == backend


def test_flash_attention_with_transformer_engine_needs_flash_attn(paths):
    from dataclasses import replace

    no_flash = replace(GPU_TE, has_flash_attn=False)
    with pytest.raises(UserError) as err:
        api_flags(paths, no_flash, FL="true")
    assert "flash_attn package is not installed" in str(err.value) and "FL=false" in str(err.value)
    _, flags = api_flags(paths, no_flash, FL="false")
    assert value(flags, "--attention-backend") == "fused"
    # Packed SFT goes to TE's attention as well, and asks the same of FL=true ...
    with pytest.raises(UserError, match="flash_attn package is not installed"):
        api_flags(paths, no_flash, SFT="true", FL="true", environ={"MP_SFT_PACKING": "true"})
    # ... except where it trains on the local spec (SDPA), which needs no flash-attn.
    _, flags = api_flags(paths, no_flash, SFT="true", FL="true",
                         environ={"MP_SFT_PACKING": "true", "MP_CUDA_GRAPH": "true"})
    assert value(flags, "--transformer-impl") == "local"


def test_activation_offload_with_transformer_engine(paths):
    _, flags = api_flags(paths, MODEL_SIZE="0.5B", AC="offload", environ={"MP_AC_LAYERS": "4"})
    assert value(flags, "--cpu-offloading-num-layers") == "4"
    assert not any(f in flags for f in RECOMPUTE_FLAGS[:4])


def test_gpu_overlap_flags(paths):
    _, flags = api_flags(paths, TP="2", SP="true")
    assert {"--sequence-parallel", "--overlap-grad-reduce", "--overlap-param-gather", "--tp-comm-overlap"} <= set(flags)
    _, flags = api_flags(paths, DO="false")
    assert "--overlap-grad-reduce" in flags and "--overlap-param-gather" not in flags
    # AC=full re-runs each layer's forward hooks in backward, starting a second gather of a pending bucket
    # (megatron-core 0.19.2 asserts in iteration 2); AC=sel recomputes no parameters.
    assert "--overlap-param-gather" not in api_flags(paths, AC="full")[1]
    assert "--overlap-param-gather" in api_flags(paths, AC="sel")[1]
    # PR=fp8 through TE meets the same assertion; bf16 keeps the overlap.
    assert "--overlap-param-gather" not in api_flags(paths, PR="fp8")[1]
    assert "--overlap-param-gather" in api_flags(paths, PR="bf16")[1]


@pytest.mark.parametrize("pr, fl, backend", [("fp32", "true", "unfused"), ("fp32", "false", "unfused"),
                                             ("bf16", "false", "fused")])
def test_te_attention_backend_follows_the_precision(paths, pr, fl, backend):
    # TE's flash and cuDNN kernels take 16-bit inputs only: PR=fp32 found "No dot product attention backend".
    assert value(api_flags(paths, PR=pr, FL=fl)[1], "--attention-backend") == backend


def test_cuda_graph_captures_whole_iterations(paths):
    _, flags = api_flags(paths, environ={"MP_CUDA_GRAPH": "true"})
    assert value(flags, "--cuda-graph-impl") == "full_iteration" and "--no-check-for-nan-in-loss-and-grad" in flags
    # The distributed optimizer's overlapped gather waits in forward hooks, which a replay would skip.
    assert "--use-distributed-optimizer" in flags and "--overlap-param-gather" not in flags
    assert "--cuda-graph-impl" not in api_flags(paths)[1]
    # Packed SFT too: its batches have fixed shapes and its attention mask is built on the GPU inside the step.
    _, flags = api_flags(paths, SFT="true", environ={"MP_CUDA_GRAPH": "true", "MP_SFT_PACKING": "true"})
    assert value(flags, "--cuda-graph-impl") == "full_iteration" and "--sft-packing" in flags
    assert value(flags, "--transformer-impl") == "local"


def test_sft_on_a_gpu_suggests_the_cuda_graph_where_it_can_replay(paths):
    def suggested(launch) -> bool:
        return any("MP_CUDA_GRAPH=true" in note for note in launch.notes)

    assert suggested(api_flags(paths, SFT="true")[0])
    # packed rows too: the graph replays their own boundaries (data/providers.py, static_packed_seq_params)
    assert suggested(api_flags(paths, SFT="true", environ={"MP_SFT_PACKING": "true"})[0])
    assert not suggested(api_flags(paths, SFT="true", environ={"MP_CUDA_GRAPH": "true"})[0])  # already on
    assert not suggested(api_flags(paths, SFT="true", PP="2")[0])  # cannot replay
    assert not suggested(api_flags(paths)[0])  # pre-training: left to the benchmarks
    cpu = dataclasses.replace(GPU_TE, has_gpu=False, has_te=False, has_flash_attn=False)
    assert not suggested(plan(paths, cpu, {}, argv(paths, SFT="true")))  # no GPU


@pytest.mark.parametrize("overrides, environ, reason", [
    ({"PP": "2"}, {}, "it captures PP=1 layouts only"),
    ({"PR": "fp8"}, {}, "PR=fp8 updates its scaling factors"),
])
def test_cuda_graph_refuses_layouts_it_cannot_replay(paths, overrides, environ, reason):
    with pytest.raises(UserError) as err:
        api_flags(paths, environ={"MP_CUDA_GRAPH": "true", **environ}, **overrides)
    assert reason in str(err.value)


def test_context_parallel_without_te_on_a_gpu(paths):
    gpu_without_te = dataclasses.replace(GPU_TE, has_te=False, has_flash_attn=False)
    # Our SDPA attention takes CP itself (megatron-core's needs TE) ...
    _, flags = api_flags(paths, gpu_without_te, CP="2")
    assert value(flags, "--context-parallel-size") == "2" and value(flags, "--transformer-impl") == "local"
    # ... but not yet inside a CUDA graph.
    with pytest.raises(UserError) as err:
        api_flags(paths, gpu_without_te, environ={"MP_CUDA_GRAPH": "true"}, CP="2")
    assert "CP > 1 without Transformer Engine checks its GPU attention kernel" in str(err.value)


@pytest.mark.parametrize("free_gib, fraction", [(None, "1.00"), (1000.0, "0.00"), (0.001, "1.00")])
def test_auto_optimizer_offload_follows_free_gpu_memory(paths, monkeypatch, free_gib, fraction):
    monkeypatch.setattr(hardware, "free_gpu_bytes", lambda: None if free_gib is None else int(free_gib * 2**30))
    launch, flags = api_flags(paths, MODEL_SIZE="0.5B", DO="false", OPTIMIZER_OFFLOAD="auto")
    assert "--use-distributed-optimizer" in flags and launch.distributed_optimizer
    assert any("OPTIMIZER_OFFLOAD=auto needs the distributed optimizer" in w for w in launch.warnings)
    assert "--optimizer-cpu-offload" in flags and value(flags, "--optimizer-offload-fraction") == fraction


def test_auto_optimizer_offload_keeps_what_fits(paths, monkeypatch):
    # 0.5B: 12 bytes of Adam state per parameter over 8 data-parallel ranks; half the free memory is for state.
    launch = positional.parse(argv(paths, MODEL_SIZE="0.5B", OPTIMIZER_OFFLOAD="auto"), {})
    state = 12 * launch.size.parameter_count / 8
    # half of the free memory is for optimizer state: free = state means half of the state fits on the GPU
    assert launch_flags.auto_offload_fraction(launch, GPU_TE, int(state)) == 0.5


def test_auto_optimizer_offload_splits_the_state_over_context_parallel_ranks_too(paths):
    # The distributed optimizer shards over data x context parallel: 8 GPUs at CP=2 still hold 1/8 each.
    launch = positional.parse(argv(paths, MODEL_SIZE="0.5B", OPTIMIZER_OFFLOAD="auto", CP="2"), {})
    state = 12 * launch.size.parameter_count / 8
    assert launch_flags.auto_offload_fraction(launch, GPU_TE, int(state)) == 0.5


def test_available_host_memory_is_linuxs_memavailable(tmp_path, monkeypatch):
    monkeypatch.undo()  # the suite's ample_host_memory stand-in
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32768000 kB\nMemFree:          102400 kB\nMemAvailable:   20480000 kB\n")
    assert hardware.available_host_bytes(meminfo) == 20480000 * 1024
    meminfo.write_text("MemTotal:       32768000 kB\n")  # a kernel older than 3.14
    assert hardware.available_host_bytes(meminfo) is None
    assert hardware.available_host_bytes(tmp_path / "absent") is None


@pytest.mark.parametrize("offload", ["static", "auto"])
def test_optimizer_offload_is_refused_where_the_host_cannot_hold_its_state(paths, monkeypatch, offload):
    """16 bytes per trained parameter on the host (master weights, two moments, the gradients' copy), for the
    node's ranks together: refused before torchrun when MemAvailable is less, with the figures and the fixes."""
    monkeypatch.setattr(hardware, "free_gpu_bytes", lambda: 2**30)  # auto: almost all of it goes to the host
    launch = positional.parse(argv(paths, MODEL_SIZE="0.5B", OPTIMIZER_OFFLOAD=offload), {})
    fraction = 1.0 if offload == "static" else launch_flags.auto_offload_fraction(launch, GPU_TE, 2**30)
    needed = 16 * launch.size.parameter_count * fraction  # 8 ranks on this node, 1/8 of the state each
    monkeypatch.setattr(hardware, "available_host_bytes", lambda: int(needed) - 2**20)
    with pytest.raises(UserError) as err:
        api_flags(paths, MODEL_SIZE="0.5B", OPTIMIZER_OFFLOAD=offload)
    message = str(err.value)
    assert f"OPTIMIZER_OFFLOAD={offload} keeps the optimizer state of this node's 8 rank(s) on the host: about " \
           f"{needed / 2**30:.0f} GiB" in message
    assert "0.49B parameters trained" in message and "Use OPTIMIZER_OFFLOAD=auto" in message
    monkeypatch.setattr(hardware, "available_host_bytes", lambda: int(needed) + 2**20)
    _, flags = api_flags(paths, MODEL_SIZE="0.5B", OPTIMIZER_OFFLOAD=offload)
    assert "--optimizer-cpu-offload" in flags
    # A LoRA run offloads its adapters' state only, which the same host holds easily
    monkeypatch.setattr(hardware, "available_host_bytes", lambda: 2**30)
    planned, _ = api_flags(paths, MODEL_SIZE="0.5B", OPTIMIZER_OFFLOAD=offload, environ={"MP_LORA_RANK": "16"},
                           PRETRAIN_CHECKPOINT_PATH=str(paths.checkpoint_05b))
    assert planned.lora is not None


@pytest.mark.parametrize("size_name", ["0.5B", "7B", "14B"])
def test_offload_sizing_counts_the_real_model_parameters(size_name):
    # The count offload sizing uses is the HF model's own (GQA, SwiGLU's three matrices, tied or untied output).
    import torch
    from transformers import Qwen2ForCausalLM

    from megatron_patch.hf_checkpoint import hf_config_for
    from megatron_patch.model_sizes import QWEN2_5_SIZES

    size = QWEN2_5_SIZES[size_name]
    with torch.device("meta"):
        model = Qwen2ForCausalLM(hf_config_for(size))
    assert size.parameter_count == sum(p.numel() for p in model.parameters())


def test_checkpoint_tokenizer_is_preferred_to_the_default(paths):
    (paths.checkpoint / "tokenizer_config.json").write_text("{}")
    launch = positional.parse(argv(paths, PRETRAIN_CHECKPOINT_PATH=str(paths.checkpoint)), {})
    assert launch_run.tokenizer_dir(launch) == str(paths.checkpoint)
    launch = positional.parse(argv(paths, PRETRAIN_CHECKPOINT_PATH=str(paths.checkpoint)),
                             {"MP_TOKENIZER_PATH": "/my/tokenizer"})
    assert launch_run.tokenizer_dir(launch) == "/my/tokenizer"


@pytest.mark.parametrize("overrides, environ", [
    ({"PR": "fp8", "TP": "2", "SP": "true", "AC": "offload", "OPTIMIZER_OFFLOAD": "auto"}, {}),
    ({"MODEL_SIZE": "0.5B", "PR": "fp16", "PP": "2", "AC": "full", "OPTIMIZER_OFFLOAD": "static"},
     {"MP_VP": "6", "MP_AC_LAYERS": "3", "MP_FUSED_KERNELS": "false"}),
    ({"SFT": "true", "PR": "fp32", "AC": "sel", "CP": "2"}, {"MP_DATASET_TYPE": "raw", "MP_SFT_PACKING": "true"}),
    ({"TP": "2", "SP": "true"}, {"MP_CUDA_GRAPH": "true"}),
    ({"SEQ_LEN": "65536", "PAD_LEN": "128", "TRAIN_TOKENS_OR_ITERS": "100000000"}, {"MP_ROPE_SCALING": "yarn:4"}),
])
def test_every_flag_is_known_to_megatron_core(paths, overrides, environ, monkeypatch):
    """The produced flags parse with megatron-core 0.19.2's own argument parser plus ours, and pass its checks."""
    from megatron.training import arguments as megatron_arguments
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from megatron_patch.megatron_flags import add_extra_args, expand_model_size

    if environ.get("MP_DATASET_TYPE") == "raw":
        overrides.update(DATASET_PATH=str(paths.train_json), VALID_DATASET_PATH=str(paths.valid_json))
    _, flags = api_flags(paths, environ=environ, **overrides)
    parser = add_extra_args(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(expand_model_size(flags))  # exits on an unknown flag
    assert args.calculate_per_token_loss and args.save == args.load
    # megatron-core's own checks of the combination (8 Hopper GPUs of GPU_TE), e.g. it refuses TE's cross-entropy
    # fusion, which the TE spec once asked for.
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: 9)
    for name, setting in launch_flags.launch_env(GPU_TE, {}).items():
        monkeypatch.setenv(name, setting)
    args.rank, args.world_size = 0, GPU_TE.world_size
    validate_args(args, {})


@pytest.mark.parametrize("size_name,seq_len", [("0.5B", 4096), ("72B", 32768)])
def test_our_flop_count_is_megatron_cores(size_name, seq_len):
    """The benchmarks' MFU and the TFLOP/s megatron-core logs count the same FLOPs: its own function, on the
    model flags the launcher passes (a tied GQA 14/2 model and an untied 64/8 one)."""
    from megatron.training.arguments import add_megatron_arguments
    from megatron.training.training import num_floating_point_operations

    from megatron_patch.megatron_flags import qwen2_5_model_flags

    size = get_size(size_name)
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args([*qwen2_5_model_flags(size), "--seq-length", str(seq_len)])
    args.kv_channels = args.hidden_size // args.num_attention_heads  # what megatron's validate_args derives
    batch = 3
    megatron_core = num_floating_point_operations(args, batch) / (batch * seq_len)
    assert size.training_flops_per_token(seq_len) == pytest.approx(megatron_core, rel=1e-12)


# ---- invalid combinations: their own message, exit status 2, no torchrun, no output folder ----

INVALID = [
    # (id, overrides, environment, distinctive part of the message)
    ("arg_count", None, {}, "takes 25 arguments, got 24. Missing: OUTPUT_BASEPATH"),
    ("model_size", {"MODEL_SIZE": "0.6B"}, {}, "MODEL_SIZE must be one of tiny, 0.5B"),
    ("precision", {"PR": "int8"}, {}, "PR must be one of fp32, bf16, fp16, fp8; got 'int8'"),
    ("fp8_recipe", {}, {"MP_FP8_RECIPE": "current"},
     "MP_FP8_RECIPE must be one of delayed, tensorwise, blockwise, mxfp8; got 'current'"),
    ("fp8_format", {}, {"MP_FP8_FORMAT": "e5m2"}, "MP_FP8_FORMAT must be one of hybrid, e4m3; got 'e5m2'"),
    ("ac_mode", {"AC": "selective"}, {}, "AC must be one of sel, full, offload, false; got 'selective'"),
    ("sp_not_boolean", {"SP": "maybe"}, {}, "SP must be true or false, got 'maybe'"),
    ("optimizer_offload", {"OPTIMIZER_OFFLOAD": "true"}, {}, "OPTIMIZER_OFFLOAD must be one of false, static, auto"),
    ("env", {"ENV": "k8s"}, {}, "ENV must be one of dsw, dlc; got 'k8s'"),
    ("save_hf_without_saves", {}, {"MP_SAVE": "false", "MP_SAVE_HF": "true"},
     "MP_SAVE_HF=true exports each saved checkpoint, but MP_SAVE=false saves none. Unset one of them."),
    ("tp_kv_heads", {"TP": "4"}, {}, "TP=4 must divide the 4 attention heads and 2 key/value heads (choose TP from [1, 2])"),
    ("gbs_dp", {"GLOBAL_BATCH_SIZE": "3"}, {"MP_NPROC_PER_NODE": "2"},
     "GLOBAL_BATCH_SIZE=3 must be a multiple of BATCH_SIZE x data-parallel size = 1 x 2"),
    ("seq_len", {"SEQ_LEN": "65536", "PAD_LEN": "65536", "TRAIN_TOKENS_OR_ITERS": "1000000000"}, {},
     "SEQ_LEN=65536 exceeds Qwen2.5-tiny's 32768 positions"),
    ("pad_len_raw", {"SFT": "true", "PAD_LEN": "256", "DATASET_PATH": "{train_json}",
                     "VALID_DATASET_PATH": "{valid_json}"}, {"MP_DATASET_TYPE": "raw"},
     "PAD_LEN=256 exceeds SEQ_LEN=128"),
    ("ac_layers", {"MODEL_SIZE": "0.5B", "AC": "full", "PP": "2"}, {"MP_AC_LAYERS": "5", "MP_NPROC_PER_NODE": "2"},
     "MP_AC_LAYERS=5 must divide the 12 layers per pipeline stage"),
    ("ac_block_layers", {"MODEL_SIZE": "0.5B", "AC": "full", "PP": "2"},
     {"MP_AC_METHOD": "block", "MP_AC_LAYERS": "13", "MP_NPROC_PER_NODE": "2"},
     "MP_AC_LAYERS=13 exceeds the 12 layers per pipeline stage (MP_AC_METHOD=block recomputes that many of them)"),
    ("ac_method", {}, {"MP_AC_METHOD": "selective"}, "MP_AC_METHOD must be one of uniform, block; got 'selective'"),
    ("missing_prefix", {"DATASET_PATH": "{root}/data/nope_text_document"}, {},
     "nope_text_document is not an idxmap dataset prefix: missing"),
    ("prefix_with_extension", {"DATASET_PATH": "{train}.bin"}, {}, "train_text_document.bin is not an idxmap"),
    ("sft_on_a_pretraining_prefix", {"SFT": "true", "DATASET_PATH": "{train}"}, {},
     "train_text_document is not an SFT idxmap: "),
    ("blend_weight", {"DATASET_PATH": "0.7 {train} -0.3 {valid}"}, {},
     "DATASET_PATH: the weight '-0.3' of "),
    ("blend_words", {"VALID_DATASET_PATH": "0.7 {train} {valid}"}, {},
     "has 3 words: neither one path nor a blend 'W1 P1 W2 P2 ...'"),
    ("blend_missing_prefix", {"DATASET_PATH": "0.5 {train} 0.5 {root}/data/absent_text_document"}, {},
     "absent_text_document is not an idxmap dataset prefix: missing"),
    ("missing_raw_json", {"SFT": "true", "DATASET_PATH": "{root}/data/nope.json", "VALID_DATASET_PATH": "{valid_json}"},
     {"MP_DATASET_TYPE": "raw"}, "nope.json is not a file; MP_DATASET_TYPE=raw reads a JSON/JSONL file"),
    ("not_a_checkpoint", {"PRETRAIN_CHECKPOINT_PATH": "{root}/data"}, {},
     "is neither a Hugging Face folder (config.json beside model.safetensors or model.safetensors.index.json) nor a "
     "Megatron checkpoint (no latest_checkpointed_iteration.txt)"),
    ("checkpoint_size", {"PRETRAIN_CHECKPOINT_PATH": "{checkpoint_05b}"}, {}, "MODEL_SIZE=tiny does not match"),
    ("hf_folder_size", {"PRETRAIN_CHECKPOINT_PATH": "{hf_05b}"}, {},
     "MODEL_SIZE=tiny does not match {hf_05b}/config.json:\n  num_hidden_layers: 2 (size table) vs 24 (config.json)"),
    ("hf_missing_shard", {"PRETRAIN_CHECKPOINT_PATH": "{hf_missing_shard}"}, {},
     "model.safetensors.index.json in {hf_missing_shard} lists shard files that are missing: "
     "{hf_missing_shard}/model-00002-of-00002.safetensors"),
    ("dlc_without_world_size", {"ENV": "dlc"}, {"RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "ENV=dlc needs the scheduler's WORLD_SIZE"),
    ("dlc_without_gpus", {"ENV": "dlc"}, {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "ENV=dlc needs KUBERNETES_CONTAINER_RESOURCE_GPU"),
    ("fp8_without_te", {"PR": "fp8"}, {}, "PR=fp8 needs Transformer Engine"),
    ("fp16_without_gpu", {"PR": "fp16"}, {}, "PR=fp16 needs a GPU"),
    ("optimizer_offload_without_gpu", {"OPTIMIZER_OFFLOAD": "static"}, {},
     "OPTIMIZER_OFFLOAD=static moves optimizer state from the GPU to the host"),
    ("auto_optimizer_offload_without_gpu", {"OPTIMIZER_OFFLOAD": "auto"}, {},
     "OPTIMIZER_OFFLOAD=auto moves optimizer state from the GPU to the host; without a GPU everything is on the "
     "host already"),
    ("offload_without_te", {"AC": "offload"}, {}, "AC=offload uses Transformer Engine's CPU offload"),
    ("vp_without_pp", {}, {"MP_VP": "2"}, "MP_VP (layers per virtual pipeline stage) needs PP >= 2"),
    ("vp_layers", {"MODEL_SIZE": "0.5B", "PP": "2"}, {"MP_VP": "5", "MP_NPROC_PER_NODE": "2"},
     "MP_VP=5 layers per virtual pipeline stage must divide the 12 layers"),
    ("cp_plain_kernels", {"CP": "2"}, {"MP_FUSED_KERNELS": "false", "MP_NPROC_PER_NODE": "2"},
     "MP_FUSED_KERNELS=false asks for megatron-core's plain DotProductAttention"),
    ("cp_seq_len", {"CP": "2", "SEQ_LEN": "126", "PAD_LEN": "126"}, {"MP_NPROC_PER_NODE": "2"},
     "SEQ_LEN=126 must be divisible by 2*CP = 4."),
    ("raw_pretraining", {"DATASET_PATH": "{train_json}", "VALID_DATASET_PATH": "{valid_json}"},
     {"MP_DATASET_TYPE": "raw"}, "MP_DATASET_TYPE=raw is for fine-tuning (SFT=true)"),
    ("packing_pretraining", {}, {"MP_SFT_PACKING": "true"}, "MP_SFT_PACKING=true needs SFT=true"),
    ("fused_kernels_not_boolean", {}, {"MP_FUSED_KERNELS": "fast"}, "MP_FUSED_KERNELS must be true or false"),
    ("cuda_graph_on_cpu", {}, {"MP_CUDA_GRAPH": "true"}, "MP_CUDA_GRAPH=true, but it needs a GPU"),
    ("tokens_below_one_iteration", {"TRAIN_TOKENS_OR_ITERS": "1000"}, {}, "tokens is less than one iteration"),
    ("warmup_not_below_train", {"SFT": "true", "TRAIN_TOKENS_OR_ITERS": "30", "WARMUP_TOKENS_OR_ITERS": "100"}, {},
     "WARMUP_TOKENS_OR_ITERS=100 gives 100 warmup iterations"),
    ("min_lr_above_lr", {"MIN_LR": "1e-4"}, {}, "MIN_LR=0.0001 is above LR=1e-05"),
    ("pp_layers", {"PP": "3"}, {"MP_NPROC_PER_NODE": "3"}, "PP=3 must divide the 2 layers of Qwen2.5-tiny"),
    ("model_parallel_world", {"TP": "2"}, {"MP_NPROC_PER_NODE": "3"}, "TP*PP*CP = 2*1*1 = 2 does not divide the 3"),
]


def invalid_argv(paths: Paths, overrides: dict | None) -> list[str]:
    if overrides is None:
        return argv(paths)[:-1]
    fill = {k: str(v) for k, v in vars(paths).items()}
    return argv(paths, **{k: v.format(**fill) for k, v in overrides.items()})


# Through the shell script: the parse-time errors and a sample of the later ones (each costs a process start).
SHELL_CASES = {"arg_count", "model_size", "precision", "ac_mode", "sp_not_boolean", "optimizer_offload", "env",
               "tp_kv_heads", "gbs_dp", "missing_prefix", "missing_raw_json", "checkpoint_size", "hf_missing_shard",
               "dlc_without_world_size", "fp8_without_te", "vp_without_pp"}


@pytest.mark.parametrize("case", [c for c in INVALID if c[0] in SHELL_CASES],
                         ids=[c[0] for c in INVALID if c[0] in SHELL_CASES])
def test_invalid_combination_stops_the_script_before_torchrun(paths, case):
    _, overrides, environ, message = case
    # No MP_DRY_RUN: if validation let this through, training would really start (and create the output folder).
    proc = run_script(invalid_argv(paths, overrides),
                      clean_environ(MP_TOKENIZER_PATH=str(paths.tokenizer), **environ), paths.root)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert message.format(**vars(paths)) in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "torch.distributed.run" not in proc.stdout + proc.stderr
    assert not paths.out.exists()


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_combination_never_starts_torchrun(paths, case, monkeypatch, capsys):
    """Every case, through the launcher's main() with process starts forbidden."""
    _, overrides, environ, message = case

    def forbidden(*args, **kwargs):
        raise AssertionError(f"torchrun was started: {args}")

    monkeypatch.setattr(launch_run, "_launch", forbidden)
    monkeypatch.setattr(launch_run.subprocess, "Popen", forbidden)
    status = launch_run.main(invalid_argv(paths, overrides), {"MP_TOKENIZER_PATH": str(paths.tokenizer), **environ})
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and message.format(**vars(paths)) in err, err
    assert not paths.out.exists()


# Refusals reached on a GPU machine only: (id, machine, overrides, environment, the message), through the launcher's
# main() on a pretend machine. (PR=fp8 without TE says what it says on a CPU, where INVALID has it.)
GPU_WITHOUT_TE = dataclasses.replace(GPU_TE, has_te=False, has_flash_attn=False)
GPU_INVALID = [
    ("cuda_graph_ac_offload", GPU_TE, {"AC": "offload"}, {"MP_CUDA_GRAPH": "true"},
     "MP_CUDA_GRAPH=true, but AC=offload copies activations to the host inside the step. Unset MP_CUDA_GRAPH"),
    ("packing_on_the_local_spec_ac_offload", GPU_TE, {"SFT": "true", "AC": "offload", "CP": "2"},
     {"MP_SFT_PACKING": "true"},
     "MP_SFT_PACKING=true with CP=2 (TE's thd format needs every sample's length divisible by 2 x CP) trains on "
     "megatron-core's local spec (packed samples through its own attention), but PR=fp8 and AC=offload need the "
     "Transformer Engine spec."),
    ("fp8_on_a_gpu_without_te", GPU_WITHOUT_TE, {"PR": "fp8"}, {},
     "PR=fp8 needs Transformer Engine on a GPU, and it is not importable here. Use PR=bf16"),
    ("ac_offload_pp", GPU_TE, {"AC": "offload", "PP": "2"}, {},
     "AC=offload does not work with PP > 1 in megatron-core 0.19.2."),
    ("ac_offload_all_layers", GPU_TE, {"AC": "offload"}, {"MP_AC_LAYERS": "2"},
     "MP_AC_LAYERS=2 must be below the model's 2 layers for AC=offload."),
]


@pytest.mark.parametrize("case", GPU_INVALID, ids=[c[0] for c in GPU_INVALID])
def test_gpu_only_refusals_never_start_torchrun(paths, case, monkeypatch, capsys):
    _, machine, overrides, environ, message = case
    monkeypatch.setattr(launch_run, "detect_machine", lambda launch, environ: machine)
    err = refused(paths, invalid_argv(paths, overrides), environ, monkeypatch, capsys)
    (error,) = [line for line in err.splitlines() if line.startswith("error: ")]  # this refusal, and only it
    assert error.startswith(f"error: {message}"), err


def test_every_invalid_combination_has_its_own_message(paths):
    messages = {}
    for case_id, overrides, environ, _ in INVALID:
        args = invalid_argv(paths, overrides)
        with pytest.raises(UserError) as err:
            launch = positional.parse(args, {"MP_TOKENIZER_PATH": str(paths.tokenizer), **environ})
            plan(paths, detect_machine(launch, environ), environ, args)
        messages[case_id] = str(err.value).splitlines()[0]
    repeated = {k: v for k, v in messages.items() if list(messages.values()).count(v) > 1}
    assert not repeated, repeated


@pytest.mark.parametrize("overrides", [{}, {"PR": "fp8"}, {"AC": "offload"}, {"MP_LORA_RANK": "8"}])
def test_packed_finetuning_takes_the_te_spec_where_te_is_present(paths, overrides):
    # TE's attention takes the samples' boundaries (thd, data/providers.py), so packing combines with fp8 and
    # AC=offload.
    environ = {"MP_SFT_PACKING": "true", **{k: v for k, v in overrides.items() if k.startswith("MP_")}}
    positionals = {k: v for k, v in overrides.items() if not k.startswith("MP_")}
    if "MP_LORA_RANK" in environ:
        positionals["PRETRAIN_CHECKPOINT_PATH"] = str(paths.checkpoint)
    launch, flags = api_flags(paths, SFT="true", environ=environ, **positionals)
    assert value(flags, "--transformer-impl") == "transformer_engine" and "--sft-packing" in flags
    assert not any("training on the local spec" in w for w in launch.warnings)
    assert GPU_TE.has_te, "the machine description must not be changed by validation"


@pytest.mark.parametrize("overrides, environ, why", [
    ({}, {"MP_CUDA_GRAPH": "true"}, "MP_CUDA_GRAPH=true (a replay refills the samples' boundaries in fixed-size buffers"),
    ({"CP": "2"}, {}, "CP=2 (TE's thd format needs every sample's length divisible by 2 x CP)"),
    ({"PP": "2", "BATCH_SIZE": "2", "GLOBAL_BATCH_SIZE": "16"}, {}, "PP > 1 with BATCH_SIZE > 1"),
    ({"PR": "fp32"}, {}, "PR=fp32 (TE's thd attention kernels take 16-bit inputs)"),
])
def test_packed_finetuning_keeps_the_local_spec_where_thd_cannot_go(paths, overrides, environ, why):
    launch, flags = api_flags(paths, SFT="true", environ={"MP_SFT_PACKING": "true", **environ}, **overrides)
    assert value(flags, "--transformer-impl") == "local" and "--attention-backend" not in flags
    assert f"MP_SFT_PACKING=true with {why}" in " ".join(launch.warnings)
    # There AC=offload (and PR=fp8), which need TE's spec, are refused with the reason.
    with pytest.raises(UserError) as err:
        api_flags(paths, SFT="true", AC="offload", environ={"MP_SFT_PACKING": "true", **environ}, **overrides)
    assert f"MP_SFT_PACKING=true with {why}" in str(err.value)
    assert "trains on megatron-core's local spec (packed samples through its own attention), but PR=fp8 and " \
           "AC=offload need the Transformer Engine spec" in str(err.value)


def test_packed_fp8_and_activation_offload_stay_refused_without_transformer_engine(paths):
    no_te = dataclasses.replace(GPU_TE, has_te=False, has_flash_attn=False)
    for overrides, message in (({"PR": "fp8"}, "PR=fp8 needs Transformer Engine"),
                               ({"AC": "offload"}, "AC=offload uses Transformer Engine's CPU offload")):
        with pytest.raises(UserError, match=message):
            api_flags(paths, no_te, SFT="true", environ={"MP_SFT_PACKING": "true"}, **overrides)
    _, flags = api_flags(paths, no_te, SFT="true", FL="false", environ={"MP_SFT_PACKING": "true"})
    assert value(flags, "--transformer-impl") == "local"


# ---- the model is the checkpoint's config.json: variants, MODEL_SIZE=auto, YaRN ----

def math_size():
    """Qwen2.5-Math's RoPE base and positions (rope_theta 10000, 4096) on the tiny shape."""
    from megatron_patch.model_sizes import QWEN2_5_SIZES

    return dataclasses.replace(QWEN2_5_SIZES["tiny"], rope_theta=10000.0, max_position_embeddings=4096)


def refused(paths: Paths, args: list[str], environ: dict, monkeypatch, capsys) -> str:
    """The launcher's stderr for a launch that must stop before torchrun."""
    def forbidden(*a, **kw):
        raise AssertionError(f"torchrun was started: {a}")

    monkeypatch.setattr(launch_run, "_launch", forbidden)
    monkeypatch.setattr(launch_run.subprocess, "Popen", forbidden)
    status = launch_run.main(args, {"MP_TOKENIZER_PATH": str(paths.tokenizer), **environ})
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: "), err
    assert not paths.out.exists()
    return err


def test_math_checkpoint_trains_with_its_own_rope_base_and_positions(paths):
    """config.json's rope_theta 10000 and 4096 positions reach Megatron under MODEL_SIZE=auto (through the shell
    script) and under the shape's name, with one note line saying they differ from the size table."""
    math = converted_checkpoint(paths.root / "qwen2.5-math-to-mcore", math_size())
    auto = dry_run(paths, argv(paths, MODEL_SIZE="auto", PRETRAIN_CHECKPOINT_PATH=str(math)))
    planned, named = api_flags(paths, PRETRAIN_CHECKPOINT_PATH=str(math))
    for flags in (auto.flags, named):
        assert value(flags, "--rotary-base") == "10000" and value(flags, "--max-position-embeddings") == "4096"
        assert value(flags, "--position-embedding-type") == "rope" and value(flags, "--num-layers") == "2"
    note = (f"{math / 'config.json'} differs from the tiny size table in rope_theta 10000 (table: 1000000), "
            "max_position_embeddings 4096 (table: 32768): following config.json.")
    assert [line for line in auto.stderr.splitlines() if line.startswith("note:")] == [f"note: {note}"]
    assert planned.notes == [note]
    # auto names its run folder after the shape's size-table entry
    assert Path(auto.value("--save")).name.startswith("mcore-qwen2.5-tiny-pretrain-")


def test_seq_len_beyond_the_configs_positions_is_refused_and_yarn_extends_them(paths, monkeypatch, capsys):
    math = converted_checkpoint(paths.root / "qwen2.5-math-to-mcore", math_size())
    long = argv(paths, MODEL_SIZE="auto", PRETRAIN_CHECKPOINT_PATH=str(math), SEQ_LEN="8192", PAD_LEN="8192",
                TRAIN_TOKENS_OR_ITERS="100000000")
    err = refused(paths, long, {}, monkeypatch, capsys)
    assert (f"SEQ_LEN=8192 exceeds Qwen2.5-tiny's 4096 positions (max_position_embeddings in {math / 'config.json'})"
            ". Lower SEQ_LEN, or extend the context with YaRN: MP_ROPE_SCALING=yarn:2.") in err
    launch = plan(paths, GPU_TE, {"MP_ROPE_SCALING": "yarn:2"}, long).launch
    flags = launch_flags.megatron_flags(launch, GPU_TE, str(paths.tokenizer))
    assert flags[flags.index("--position-embedding-type"):][:9] == [
        "--position-embedding-type", "yarn", "--rotary-scaling-factor", "2.0",
        "--yarn-original-max-position-embeddings", "4096", "--yarn-beta-fast", "32.0", "--yarn-beta-slow"]
    assert value(flags, "--max-position-embeddings") == "8192" and value(flags, "--rotary-base") == "10000"
    assert launch.run_name.endswith("-yarn-2")  # a run folder of its own: never resumes the plain-RoPE run
    err = refused(paths, argv(paths, SEQ_LEN="262144", PAD_LEN="128", TRAIN_TOKENS_OR_ITERS="10000000000"),
                  {"MP_ROPE_SCALING": "yarn:4"}, monkeypatch, capsys)
    assert ("SEQ_LEN=262144 exceeds Qwen2.5-tiny's 131072 positions (YaRN's factor 4 x 32768 original positions). "
            "Lower SEQ_LEN, or raise the YaRN factor") in err


def test_auto_with_a_shape_of_its_own_runs_as_custom(paths):
    from megatron_patch.model_sizes import QWEN2_5_SIZES

    fine_tune = dataclasses.replace(QWEN2_5_SIZES["tiny"], num_layers=4, ffn_hidden_size=96, rms_norm_eps=1e-5)
    ckpt = converted_checkpoint(paths.root / "my-fine-tune", fine_tune, overrides={"max_window_layers": 2})
    planned, flags = api_flags(paths, MODEL_SIZE="auto", PRETRAIN_CHECKPOINT_PATH=str(ckpt), PP="2")
    assert planned.run_name.startswith("mcore-qwen2.5-custom-pretrain-") and not planned.notes
    assert value(flags, "--num-layers") == "4" and value(flags, "--ffn-hidden-size") == "96"
    assert value(flags, "--norm-epsilon") == "1e-05"


def test_yarn_in_config_json_is_followed_and_the_knob_replaces_it_with_a_warning(paths):
    from megatron_patch.model_sizes import YarnScaling

    yarn = dataclasses.replace(math_size(), rope_scaling=YarnScaling(4.0, 4096))
    ckpt = converted_checkpoint(paths.root / "math-yarn", yarn)
    planned, flags = api_flags(paths, MODEL_SIZE="auto", PRETRAIN_CHECKPOINT_PATH=str(ckpt), SEQ_LEN="16384",
                               PAD_LEN="128", TRAIN_TOKENS_OR_ITERS="100000000")
    assert value(flags, "--rotary-scaling-factor") == "4.0" and value(flags, "--max-position-embeddings") == "16384"
    assert not any("YaRN" in w for w in planned.warnings)
    planned, flags = api_flags(paths, environ={"MP_ROPE_SCALING": "yarn:8"}, MODEL_SIZE="auto",
                               PRETRAIN_CHECKPOINT_PATH=str(ckpt))
    assert value(flags, "--rotary-scaling-factor") == "8.0"
    assert value(flags, "--yarn-original-max-position-embeddings") == "4096"
    assert f"MP_ROPE_SCALING=yarn:8 replaces the YaRN factor 4 of {ckpt / 'config.json'}." in planned.warnings


@pytest.mark.parametrize("overrides, environ, message", [
    ({"MODEL_SIZE": "auto"}, {}, "MODEL_SIZE=auto takes the model from PRETRAIN_CHECKPOINT_PATH's config.json, but "
                                 "PRETRAIN_CHECKPOINT_PATH is none. Pass a Hugging Face folder or a "
                                 "checkpoint converted by the toolkit's convertor"),
    ({"MODEL_SIZE": "auto", "PRETRAIN_CHECKPOINT_PATH": "{root}/data"}, {},
     "MODEL_SIZE=auto takes the model from PRETRAIN_CHECKPOINT_PATH's config.json, but there is no "
     "{root}/data/config.json"),
    ({}, {"MP_ROPE_SCALING": "linear:2"}, "MP_ROPE_SCALING must be yarn:FACTOR with a factor above 1, e.g. yarn:4"),
    ({}, {"MP_ROPE_SCALING": "yarn:1"}, "MP_ROPE_SCALING must be yarn:FACTOR with a factor above 1"),
    ({"MODEL_SIZE": "0.6B"}, {}, "MODEL_SIZE must be one of tiny, 0.5B, 1.5B, 3B, 7B, 14B, 32B, 72B, or auto"),
])
def test_model_choices_that_stop_before_torchrun(paths, overrides, environ, message, monkeypatch, capsys):
    err = refused(paths, invalid_argv(paths, overrides), environ, monkeypatch, capsys)
    assert message.format(root=paths.root) in err, err


def test_a_config_json_field_megatron_cannot_build_stops_the_script_naming_it(paths):
    ckpt = converted_checkpoint(paths.root / "sliding", "tiny", overrides={"use_sliding_window": True,
                                                                           "sliding_window": 64})
    for size in ("tiny", "auto"):
        proc = run_script(argv(paths, MODEL_SIZE=size, PRETRAIN_CHECKPOINT_PATH=str(ckpt)),
                          clean_environ(MP_TOKENIZER_PATH=str(paths.tokenizer)), paths.root)
        assert proc.returncode == 2 and "torch.distributed.run" not in proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"error: {ckpt / 'config.json'} describes a model this toolkit cannot train "
                                      "as written:\n  use_sliding_window: true (sliding-window attention"), proc.stderr
        assert not paths.out.exists()


def test_rendezvous_ports_come_from_outside_the_ephemeral_range():
    """A free port of the ephemeral range can become some outgoing connection's source port before the rendezvous
    listens on it (EADDRINUSE, seen with gloo runs side by side); ports below the range are taken only by binds."""
    from megatron_patch import hardware

    ephemeral = hardware._ephemeral_ports()
    ports = {hardware.free_port() for _ in range(8)}
    assert all(port not in ephemeral and port in hardware.RENDEZVOUS_PORTS for port in ports), (ports, ephemeral)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports.pop()))
        taken.listen()
        assert hardware.free_port() != taken.getsockname()[1]
