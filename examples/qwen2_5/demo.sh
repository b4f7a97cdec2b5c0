#!/usr/bin/env bash
# The best practice end to end on the embedded tiny default (what `make demo` runs); see megatron_patch/demo.py.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
cd "$ROOT"
PYTHONWARNINGS=ignore exec "$PY" -m megatron_patch.demo "$@"
