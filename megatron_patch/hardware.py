"""What this machine has: GPUs, Transformer Engine, flash-attn, a free port. The one place each is asked."""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import socket
from pathlib import Path


def nvidia_driver_present() -> bool:
    """An NVIDIA driver's traces (/dev/dxg: WSL's GPU). Without them there is no GPU for torch to count."""
    return (Path("/proc/driver/nvidia").exists() or Path("/dev/dxg").exists()
            or any(Path("/dev").glob("nvidia[0-9]*")))


@functools.cache
def gpu_count() -> int:
    """CUDA devices torch sees; 0 without a driver (skips torch's import: 2 s on every CPU launch and dry run)."""
    if not nvidia_driver_present():
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


@functools.cache
def gpu_compute_capability() -> int:
    """The first GPU's compute capability as major*10 + minor (90: Hopper, 100: Blackwell); 0 without a GPU."""
    if gpu_count() == 0:
        return 0
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return major * 10 + minor


@functools.cache
def transformer_engine_importable() -> bool:
    """Transformer Engine is installed and imports: the one probe the launcher, the entrypoint and the convertor
    ask (its import fails in many ways when its CUDA libraries are missing, and a broken TE must read as absent to
    all of them alike)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def flash_attn_importable() -> bool:
    """TE's flash backend takes flash-attn 2 (flash_attn) or 3 (flash_attn_3 / flash_attn_interface)."""
    return any(importlib.util.find_spec(name) is not None
               for name in ("flash_attn", "flash_attn_3", "flash_attn_interface"))


@functools.cache  # one figure per launch: the host-memory check and the offload flags size the same fraction
def free_gpu_bytes() -> int | None:
    """Free memory on the current GPU before the run, or None without one."""
    if gpu_count() == 0:
        return None
    import torch

    return torch.cuda.mem_get_info()[0]


def omp_threads() -> int | None:
    """OMP_NUM_THREADS where it names a thread count. The launcher sets it per CPU rank, and whoever shares the host
    with other work (a scheduler's CPU slice, a test runner's workers) sets it lower: more threads than the cores a
    process gets make OpenMP's workers spin against each other (two tiny runs side by side on 2 cores: 41 s at 2
    threads each, 22 s at 1)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def available_host_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory the host can give a new process without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Rendezvous ports are drawn below the kernel's ephemeral range: a port from that range that is free now can be
# taken, before the rendezvous listens on it, as the source port of any outgoing connection on the host (gloo
# opens many), which fails the run with EADDRINUSE.
RENDEZVOUS_PORTS = range(20000, 32768)


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port() -> int:
    """A TCP port nothing listens on now, outside the ephemeral range, for a rendezvous on this host."""
    ephemeral = _ephemeral_ports()
    candidates = [p for p in RENDEZVOUS_PORTS if p not in ephemeral]
    for port in random.sample(candidates, min(64, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every candidate taken (or none outside the ephemeral range): the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
