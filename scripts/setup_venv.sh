#!/usr/bin/env bash
# Creates .venv at the repo root with Python >= 3.12 and installs this project with its pinned dependencies.
# Idempotent: a stamp keyed on pyproject.toml makes a second run return at once.
set -euo pipefail
cd "$(dirname "$0")/.."

is_py312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local candidates=("${PYTHON:-}" python3.13 python3.12 python3)
  # pyenv keeps interpreters it has not been told to expose; use them directly.
  for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin; do candidates+=("$dir/python3"); done
  for c in "${candidates[@]}"; do
    [ -n "$c" ] || continue
    if is_py312 "$c"; then command -v "$c" || echo "$c"; return 0; fi
  done
  return 1
}

stamp_key=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
stamp=.venv/.installed-$stamp_key
if [ -f "$stamp" ] && is_py312 .venv/bin/python; then exit 0; fi

if ! is_py312 .venv/bin/python 2>/dev/null; then
  if ! py=$(find_python); then
    echo "error: this project needs Python >= 3.12 and none was found (tried \$PYTHON, python3.13, python3.12," >&2
    echo "python3 and pyenv's versions). Install one, e.g. 'apt-get install python3.12-venv' or" >&2
    echo "'pyenv install 3.12', or point PYTHON=/path/to/python3.12 at it, then run 'make setup' again." >&2
    exit 1
  fi
  echo "setup: creating .venv with $py ($("$py" --version 2>&1))"
  rm -rf .venv
  "$py" -m venv .venv
fi

echo "setup: installing the project and its pinned dependencies into .venv (first time: a few minutes)"
# pip's output goes to a log, shown only when the install fails.
log=.venv/install.log
quiet_pip() {
  .venv/bin/python -m pip install --quiet "$@" >>"$log" 2>&1 \
    || { grep -v "^WARNING: Location 'file:" "$log" | tail -40 >&2; echo "error: pip install $* failed; full log: $log" >&2; exit 1; }
}
: >"$log"
quiet_pip --upgrade pip
quiet_pip -e '.[test]'
.venv/bin/python -W ignore -c 'import megatron.core, megatron.training, torch, transformers' 2>>"$log" \
  || { echo "error: the install finished but megatron-core/torch/transformers do not import; see the pip output above" >&2; exit 1; }
rm -f .venv/.installed-*
touch "$stamp"
echo "setup: done"
