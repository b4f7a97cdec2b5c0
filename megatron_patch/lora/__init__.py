"""LoRA and DoRA fine-tuning on megatron-core, one module per concern:

    targets      settings, target names (Megatron's and PEFT's), parameter counts; no torch (the launcher's checks)
    adapters     the adapter on one tensor-parallel linear layer (local spec and Transformer Engine's), its TP split
    attach       a whole model: adapters with seeded initial values, the frozen base read from its checkpoint,
                 adapters-only checkpoints
    peft_export  adapters in PEFT's names and file format, and merged into the HF weights
"""
