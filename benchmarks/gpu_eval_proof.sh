#!/usr/bin/env bash
# GPU proof for evaluation: a random-init Qwen2.5-0.5B-shaped HF model scored on the full CMMLU test set
# (11,582 questions) through LM-Evaluation-Harness/run_eval.sh. Usage: benchmarks/gpu_eval_proof.sh TOKENIZER_DIR EVAL_DATA_DIR OUT
set -euo pipefail
TOK=$1 DATA=$2 OUT=$3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/python_env.sh"
"$PY" -m megatron_patch.hf_checkpoint 0.5B "$OUT/qwen0.5b-random" \
  --dtype bfloat16 --tokenizer "$TOK"
start=$(date +%s)
EVAL_DATA_DIR=$DATA PYTHON=$PY bash "$ROOT/LM-Evaluation-Harness/run_eval.sh" "$OUT/qwen0.5b-random" cmmlu --batch_size 64 \
  > "$OUT/eval.log" 2>&1 || { tail -40 "$OUT/eval.log"; exit 1; }
echo "full CMMLU on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $(nvidia-smi -L | wc -l): $(( $(date +%s) - start )) s wall"
grep -E "^\|cmmlu +\|" "$OUT/eval.log" | head -3
