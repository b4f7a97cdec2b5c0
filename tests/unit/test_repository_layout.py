"""The layout rules of issue 39, read from the files: no `sys.path` edit anywhere, tests never import a benchmark
(the harness is what they share), benchmarks run as `python -m benchmarks.NAME`, module names read apart."""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
# megatron_patch/arguments.py and launch/arguments.py: renamed in the other half of issue 39 (positional.py,
# megatron_flags.py); empty this once they are.
KNOWN_DUPLICATE_NAMES = {"arguments.py"}


def tracked(*patterns: str) -> list[Path]:
    """The repository's own files (git's index: nothing of .venv, caches or outputs)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [REPO / name for name in names if (REPO / name).is_file()]


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_sys_path_edit_anywhere():
    edits = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*(\+?=|\[)")
    found = [f"{p.relative_to(REPO)}:{n}" for p in tracked("*.py", "*.sh")
             for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if edits.search(line) and p != Path(__file__)]
    assert found == [], "a sys.path edit; import the package (or run `python -m`) instead: " + ", ".join(found)


def test_no_test_imports_a_benchmark():
    benchmark_modules = {p.stem for p in BENCHMARKS.glob("*.py")} - {"__init__"}
    for path in tracked("tests/*.py"):
        modules = imported_modules(path)
        by_package = {m for m in modules if m == "benchmarks" or m.startswith("benchmarks.")}
        by_path = {m for m in modules if m.split(".")[0] in benchmark_modules}
        assert not by_package and not by_path, f"{path.relative_to(REPO)} imports {by_package | by_path}: " \
            "tests use megatron_patch.harness, never a benchmark"
    pythonpath = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["pythonpath"]
    assert "benchmarks" not in pythonpath and "." in pythonpath  # `benchmarks` is a package, never a path


def test_benchmarks_are_a_package_run_as_modules():
    assert (BENCHMARKS / "__init__.py").is_file()
    # A command that runs a benchmark file by its path: "python benchmarks/x.py", "torchrun ... benchmarks/x.py".
    by_path = re.compile(r"(python3?|torchrun)\b[^`\n|]*?\sbenchmarks/\w+\.py")
    found = [f"{p.relative_to(REPO)}:{n}" for p in tracked("*.md", "*.sh", "*.py", "Makefile")
             for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if by_path.search(line) and p != Path(__file__)]
    assert found == [], "run benchmarks as `python -m benchmarks.NAME`: " + ", ".join(found)


def test_no_two_modules_share_a_name():
    names = Counter(p.name for folder in ("megatron_patch", "benchmarks", "LM-Evaluation-Harness")
                    for p in tracked(f"{folder}/*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert {name for name, count in names.items() if count > 1} == KNOWN_DUPLICATE_NAMES


def test_benchmarks_stay_small():
    files = [p for p in BENCHMARKS.iterdir() if p.is_file()]
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)
    assert lines < 2000, f"benchmarks/ has {lines} lines; move what it shares into megatron_patch/harness"


def test_functions_in_the_package_and_benchmarks_are_under_80_lines():
    long = []
    for path in tracked("megatron_patch/*.py", "benchmarks/*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length >= 80:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert long == [], "functions of 80 lines or more: " + ", ".join(long)
