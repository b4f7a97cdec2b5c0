"""The Hugging Face transformers side of the throughput benchmarks: random-init Qwen2ForCausalLM, random tokens,
fused AdamW, gradient accumulation to the global batch; on one GPU (torch.compile of the whole model) or sharded
with FSDP2 over the process group's ranks (each decoder layer its own unit, the root one more).

Variants: (a) fp32 master weights with bf16 compute (autocast on one GPU; FSDP2's MixedPrecisionPolicy with bf16
params and fp32 gradient reduction): the numerics of our Megatron bf16 runs; (b) parameters in bf16 (and bf16
reduction): a speed bound. Fine-tuning adds peft's LoRA (the base frozen in bf16; (a): fp32 adapters under
autocast, (b): bf16 adapters), Liger's Qwen2 kernels and the attention implementation; its data (sft_rows.py)
are packed rows with position ids restarting in every sample, which transformers turns into a block-diagonal
mask (flex_attention: a block mask that skips the blocks between samples), and only real tokens are counted.
Liger patches transformers' Qwen2 module for the whole process: run a Liger variant in a process of its own."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

from megatron_patch.model_sizes import get_size


@dataclass(frozen=True)
class HFRun:
    size: str
    seq_len: int
    micro_batch: int
    global_batch: int  # summed over all ranks
    pure_bf16: bool  # variant (b)
    compile_mode: str | None = "default"  # torch.compile mode (per decoder layer under FSDP2); None: eager
    fsdp: bool = False
    activation_checkpointing: bool = False  # torch checkpoint around each decoder layer (non-reentrant)
    attention: str = "sdpa"  # transformers' attn_implementation: sdpa or flex_attention
    liger: bool = False  # Liger's Qwen2 kernels: RoPE, RMSNorm, SwiGLU, fused linear + cross-entropy
    lora_rank: int = 0  # peft LoRA on every linear layer of the decoder, alpha 2 x rank; 0: full training


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RandomTokens:
    """Pre-training data: one random micro-batch, every step, every token counted."""

    def __init__(self, run: HFRun, device):
        import torch

        tokens = torch.randint(0, 151643, (run.micro_batch, run.seq_len), device=device)
        self.batch, self.per_step = {"input_ids": tokens, "labels": tokens}, run.global_batch * run.seq_len

    def micro_batches(self, step: int, count: int) -> list[dict]:
        return [self.batch] * count

    def tokens(self, step: int) -> int:
        return self.per_step


def free_cuda_memory() -> None:
    """Drops what an earlier run left: compiled graphs and CUDA graph pools (held by dynamo's caches), then the
    model and optimizer once nothing refers to them."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _model(run: HFRun, device):
    """The model on `device`: whole on one GPU; under FSDP2 created on meta and materialized shard by shard, so no
    rank ever holds all of it."""
    import torch
    from transformers import Qwen2ForCausalLM

    from megatron_patch.hf_checkpoint import hf_config_for

    base_bf16 = run.pure_bf16 or bool(run.lora_rank)
    config = hf_config_for(get_size(run.size), "bfloat16" if base_bf16 else "float32")
    config._attn_implementation = run.attention
    torch.manual_seed(0)
    if not run.fsdp:
        # Made on the device in its dtype: a 7B model's init on the host takes a minute, per micro-batch swept.
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if base_bf16 else torch.float32)
        try:
            with torch.device(device):
                model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(dtype)
        model = _fine_tuning_extras(model, run)
        if run.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return torch.compile(model, mode=run.compile_mode) if run.compile_mode else model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16 if run.pure_bf16 else torch.float32)
    if run.activation_checkpointing:
        model.activation_checkpointing_enable()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                  reduce_dtype=torch.bfloat16 if run.pure_bf16 else torch.float32)
    for layer in model.model.layers:
        if run.compile_mode:
            layer.compile(mode=run.compile_mode)  # in place, so FSDP2's hooks (skipped by dynamo) stay on it
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # embeddings, final norm and lm_head (tied to the embeddings <= 3B)
    model.to_empty(device=device)
    with torch.no_grad():
        model.apply(model._init_weights)  # HF's init (normal std 0.02, norms 1, RoPE inv_freq), shard by shard
    return model


def _fine_tuning_extras(model, run: HFRun):
    """Liger's kernels patched into the model, then peft's LoRA around it (the base frozen)."""
    if run.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(model=model)
    if not run.lora_rank:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=run.lora_rank, lora_alpha=2 * run.lora_rank, lora_dropout=0.0,
                        target_modules=list(LORA_TARGETS))
    # autocast_adapter_dtype: fp32 adapters over the bf16 base for (a), as our LoRA keeps fp32 main parameters.
    return get_peft_model(model, config, autocast_adapter_dtype=not run.pure_bf16)


def hf_throughput(run: HFRun, steps: int, warmup: int, device=None, data=None) -> tuple[float, float, int]:
    """Tokens/s per GPU over `steps` steps after `warmup`, peak GiB, and how many compiled graphs ran without the
    CUDA graphs their mode asked for. `data` (default RandomTokens) gives each step's micro-batches on the device
    and the tokens it counts. Under FSDP2 the process group must be up; the rate is rank 0's view of the whole
    group's tokens over its ranks."""
    import torch
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch._inductor import list_mode_options

    cuda = torch.cuda.is_available()
    device = device or torch.device("cuda" if cuda else "cpu")
    world = dist.get_world_size() if run.fsdp else 1
    # Each run starts on a clean GPU and compiles afresh: after a second shape dynamo would otherwise compile the
    # batch dimension as symbolic. Freed here, not on the way out: after an OOM the caller's traceback still
    # holds this run's frames (model, activations) until its except block ends.
    if cuda:
        free_cuda_memory()
    skips_before = counters["inductor"]["cudagraph_skips"]
    model = _model(run, device)
    # Under CUDA graphs (reduce-overhead, max-autotune) a .grad left None would be the backward graph's own
    # output, overwritten at the next replay: there gradients live in persistent buffers, as in Megatron's grad
    # buffer. Elsewhere they are freed after each step, HF's default and the lower peak.
    graphs = bool(run.compile_mode) and list_mode_options(run.compile_mode).get("triton.cudagraphs", False)
    trained = [param for param in model.parameters() if param.requires_grad]
    for param in trained if graphs else ():
        param.grad = torch.zeros_like(param)
    optimizer = torch.optim.AdamW(trained, lr=1e-5, **({"fused": True} if cuda else {"foreach": True}))
    accumulation = run.global_batch // (run.micro_batch * world)
    data = data or RandomTokens(run, device)
    autocast = cuda and not run.fsdp and not run.pure_bf16  # FSDP2's policy casts the parameters itself
    # The one-GPU figures in docs/benchmarks.md were measured with HF's default cache argument, FSDP2's without
    # (packed rows need it off: with a cache transformers does not read samples from the position ids).
    cache = {"use_cache": False} if run.fsdp or not isinstance(data, RandomTokens) else {}

    def step(index: int):
        for i, batch in enumerate(data.micro_batches(index, accumulation)):
            if run.fsdp:
                model.set_requires_gradient_sync(i == accumulation - 1)  # reduce-scatter after the last only
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch, **cache).loss / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not graphs)

    elapsed = _timed(step, steps, warmup, cuda, run.fsdp)
    peak = torch.cuda.max_memory_allocated() / 1024 ** 3 if cuda else 0.0
    tokens = sum(data.tokens(warmup + i) for i in range(steps))
    return tokens / elapsed / world, peak, counters["inductor"]["cudagraph_skips"] - skips_before


def _timed(step: Callable[[int], None], steps: int, warmup: int, cuda: bool, distributed: bool) -> float:
    """Seconds of steps warmup .. warmup + steps - 1 after steps 0 .. warmup - 1, synchronized (and barriered
    across ranks)."""
    import torch
    import torch.distributed as dist

    for index in range(warmup):
        step(index)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if distributed:
        dist.barrier()
    start = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def out_of_memory(error: BaseException) -> BaseException | None:
    """The out-of-memory error in error's chain, if any: torch.compile's backend wraps one raised while it
    compiles or captures a CUDA graph."""
    import torch

    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return next((e for e in chain if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)), None)


def failure_status_and_note(error: BaseException) -> tuple[str, str]:
    """("OOM" or "failed", the error's type and first line) as strings only: a variable still holding the error
    after its except block would keep the failed run's frames, model and activations on the GPU."""
    oom = out_of_memory(error)
    cause = oom or error
    first_line = (str(cause).strip().splitlines() or [""])[0]
    return "OOM" if oom else "failed", f"{type(cause).__name__}: {first_line}"


def sweep_micro_batches(micro_batches: list[int], measure: Callable[[int], tuple[float, float, int]],
                        measure_alone: Callable[[int], str], record: Callable[..., None], ran_before: bool) -> bool:
    """Measures each micro-batch upwards until the first out-of-memory or failure, recording each. A micro-batch
    that runs out of memory after earlier runs in this process is measured again alone in a fresh process
    (`measure_alone` records its own row and returns its status): earlier runs can leave the allocator fragmented
    (1.5B mb 16 after mb 8: 10.9 GiB reserved but unallocated). Returns whether a run succeeded in this process."""
    for micro in micro_batches:
        try:
            rate, peak, skips = measure(micro)
        except Exception as error:  # an OOM or a mode that fails is a row of the table
            status, note = failure_status_and_note(error)
        else:
            ran_before = True
            record(micro, "ok", rate, peak,
                   f"CUDA graphs skipped in {skips} compiled graphs (inductor's warning says why)" if skips else "")
            continue
        # Past the except block the failed run's frames (its model, activations) are gone: free them before a
        # fresh process asks the same GPU for memory.
        if status == "OOM" and ran_before:
            print(f"mb {micro}: out of memory after earlier runs in this process; again in a fresh one", flush=True)
            _release_cuda_memory()
            status = measure_alone(micro)
        else:
            record(micro, status, note=note)
        if status != "ok":
            break  # larger micro-batches would fail the same way; hf_throughput frees what this one left
    return ran_before


def _release_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()
        torch.cuda.empty_cache()
