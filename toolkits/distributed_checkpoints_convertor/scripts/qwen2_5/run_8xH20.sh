#!/usr/bin/env bash
# Qwen2.5 checkpoint conversion, HF <-> Megatron torch_dist (upstream Pai-Megatron-Patch best-practice form).
#
#   bash run_8xH20.sh MODEL_SIZE LOAD_DIR SAVE_DIR MG2HF USE_CUDA PR [HF_DIR] [extra convertor flags...]
#
#   MODEL_SIZE  size-table name (tiny 0.5B 1.5B 3B 7B 14B 32B 72B) or auto (shape from config.json)
#   MG2HF       false: HF -> Megatron; true: Megatron -> HF (needs HF_DIR)
#   USE_CUDA    true: Megatron model on the GPU (error if none); false: CPU only
#   PR          fp32 | bf16 | fp16, dtype of the written weights
#   HF_DIR      reference HF folder whose config.json and tokenizer go with the HF output ('' to skip)
# Extra flags go to `python -m megatron_patch.convert` (e.g. --check-logits, --max-shard-size 2GB, --overwrite).
# MP_DRY_RUN=1 prints the command instead of running it (the older DRY_RUN=true still works, with a warning).
# Despite its name (kept: it is upstream's interface), this runs ONE process on one GPU or the CPU, never eight:
# torch_dist checkpoints store global tensors, so the conversion needs no TP/PP split and training reshards on load.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }
[[ $# -ge 6 ]] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)"
. "$ROOT/scripts/python_env.sh"

MODEL_SIZE=$1 LOAD_DIR=$2 SAVE_DIR=$3 MG2HF=$4 USE_CUDA=$5 PR=$6
HF_DIR=${7:-}
shift $(( $# >= 7 ? 7 : 6 ))

cmd=("$PY" -m megatron_patch.convert --model-size "$MODEL_SIZE" --load-dir "$LOAD_DIR" --save-dir "$SAVE_DIR"
     --mg2hf "$MG2HF" --use-cuda "$USE_CUDA" --precision "$PR")
[[ -n "$HF_DIR" ]] && cmd+=(--hf-dir "$HF_DIR")
cmd+=("$@")

# DRY_RUN=true was this script's dry-run switch before MP_DRY_RUN=1, every script's one convention.
[[ -n "${DRY_RUN:-}" ]] && { echo "warning: DRY_RUN is deprecated; use MP_DRY_RUN=1" >&2; export MP_DRY_RUN="$DRY_RUN"; }
exec "${cmd[@]}"
