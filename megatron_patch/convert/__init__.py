"""Qwen2.5 checkpoint conversion between Hugging Face safetensors and Megatron torch_dist.

    mapping.py        the one Qwen2.5 weight-name table (both directions)
    hf_io.py          streaming safetensors read/write
    torch_dist_io.py  a torch_dist checkpoint's index, saved arguments and global tensors, read without Megatron
    mcore_runtime.py  megatron in-process, as the training entrypoint sets it up
    convertor.py      hf_to_mcore / mcore_to_hf / compare_logits
    hf_direct.py      training straight from a HF folder: each rank's TP/PP shards into the model provider's model
    staging.py        where output may go (it replaces SAVE_DIR whole: megatron_patch.atomic_write)
    cli.py            `python -m megatron_patch.convert` (what toolkits/distributed_checkpoints_convertor runs)
"""
