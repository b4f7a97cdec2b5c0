"""What training, the benchmarks, the tests and the demo share to start runs and read their metrics (torchtitan's
single harness): a benchmark is a thin call into these modules, and a test imports them, never a benchmark.

- `iteration_log`: the `[qwen] iteration` line (written by the training patch, read here), megatron's own
  iteration line, the TensorBoard events, and the steady tokens/s of a log.
- `throughput`: FLOPs per token and MFU (one function each), the report line and the result rows.
- `launcher_runs`: the 25 positional arguments of run_mcore_qwen.sh, a clean environment, and one runner that
  starts the launcher, polls its log and stops its process group.
- `hf_baseline`: the Hugging Face transformers training loop the throughput benchmarks compare against, on one GPU
  or sharded with FSDP2; for fine-tuning with peft's LoRA, Liger's kernels and packed rows.
- `sft_rows`: the fine-tuning benchmark's packed rows (our raw-JSON dataset's, in a run's order) and the real
  tokens each step trains, counted the same way for both sides.
- `mcore_runs`: our launcher runs as benchmark variants (`--mcore`), their sweep and the loss check.
- `matrix`, `matrix_doc`: the GPU matrix's rows (benchmarks/gpu_matrix_rows.yaml), their golden values, one
  scheduler, the every-iteration check and docs/gpu_matrix.md.
- `host_memory`: the peak host memory of a process tree (a launcher and everything below it), sampled.
- `gpu_idle`: the GPU's idle time between one step's start and the next (from a torch.profiler trace).
"""
