#!/usr/bin/env bash
# The best practice end to end on the embedded tiny default (what `make demo` runs); see demo.py beside it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/scripts/python_env.sh"
cd "$ROOT"
PYTHONWARNINGS=ignore exec "$PY" "$ROOT/examples/qwen2_5/demo.py" "$@"
