#!/usr/bin/env bash
# What the one-GPU calls of docs/benchmarks.md ("The one-GPU calls still to run") need on a lent device machine,
# which has torch and transformers but no package registry and none of this project's data.
#
#   bash scripts/device_prep.sh          here, once (after `make setup`): the wheels the device lacks, at the
#                                           lock's versions, into .device/whl, and the benchmarks' data into
#                                           output/sft-bench-assets and output/hf-io-assets (all git-ignored: pass
#                                           them to the device tool's carry)
#   source scripts/device_prep.sh use    on the device, first in each call: installs the wheels into /tmp/site,
#                                           sets the environment, puts the HF-in/out assets where the benchmarks
#                                           share them, and prints the card and the versions
CARRY=(.device output/sft-bench-assets output/hf-io-assets)
LOCKED_WHEELS=(megatron-core peft accelerate)  # at requirements-lock.txt's versions

prepare() {
  set -euo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local py=.venv/bin/python pins=() name
  [ -x "$py" ] || { echo "error: no .venv here; run 'make setup' first" >&2; return 1; }
  for name in "${LOCKED_WHEELS[@]}"; do
    pins+=("$(grep -oE "^$name==[^ ]+" requirements-lock.txt)") || {
      echo "error: $name is not pinned in requirements-lock.txt" >&2; return 1; }
  done
  mkdir -p .device/whl
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .device/whl "${pins[@]}"
  "$py" -m benchmarks.sft_throughput --prepare-only
  "$py" -c 'from pathlib import Path
from megatron_patch.harness.matrix_assets import prepare_assets
prepare_assets(Path("output/hf-io-assets"), [], documents=10, records=2000)'
  echo "device_prep: ready; carry: [$(printf '"%s", ' "${CARRY[@]}" | sed 's/, $//')] ($(du -shc "${CARRY[@]}" | tail -1 | cut -f1))"
}

use() {
  python3 -m pip install --quiet --no-index --no-deps --target /tmp/site .device/whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1
  mkdir -p /tmp/hf_io && rm -rf /tmp/hf_io/assets && cp -r output/hf-io-assets /tmp/hf_io/assets
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, transformers, megatron.core, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "megatron-core",
      megatron.core.__version__, "peft", peft.__version__)'
}

case "${1:-prepare}" in
  prepare) prepare ;;
  use) use ;;
  *) echo "usage: bash scripts/device_prep.sh [prepare] | source scripts/device_prep.sh use" >&2; false ;;
esac
