"""Qwen2.5 training on Megatron-Core: model, data, tokenizer and the CPU backend."""
