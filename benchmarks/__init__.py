"""Benchmarks and the GPU matrix: each a `python -m benchmarks.NAME` script over megatron_patch.harness."""
