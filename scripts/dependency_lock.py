"""requirements-lock.txt read back: {package: version}, and pip constraints made from it.

    python scripts/dependency_lock.py constraints [--except-installed]

prints the lock as `name==version` lines (no hashes: pip takes none in a constraints file). --except-installed
leaves out every package this interpreter already has, so an image's own torch, Transformer Engine and the
libraries built against them stay as they are, and only what pip adds comes from the lock (the Dockerfile).
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements-lock.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def normalize(name: str) -> str:
    """PEP 503's form of a package name: `Jinja2`, `typing_extensions` -> `jinja2`, `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{normalized name: version} of every package the lock pins."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def installed_packages() -> dict[str, str]:
    """{normalized name: version} of every distribution this interpreter can import from."""
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def constraints(pins: dict[str, str], leave_out: set[str] = frozenset()) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()) if name not in leave_out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["constraints"])
    parser.add_argument("--except-installed", action="store_true",
                        help="leave out the packages this interpreter already has")
    args = parser.parse_args(argv)
    leave_out = set(installed_packages()) if args.except_installed else set()
    sys.stdout.write(constraints(read_lock(), leave_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
