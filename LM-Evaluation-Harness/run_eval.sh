#!/usr/bin/env bash
# Evaluate a Hugging Face checkpoint on CMMLU / C-Eval with lm-eval, offline; logic lives in run_eval.py.
#   bash run_eval.sh MODEL_DIR [TASKS=cmmlu,ceval-valid] [extra lm_eval args, e.g. --limit 10 --batch_size 8]
# Data: prepare it once with prepare_data.py; EVAL_DATA_DIR says where (default: this folder's data/).
# MP_DRY_RUN=1 prints the lm_eval command and runs nothing.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 MODEL_DIR [TASKS] [extra lm_eval args]   (TASKS default: cmmlu,ceval-valid)" >&2
    exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
# The project's venv when there is one, so lm-eval and accelerate are the locked ones.
. "$ROOT/scripts/python_env.sh"
# EVAL_DRY_RUN=1 was this script's dry-run switch before MP_DRY_RUN=1, every script's one convention.
[[ -n "${EVAL_DRY_RUN:-}" ]] && { echo "warning: EVAL_DRY_RUN is deprecated; use MP_DRY_RUN=1" >&2; export MP_DRY_RUN="$EVAL_DRY_RUN"; }
exec "$PY" "$HERE/run_eval.py" "$@"
