# Qwen2.5 on Megatron-Core, GPU image. NGC PyTorch carries CUDA, Transformer Engine and flash-attn; its torch
# (2.9 pre-release) satisfies our torch>=2.6 so pip keeps it, with every other package the image has. What pip adds
# comes at requirements-lock.txt's versions (scripts/dependency_lock.py).
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    NCCL_NVLS_ENABLE=0

WORKDIR /workspace/Pai-Megatron-Patch
COPY . .

# The same install steps as README.md's "into an existing PyTorch environment".
RUN python scripts/dependency_lock.py constraints --except-installed > /tmp/lock-constraints.txt \
    && pip install -c /tmp/lock-constraints.txt -e . \
    && rm /tmp/lock-constraints.txt

CMD ["bash"]
