#!/bin/sh
# Pai-Megatron-Patch's pre-training data command, with its arguments and output name:
#
#   sh run_make_pretraining_dataset_megatron.sh INPUT Qwen2Tokenizer JSON_KEYS OUTPUT_DIR LOAD_DIR
#
#   INPUT      a .jsonl/.json/.txt file or a folder of them, each optionally .gz or .zst (upstream's WuDao recipe
#              splits a corpus into cleaned_zst/NN.jsonl.zst)
#   JSON_KEYS  the field holding the text, e.g. text ("text content": one idxmap per field)
#   OUTPUT_DIR gets mmap_qwen2_datasets_<KEY>_document.{bin,idx}: pass that prefix as DATASET_PATH
#   LOAD_DIR   a folder with the Qwen2.5 tokenizer files (the Hugging Face checkpoint)
# The work is preprocess_data.py's (its --help tells the rest); MP_DRY_RUN=1 prints its command and runs nothing.
set -e
if [ $# -lt 5 ]; then
  echo "error: $(basename "$0") takes 5 arguments, got $#." >&2
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
# JSON_KEYS unquoted, as upstream passes it: "text content" names two fields. Upstream starts 2 tokenizer
# processes; --workers auto starts one per core, fewer for a small input.
# shellcheck disable=SC2086
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" "$ROOT/toolkits/pretrain_data_preprocessing/preprocess_data.py" \
  --input "$1" --output-prefix "$4/mmap_qwen2_datasets" --patch-tokenizer-type "$2" --json-keys $3 --load "$5" \
  --workers auto --append-eod
