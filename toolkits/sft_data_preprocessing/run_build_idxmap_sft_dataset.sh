#!/bin/sh
# Pai-Megatron-Patch's SFT data command, with its arguments and output names:
#
#   bash run_build_idxmap_sft_dataset.sh INPUT Qwen2Tokenizer SEQ_LEN OUTPUT_PREFIX HF_DIR [default_packing]
#
#   INPUT            a JSON array or JSONL file of SFT records (alpaca, messages, ShareGPT) or a folder of them,
#                    optionally .gz or .zst; an item that is a list of records is packed together
#   SEQ_LEN          the training sequence length
#   OUTPUT_PREFIX    gets OUTPUT_PREFIX_text_document.{bin,idx}: pass that as DATASET_PATH, as upstream's README
#                    says (OUTPUT_PREFIX_label_document.{bin,idx}, the answer mask, and _sft_meta.json go beside it)
#   HF_DIR           a folder with the Qwen2.5 tokenizer files and chat template (the Hugging Face checkpoint)
#   default_packing  true: pack samples into rows of SEQ_LEN; false (default): one sample per row
# The work is build_idxmap_sft_dataset.py's (its --help tells the rest); MP_DRY_RUN=1 prints its command.
set -e
if [ $# -lt 5 ]; then
  echo "error: $(basename "$0") takes 5 or 6 arguments, got $#." >&2
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
case "${6:-false}" in
  true) PACKING=--sequence-packing ;;
  false) PACKING= ;;
  *) echo "error: default_packing (argument 6) must be true or false, got '$6'." >&2; exit 2 ;;
esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
# shellcheck disable=SC2086
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" "$ROOT/toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py" \
  --input "$1" --output-prefix "$4" --patch-tokenizer-type "$2" --load "$5" --seq-length "$3" \
  --workers auto $PACKING
