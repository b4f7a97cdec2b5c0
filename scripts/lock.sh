#!/usr/bin/env bash
# `make lock`: resolve pyproject.toml's dependencies and test extras (and pip) for Linux x86_64 / Python 3.12 into
# requirements-lock.txt, every file hashed, then reinstall .venv from it and run the test suite.
# Pins already in the lock are kept (a new or removed dependency changes only what it must); UPGRADE=1 moves every
# package to the newest release pyproject.toml allows. To hold a package back, e.g. a machine's torch cap:
#   UV_CONSTRAINT=/etc/xdg/pip/constraints.txt make lock UPGRADE=1
set -euo pipefail
cd "$(dirname "$0")/.."

lock=requirements-lock.txt
uv_version=0.13.10  # the resolver's version decides the lock's layout: one for everyone
tools="${XDG_CACHE_HOME:-$HOME/.cache}/megatron_patch/uv-$uv_version"
if [ ! -x "$tools/bin/uv" ]; then
  echo "lock: installing uv $uv_version into $tools"
  python3 -m venv "$tools" && "$tools/bin/python" -m pip install --quiet "uv==$uv_version"
fi

before=$(cat "$lock" 2>/dev/null || true)
# pip comes from stdin: the installer make setup upgrades .venv's own pip to is pinned too.
printf 'pip\n' | "$tools/bin/uv" pip compile pyproject.toml - --extra test --quiet \
  --python-version 3.12 --python-platform x86_64-manylinux_2_28 --generate-hashes \
  --custom-compile-command "make lock" ${UPGRADE:+--upgrade} --output-file "$lock"

if [ "$before" = "$(cat "$lock")" ]; then
  echo "lock: $lock is unchanged"
  exit 0
fi
echo "lock: $lock changed:"
diff <(printf '%s\n' "$before" | grep -E '^[A-Za-z0-9]') <(grep -E '^[A-Za-z0-9]' "$lock") | grep '^[<>]' | sed 's/ \\$//' || true
echo "lock: installing it into .venv and running the test suite (make test)"
exec make test
