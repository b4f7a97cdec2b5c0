#!/usr/bin/env bash
# Qwen2.5 checkpoint conversion, older upstream form (the README still shows it for Megatron -> HF).
#
#   bash hf2mcore_qwen2.5_convertor.sh MODEL_SIZE SRC DST TP PP PR USE_TE MG2HF [HF_DIR] [extra convertor flags...]
#
#   MODEL_SIZE  size-table name or auto
#   TP, PP      checked only (TP must divide the kv heads, PP the layers): torch_dist loads with any TP/PP
#   PR          fp32 | bf16 | fp16
#   USE_TE      informational: the checkpoint uses TE key names and loads with or without Transformer Engine
#   MG2HF       false: HF -> Megatron; true: Megatron -> HF (needs HF_DIR)
# Always CPU (USE_CUDA=true in scripts/qwen2_5/run_8xH20.sh for the GPU). MP_DRY_RUN=1 prints the command
# (the older DRY_RUN=true still works, with a warning).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }
[[ $# -ge 8 ]] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$ROOT/scripts/python_env.sh"

MODEL_SIZE=$1 SRC=$2 DST=$3 TP=$4 PP=$5 PR=$6 USE_TE=$7 MG2HF=$8
HF_DIR=${9:-}
shift $(( $# >= 9 ? 9 : 8 ))

cmd=("$PY" -m megatron_patch.convert --model-size "$MODEL_SIZE" --load-dir "$SRC" --save-dir "$DST"
     --tp "$TP" --pp "$PP" --precision "$PR" --use-te "$USE_TE" --mg2hf "$MG2HF" --use-cuda false)
[[ -n "$HF_DIR" ]] && cmd+=(--hf-dir "$HF_DIR")
cmd+=("$@")

# DRY_RUN=true was this script's dry-run switch before MP_DRY_RUN=1, every script's one convention.
[[ -n "${DRY_RUN:-}" ]] && { echo "warning: DRY_RUN is deprecated; use MP_DRY_RUN=1" >&2; export MP_DRY_RUN="$DRY_RUN"; }
exec "${cmd[@]}"
