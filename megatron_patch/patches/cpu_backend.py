"""Run megatron-core 0.19.2 and megatron.training on a machine without a GPU.

Megatron assumes CUDA throughout: tensors made on 'cuda', `.cuda()` moves, CUDA streams, events and RNG
states, `torch.cuda.FloatTensor` type checks. When no GPU is present, the functions below make all of it land on the
CPU, with gloo for every process group (any world size, TP/PP/DP included):

* a TorchFunctionMode maps every CUDA device argument (`device='cuda'`, `.cuda()`, `.to(cuda)`, device
  index ints) onto the CPU, so Megatron's own code runs unchanged;
* `torch.cuda` functions Megatron calls get CPU stand-ins: one pretend device, no-op streams and events
  (events time with the host clock), CUDA RNG state read and written on the CPU generator, zero memory stats;
* `Tensor.type()` reports CPU float tensors with the CUDA names the optimizer and grad clipping assert on;
* `initialize_megatron` is told CUDA is not required; `validate_args` reads the pretend device's properties;
* megatron.training's JIT warm-up is skipped (`skip_jit_warmup`: it would move the weights' random stream).

Each of these is an entry of megatron_patch.patches' manifest, installed by `patches.prepare("cpu")` before
Megatron parses its arguments, and only when `torch.cuda.is_available()` is False: GPU runs are never touched.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import time

import torch
from torch.overrides import TorchFunctionMode

from megatron_patch import hardware


_real_torch_compile = torch.compile


def keep_fusions_eager_at_import() -> None:
    """megatron-core decorates its small fusions (bias + GeLU/SwiGLU, RoPE helpers) with torch.compile when its
    modules are imported; the decorator alone loads inductor (and dynamo): about 3 s of every process's start on a
    2-core CPU, for fusions a CPU run does not need (compiling them would want a C++ toolchain). While Megatron's
    modules are imported (megatron_startup.importing_megatron), torch.compile returns the function as it is."""

    def eager(model=None, **_options):
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager


def restore_torch_compile() -> None:
    torch.compile = _real_torch_compile


def _is_accelerator(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device means a CUDA index (e.g. torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaOnCpu(TorchFunctionMode):
    """Rewrites CUDA placement onto the CPU for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizer and grad clipping accept only 'torch.cuda.*Tensor' parameters.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_accelerator(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_accelerator(args[1]):
            args = (args[0], "cpu", *args[2:])
        kwargs.pop("non_blocking", None) if func is torch.Tensor.to else None
        # Pinned host memory needs a driver (megatron-core's CP position slicing asks for it).
        kwargs.pop("pin_memory", None)
        return func(*args, **kwargs)


class _Stream:
    """Stands in for torch.cuda.Stream / ExternalStream: the CPU runs everything in order."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    """Stands in for torch.cuda.Event; elapsed_time uses the host clock, in milliseconds."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end) -> float:
        return (end._t - self._t) * 1000.0


class _DeviceProperties:
    name = "cpu"
    major, minor = 0, 0
    total_memory = 0
    multi_processor_count = 0


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


def _distinct(value):
    """A fresh function object per replaced name: torch.compile's trace rules reject one object under two."""
    if isinstance(value, type):
        return value
    return functools.wraps(value)(lambda *a, **k: value(*a, **k))


def replace_torch_cuda_functions() -> None:
    """torch.cuda's functions that Megatron calls, as CPU stand-ins (see the module docstring)."""
    cuda = torch.cuda
    stream = _Stream()
    replacements = {
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": _noop,
        "synchronize": _noop,
        "empty_cache": _noop,
        "Stream": _Stream,
        "ExternalStream": _Stream,
        "Event": _Event,
        "current_stream": lambda *a, **k: stream,
        "default_stream": lambda *a, **k: stream,
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_stream": _noop,
        "is_current_stream_capturing": lambda: False,
        "memory_allocated": _zero,
        "max_memory_allocated": _zero,
        "memory_reserved": _zero,
        "max_memory_reserved": _zero,
        "reset_peak_memory_stats": _noop,
        "memory_stats": lambda *a, **k: collections.defaultdict(int),
        "get_device_properties": lambda *a, **k: _DeviceProperties(),
        "get_device_capability": lambda *a, **k: (0, 0),
        "get_device_name": lambda *a, **k: "cpu",
        # Megatron's model-parallel RNG tracker swaps CUDA generator states; on the CPU it swaps the CPU one.
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        # torch.manual_seed calls torch.cuda.manual_seed_all itself: seed the CPU generator directly.
        "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
        "manual_seed_all": _noop,
    }
    for name, value in replacements.items():
        setattr(cuda, name, _distinct(value))
    cuda.nvtx.range_push = _distinct(_noop)
    cuda.nvtx.range_pop = _distinct(_noop)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        setattr(cuda.random, name, getattr(cuda, name))


def keep_megatron_rng_state_on_cpu() -> None:
    """megatron-core's own CUDA RNG state helpers (not torch.cuda's) read and write the CPU generator."""
    import megatron.core.tensor_parallel.random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def skip_jit_warmup() -> None:
    """pretrain() warms megatron-core's fused bias+SwiGLU and bias+dropout+add up on random tensors before it
    builds the model: torch.rand(seq/CP x micro-batch x ffn/TP, device='cuda'). On a GPU those draws come from
    the device's generator; here 'cuda' is the CPU, and the CPU generator is also the one --use-cpu-initialization
    draws the weights from. So the warm-up, sized by CP and TP, moved the start of the weights' stream: from
    random weights CP2 built other weights than CP1. The fusions it warms are off on the CPU
    (megatron_flags.CPU_FLAGS): skipped, each weight is drawn whole from the generator megatron seeded (seed + 100 x PP rank)
    and split by TP rank, whatever the CP and TP sizes."""
    import megatron.training.initialize as initialize

    initialize._warmup_jit_function = lambda *args, **kwargs: None


def let_megatron_initialize_without_cuda() -> None:
    """pretrain() calls initialize_megatron without allow_no_cuda, which asserts a GPU: pass it."""
    import megatron.training.initialize as initialize
    import megatron.training.training as training

    orig_init = initialize.initialize_megatron

    @functools.wraps(orig_init)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return orig_init(*args, **kwargs)

    training.initialize_megatron = initialize_megatron
    initialize.initialize_megatron = initialize_megatron


def place_cuda_tensors_on_cpu() -> None:
    """Enter the TorchFunctionMode that rewrites every CUDA placement onto the CPU, for the rest of the process."""
    _CudaOnCpu().__enter__()


def share_cores(args) -> None:
    """Share the host's cores among the ranks, and say once that the run is on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    threads = args.cpu_threads or hardware.omp_threads() or \
        max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    torch.set_num_threads(threads)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"megatron_patch: no GPU found, training on the CPU with gloo ({world} processes, {threads} threads each)",
              flush=True)
