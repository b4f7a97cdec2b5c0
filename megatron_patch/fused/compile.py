"""Where our kernels run: torch.compile on the GPU only (the CPU path, tests and the CPU backend, runs the same
function eagerly), and the Triton kernels' one condition."""

from __future__ import annotations

import functools
import importlib

import torch


def compiled_on_cuda(fn):
    """Decorate `fn` so that calls whose first argument is a CUDA tensor run the torch.compile'd version."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        nonlocal compiled
        if not first.is_cuda:
            return fn(first, *args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(first, *args, **kwargs)

    wrapper.eager = fn
    return wrapper


@functools.cache
def triton_kernels_run_here() -> bool:
    """Our Triton kernels need triton (CPU-only installs may lack it) and a CUDA GPU."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return torch.cuda.is_available()
