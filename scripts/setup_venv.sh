#!/usr/bin/env bash
# Creates .venv at the repo root and installs this project with the exact dependencies of requirements-lock.txt
# (versions and hashes, for Linux x86_64 / Python 3.12; `make lock` writes it). Elsewhere it installs the newest
# releases pyproject.toml's floors allow, and says so. Idempotent: a stamp keyed on what it installs from makes a
# second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."

lock=requirements-lock.txt
lock_python=3.12  # the lock's target, with Linux x86_64 (scripts/lock.sh resolves for the same)

python_is() { "$1" -c "import sys; sys.exit(0 if sys.version_info[:2] $2 else 1)" >/dev/null 2>&1; }
is_py312() { python_is "$1" '>= (3, 12)'; }
is_lock_python() { python_is "$1" "== ($(echo "$lock_python" | tr . ,))"; }

find_python() {
  local candidates=("${PYTHON:-}" "python$lock_python")
  # pyenv keeps interpreters it has not been told to expose; use them directly.
  for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$lock_python".*/bin; do candidates+=("$dir/python3"); done
  candidates+=(python3 python3.13)
  for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[3-9]*/bin; do candidates+=("$dir/python3"); done
  local c
  for c in "${candidates[@]}"; do  # the lock's Python first, then any newer one
    [ -n "$c" ] && is_lock_python "$c" && { command -v "$c" || echo "$c"; return 0; }
  done
  for c in "${candidates[@]}"; do
    [ -n "$c" ] && is_py312 "$c" && { command -v "$c" || echo "$c"; return 0; }
  done
  return 1
}

stamp_key=$(cat pyproject.toml scripts/setup_venv.sh "$lock" | sha256sum | cut -c1-16)
stamp=.venv/.installed-$stamp_key
if [ -f "$stamp" ] && is_py312 .venv/bin/python; then exit 0; fi

if ! is_py312 .venv/bin/python 2>/dev/null; then
  if ! py=$(find_python); then
    echo "error: this project needs Python >= 3.12 (the lock is for $lock_python) and none was found (tried" >&2
    echo "\$PYTHON, python$lock_python, python3, python3.13 and pyenv's versions). Install one, e.g." >&2
    echo "'apt-get install python3.12-venv' or 'pyenv install 3.12', or point PYTHON=/path/to/python3.12 at it," >&2
    echo "then run 'make setup' again." >&2
    exit 1
  fi
  echo "setup: creating .venv with $py ($("$py" --version 2>&1))"
  rm -rf .venv
  "$py" -m venv .venv
fi

# pip's output goes to a log, shown only when the install fails.
log=.venv/install.log
quiet_pip() {
  .venv/bin/python -m pip install --quiet "$@" >>"$log" 2>&1 \
    || { grep -v "^WARNING: Location 'file:" "$log" | tail -40 >&2; echo "error: pip install $* failed; full log: $log" >&2; exit 1; }
}
: >"$log"
if [ "$(uname -sm)" = "Linux x86_64" ] && is_lock_python .venv/bin/python; then
  echo "setup: installing $lock into .venv: exact versions, hash-checked (first time: a few minutes)"
  # --no-deps: the lock is the whole set; the project is built with the locked setuptools, nothing fetched unpinned.
  quiet_pip --require-hashes --no-deps -r "$lock"
  quiet_pip --no-deps --no-build-isolation -e .
  .venv/bin/python -m pip check >>"$log" 2>&1 \
    || { tail -20 "$log" >&2; echo "error: $lock is not a consistent set (pip check above); run 'make lock'" >&2; exit 1; }
  installed="$lock ($(grep -c '^[A-Za-z0-9]' "$lock") packages, Linux x86_64, Python $lock_python)"
else
  echo "warning: $lock is for Linux x86_64 with Python $lock_python; this is $(uname -sm) with" \
       "$(.venv/bin/python --version 2>&1): installing the newest releases pyproject.toml allows (not the tested set)" >&2
  quiet_pip --upgrade pip
  quiet_pip -e '.[test]'
  installed="pyproject.toml's dependencies, unlocked"
fi
.venv/bin/python -W ignore -c 'import megatron.core, megatron.training, torch, transformers' 2>>"$log" \
  || { echo "error: the install finished but megatron-core/torch/transformers do not import; see $log" >&2; exit 1; }
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: done, installed $installed"
