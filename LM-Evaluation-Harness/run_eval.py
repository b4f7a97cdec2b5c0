"""Evaluate a Hugging Face checkpoint on CMMLU / C-Eval with the real lm-eval package, offline.

    run_eval.sh MODEL_DIR [TASKS] [extra lm_eval args...]      (TASKS default: cmmlu,ceval-valid)

Runs the best practice's command,
    accelerate launch --main_process_port 29051 -m lm_eval --model hf \
        --model_args pretrained=MODEL_DIR,trust_remote_code=False --tasks cmmlu,ceval-valid --batch_size 16
(upstream's trust_remote_code=True turned off: Qwen2 is built into transformers, so trusting would only let a .py
file in MODEL_DIR run; pass lm-eval's own --trust_remote_code for a model that needs its code),
data parallel with one process per visible GPU (plain `python -m lm_eval --device cpu` without a GPU), with the
hub switched off and lm-eval's cmmlu/ceval-valid reading prepare_data.py's files from EVAL_DATA_DIR.
Results (JSON, plus the task configs used) go to MODEL_DIR/eval_results/ unless --output_path is given; they
appear only once lm-eval has finished. Ctrl-C stops it with one line and exit status 130, writing no results.

MODEL_DIR must hold Hugging Face weights, config.json and a tokenizer, or be a PEFT adapter folder (the convertor's
export of a LoRA run: adapter_config.json names the base model's folder, which lm-eval loads with the adapter);
a Megatron checkpoint folder is refused with the convertor command that turns it back into Hugging Face format.

Environment: EVAL_DATA_DIR (default LM-Evaluation-Harness/data), MAIN_PROCESS_PORT (default 29051),
MP_DRY_RUN=1 prints the lm_eval command instead of running it, and writes nothing (run_eval.sh still takes the
older EVAL_DRY_RUN=1, with a warning). HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE default to 1; export them as 0
to let lm-eval reach the hub.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from eval_benchmarks import BENCHMARKS, HERE, Benchmark, default_data_dir, prepare_command
from megatron_patch import process_lifetime
from megatron_patch.errors import UserError, dry_run_requested, report_user_errors, stop_signals_ignored

DEFAULT_TASKS = "cmmlu,ceval-valid"
DEFAULT_BATCH_SIZE = "16"
DEFAULT_PORT = "29051"
MIN_LM_EVAL = "0.4.12"  # the TaskManager API local_tasks.py reads lm-eval's own configs with
# Without these, every hub lookup on a cluster without internet waits out ~25 s of retries before failing.
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# What transformers' from_pretrained loads weights from (one file, or an index of shards).
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# What marks a Megatron checkpoint: a training --save folder's tracker, or one torch_dist iteration folder.
MEGATRON_MARKERS = ("latest_checkpointed_iteration.txt", "metadata.json", "*.distcp", "iter_*", "release")
CONVERT_BACK = HERE.parent / "toolkits/distributed_checkpoints_convertor/scripts/qwen2_5/run_8xH20.sh"


def peft_adapter_base(model_dir: Path) -> Path | None:
    """The base model's folder of a PEFT adapter folder (adapter_config.json), None for any other folder."""
    config = model_dir / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise UserError(f"error: MODEL_DIR {model_dir} is a PEFT adapter over {base!r}, which is not a folder here. "
                        f"Set base_model_name_or_path in {config} to the base model's Hugging Face folder (lm-eval "
                        "loads it offline, then the adapter).")
    if not (model_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"error: MODEL_DIR {model_dir} has adapter_config.json but no adapter_model.safetensors; "
                        "export the LoRA run again (the convertor's MG2HF writes both).")
    return Path(base)


def model_args(model_dir: Path) -> str:
    """lm-eval's --model_args for MODEL_DIR: the model, or the base model with the PEFT adapter."""
    base = peft_adapter_base(model_dir)
    loads = f"pretrained={model_dir}" if base is None else f"pretrained={base},peft={model_dir}"
    return f"{loads},trust_remote_code=False"


def check_model_dir(model_dir: Path) -> None:
    """MODEL_DIR is a Hugging Face checkpoint lm-eval can load: weights (readable, where safetensors), config.json
    and a tokenizer (a PEFT adapter's base model is). Checked before lm-eval starts, which would otherwise die deep
    inside transformers."""
    if not model_dir.is_dir():
        raise UserError(f"error: MODEL_DIR {model_dir} is not a folder.")
    base = peft_adapter_base(model_dir)
    if base is not None:
        return check_model_dir(base)
    if not any((model_dir / name).is_file() for name in HF_WEIGHT_FILES):
        megatron = sorted({p.name for pattern in MEGATRON_MARKERS for p in model_dir.glob(pattern)})
        if megatron:
            hf_dir = model_dir if (model_dir / "config.json").is_file() else "<the Hugging Face model you started from>"
            back = model_dir.with_name(f"{model_dir.name}-hf")
            raise UserError(
                f"error: MODEL_DIR {model_dir} is a Megatron checkpoint ({', '.join(megatron[:3])}), not Hugging Face "
                "weights, so lm-eval cannot load it. Convert it back to Hugging Face format first:\n"
                f"  bash {CONVERT_BACK} auto {model_dir} {back} true false bf16 {hf_dir}\n"
                f"then evaluate the converted folder: bash {HERE / 'run_eval.sh'} {back}"
            )
        raise UserError(f"error: MODEL_DIR {model_dir} holds no Hugging Face weights (none of "
                        f"{', '.join(HF_WEIGHT_FILES)}); pass the folder save_pretrained() wrote, or the output of "
                        "the Megatron -> HF conversion (convert it back first).")
    if not (model_dir / "config.json").is_file():
        raise UserError(
            f"error: MODEL_DIR {model_dir} has no config.json, so it is not a complete Hugging Face checkpoint.\n"
            "Copy the config.json of the Hugging Face model you started from into it (the Megatron -> HF "
            "conversion does that when given HF_DIR)."
        )
    if not any(all((model_dir / name).is_file() for name in files) for files in TOKENIZER_FILE_SETS):
        raise UserError(
            f"error: MODEL_DIR {model_dir} has no tokenizer (tokenizer.json, or vocab.json + merges.txt).\n"
            "Copy the tokenizer files of the Hugging Face model you started from into it."
        )
    if any(model_dir.glob("*.safetensors")) or (model_dir / "model.safetensors.index.json").is_file():
        from megatron_patch.convert.hf_io import HFCheckpointReader

        HFCheckpointReader(model_dir)  # names a truncated or corrupt shard, or one the index lists but lacks


def check_lm_eval_version() -> None:
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("lm_eval")) < Version(MIN_LM_EVAL):
        raise UserError(f"error: lm-eval {version('lm_eval')} is installed; run_eval.sh needs lm-eval>={MIN_LM_EVAL}.")


def benchmark_of(task: str) -> Benchmark | None:
    """The benchmark a --tasks entry belongs to: its group, or one of its subject tasks."""
    for bench in BENCHMARKS.values():
        if task == bench.group or task.startswith(f"{bench.group}_"):
            return bench
    return None


def write_task_configs(tasks: list[str], data_dir: Path, tasks_root: Path, write: bool = True) -> None:
    """Point each requested benchmark at its local data, or stop with how to get that data (write=False: only
    check that the data is there)."""
    from local_tasks import write_local_tasks

    # Start clean: configs left by an earlier run (another lm-eval, other data) must not be indexed.
    if write:
        shutil.rmtree(tasks_root, ignore_errors=True)
    requested = {bench.name: bench for bench in map(benchmark_of, tasks) if bench is not None}
    for bench in requested.values():
        local = write_local_tasks(bench, data_dir, tasks_root, write)
        data_folder = data_dir / bench.name
        if not local.prepared:
            raise UserError(
                f"error: no local {bench.name} data for task '{bench.group}': {data_folder} is missing or holds no "
                f"subject with all of {', '.join(bench.splits)}.\n"
                f"lm-eval's built-in task would fetch it from the Hugging Face hub, which is switched off here.\n"
                f"Get the data once, on any machine with internet:\n  {bench.download_hint}\n"
                f"then convert it:\n  {prepare_command(bench, data_dir)}\n"
                f"(or set EVAL_DATA_DIR to where you prepared it before)."
            )
        missing_subtasks = [t for t in tasks if t in local.unprepared]
        if missing_subtasks:
            raise UserError(f"error: no local data in {data_folder} for {', '.join(missing_subtasks)}; "
                            f"rerun {prepare_command(bench, data_dir)} with a download that has them.")
        if local.unprepared:
            print(f"warning: {bench.group} covers {len(local.prepared)} of {len(local.prepared) + len(local.unprepared)} "
                  f"subjects, those prepared in {data_folder}; missing: {', '.join(local.unprepared)}", file=sys.stderr)


def passed(extra: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in extra)


def build_command(model_dir: Path, tasks: str, extra: list[str], include_path: Path, output_path: Path,
                  num_gpus: int, python: str = sys.executable, port: str = DEFAULT_PORT) -> list[str]:
    """The lm_eval command line; defaults are added only where the user's extra args don't set them."""
    # One process per GPU, each holding a full model replica (lm-eval's data parallel); an explicit --device
    # asks for a single device, which plain `python -m lm_eval` gives.
    if num_gpus > 0 and not passed(extra, "--device"):
        launcher = [python, "-m", "accelerate.commands.accelerate_cli", "launch",
                    "--num_processes", str(num_gpus), "--main_process_port", port, "-m", "lm_eval"]
    else:
        launcher = [python, "-m", "lm_eval"]
    # Qwen2 is built into transformers: trusting remote code would only run .py files lying in MODEL_DIR. lm-eval's
    # own --trust_remote_code (or --model_args trust_remote_code=True) in `extra` overrides this.
    command = [*launcher, "--model", "hf", "--model_args", model_args(model_dir),
               "--tasks", tasks, "--include_path", str(include_path)]
    defaults = {"--batch_size": DEFAULT_BATCH_SIZE, "--output_path": str(output_path)}
    if num_gpus == 0:
        defaults["--device"] = "cpu"
    for flag, value in defaults.items():
        if not passed(extra, flag):
            command += [flag, value]
    return command + extra


def output_path_of(extra: list[str], model_dir: Path) -> Path:
    for i, arg in enumerate(extra):
        if arg.startswith("--output_path="):
            return Path(arg.split("=", 1)[1]).resolve()
        if arg == "--output_path" and i + 1 < len(extra):
            return Path(extra[i + 1]).resolve()
    return model_dir / "eval_results"


def lm_eval_env(environ: dict[str, str]) -> dict[str, str]:
    return {**OFFLINE_DEFAULTS, **environ}  # a variable the user set wins, e.g. HF_HUB_OFFLINE=0


def visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@report_user_errors(stopped="no results were written; run the same command to evaluate again")
def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    model_dir = Path(argv[0]).expanduser().resolve()
    has_tasks = len(argv) > 1 and not argv[1].startswith("-")
    tasks = argv[1] if has_tasks else DEFAULT_TASKS
    extra = argv[2:] if has_tasks else argv[1:]
    for flag, why in (("--tasks", "give TASKS as the second argument"),
                      ("--include_path", "run_eval.sh passes its own, with the local cmmlu/ceval-valid tasks"),
                      ("--model", "run_eval.sh evaluates Hugging Face checkpoints with --model hf")):
        if passed(extra, flag):
            raise UserError(f"error: don't pass {flag}: {why}. (Extra model args go in --model_args key=value,...)")

    check_model_dir(model_dir)
    check_lm_eval_version()
    dry = dry_run_requested()
    output_path = output_path_of(extra, model_dir)
    tasks_root = output_path / "lm_eval_tasks"
    write_task_configs([t.strip() for t in tasks.split(",") if t.strip()], default_data_dir(), tasks_root,
                       write=not dry)

    command = build_command(model_dir, tasks, extra, tasks_root, output_path, visible_gpu_count(),
                            port=os.environ.get("MAIN_PROCESS_PORT", DEFAULT_PORT))
    print("+ " + shlex.join(command), flush=True)
    if dry:
        return 0
    return run_lm_eval(command, output_path, lm_eval_env(dict(os.environ)))


def with_output_path(command: list[str], path: Path) -> list[str]:
    """The command with its --output_path value replaced by `path`."""
    changed = list(command)
    for i, arg in enumerate(changed):
        if arg == "--output_path":
            changed[i + 1] = str(path)
        elif arg.startswith("--output_path="):
            changed[i] = f"--output_path={path}"
    return changed


def run_lm_eval(command: list[str], output_path: Path, env: dict[str, str]) -> int:
    """lm-eval, writing into a hidden folder beside OUTPUT_PATH (`.NAME.partial-PID`, which mirrors OUTPUT_PATH's
    parent); its files move into place once it has exited 0, the results JSONs last. lm-eval writes a results
    JSON and then each task's samples, so a stop (its whole process tree is killed, see errors.py) or a failure
    halfway would otherwise leave a complete-looking results file beside half of its samples, or a cut one."""
    staging = output_path.parent / f".{output_path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        code = process_lifetime.run_owned_child(with_output_path(command, staging / output_path.name), env)
        if code == 0:
            with stop_signals_ignored():  # a stop now is too late: lm-eval has finished
                _move_into_place(staging, output_path.parent)
        return code
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, destination: Path) -> None:
    written = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name.startswith("results"))
    for path in written:
        target = destination / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
