#!/bin/sh
# Profile one step of a run_mcore_qwen.sh command: same 25 arguments and MP_* knobs; prints the kernel table.
#   MP_PROFILE_STEP=4 sh benchmarks/profile_launch.sh dsw 0.5B 8 32 ... OUTPUT_BASEPATH
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${MP_TOKENIZER_PATH:-}" ]; then
  # The dry run below only names the default tokenizer's folder; a real launch writes it first, so do that here.
  py=${PYTHON:-$here/../.venv/bin/python}; [ -x "$py" ] || py=python3
  MP_TOKENIZER_PATH=$(PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$py" -c \
    "from megatron_patch.tokenizer import cached_default_tokenizer; print(cached_default_tokenizer())")
  export MP_TOKENIZER_PATH
fi
cmd=$(MP_DRY_RUN=1 sh "$here/../examples/qwen2_5/run_mcore_qwen.sh" "$@" | tail -n 1)
# The launcher's command puts the repository on PYTHONPATH: the profiler runs as a module of it.
eval "$(printf '%s' "$cmd" | sed "s# -m megatron_patch.pretrain_qwen # -m benchmarks.profile_step #")"
