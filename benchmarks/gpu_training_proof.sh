#!/usr/bin/env bash
# GPU proof for the training entrypoint: random-init tiny and 0.5B pre-training through run_mcore_qwen.sh on the
# GPUs present, logging step time and tokens/s/GPU. Usage: benchmarks/gpu_training_proof.sh DATA_PREFIX TOKENIZER_DIR OUT
set -euo pipefail
DATA=$1 TOK=$2 OUT=$3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
run() {  # name size tp pp gbs iters extra-env...
  local name=$1 size=$2 tp=$3 pp=$4 gbs=$5 iters=$6; shift 6
  echo "=== $name: Qwen2.5-$size TP=$tp PP=$pp GBS=$gbs, $iters iterations"
  env MP_TOKENIZER_PATH="$TOK" "$@" sh "$ROOT/examples/qwen2_5/run_mcore_qwen.sh" dsw "$size" 4 "$gbs" 1e-4 1e-5 2048 2048 bf16 \
    "$tp" "$pp" 1 true true true false false false 100000 "$DATA" "$DATA" none $((gbs * 2048 * iters)) 0 "$OUT/$name" \
    > "$OUT/$name.log" 2>&1 || { echo "FAILED: $name"; tail -40 "$OUT/$name.log"; return 1; }
  grep -E "iteration +[0-9]+/" "$OUT/$name.log" | tail -3 | cut -c1-400
  grep "\[qwen\]" "$OUT/$name.log" | tail -2
}
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$gpus" -ge 2 ]; then
  run qwen0.5b_tp2 0.5B 2 1 32 20 MP_NPROC_PER_NODE=2
  run qwen0.5b_pp2 0.5B 1 2 32 20 MP_NPROC_PER_NODE=2
else
  run tiny_1gpu tiny 1 1 8 10
  run qwen0.5b_1gpu 0.5B 1 1 32 20
fi
