#!/bin/sh
# Qwen2.5 continued pre-training and fine-tuning on Megatron-Core, with the 25 positional arguments of
# Pai-Megatron-Patch's best practice:
#   ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR TP PP CP SP DO FL SFT AC
#   OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH PRETRAIN_CHECKPOINT_PATH
#   TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH
# Env knobs: MP_DATASET_TYPE, MP_AC_LAYERS, MP_VP, MP_SFT_PACKING, MP_DRY_RUN=1 (print the torchrun command);
# README's table lists them all. Parsing, validation, the flag mapping and the run live in megatron_patch/launch/.
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$ROOT/scripts/python_env.sh"
exec "$PY" -m megatron_patch.launch "$@"
