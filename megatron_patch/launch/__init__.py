"""run_mcore_qwen.sh's logic, one module per step:

    positional the 25 positional arguments and the MP_* environment knobs -> a Launch (pure parsing)
    machine    nodes, processes per node, GPUs, Transformer Engine -> a Machine (the one probe)
    validate   settle(): the adjustments a layout needs, each reported; problems(): what stops the run (pure)
    flags      Launch + Machine -> megatron-core flags, the torchrun command and its environment
    run        the run folder's lock, resuming checkpoints, torchrun as an owned process tree, the log
    hf_export  MP_SAVE_HF: the convertor's MG2HF of each saved checkpoint, in a background process run owns

`python -m megatron_patch.launch ARGS...` is what the shell script runs.
"""
