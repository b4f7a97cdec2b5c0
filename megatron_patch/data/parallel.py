"""An ordered map over a process pool with a bounded number of chunks in flight.

`Pool.imap` reads its whole input ahead of the workers, which holds a large corpus in memory; this keeps at most
`workers * 4` chunks queued and yields results in input order, so output files are deterministic.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from megatron_patch.errors import children_ignore_interrupts

AUTO_BYTES_PER_WORKER = 4 << 20


def workers_arg(value: str) -> int | str:
    """The tools' --workers: a number of tokenizer processes (1: in this process), or auto (auto_workers)."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got '{value}'") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def auto_workers(paths: list[str | Path]) -> int:
    """--workers auto: a process per core, but at most one per 4 MiB of input (a .gz or .zst file counts four
    times its size): below that, starting a tokenizer process costs more than it saves."""
    files = [f for p in map(Path, paths) for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    size = sum(f.stat().st_size * (4 if f.suffix in (".gz", ".zst") else 1) for f in files)
    return max(1, min(os.cpu_count() or 1, size // AUTO_BYTES_PER_WORKER))


def ordered_parallel_map(
    func: Callable[[Any], Any],
    chunks: Iterable[Any],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple = (),
    in_flight_per_worker: int = 4,
) -> Iterator[Any]:
    """Yield func(chunk) for each chunk in order; workers <= 1 runs in this process (easiest to debug)."""
    if workers <= 1:
        initializer(*initargs)
        for chunk in chunks:
            yield func(chunk)
        return
    # spawn, not fork: the parent may hold torch/tokenizers threads, and fork with live threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with children_ignore_interrupts():  # Ctrl-C is the parent's to handle; leaving the block terminates the pool
        pool = context.Pool(workers, initializer=initializer, initargs=initargs)
    with pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(func, (chunk,)))
            if len(pending) >= workers * in_flight_per_worker:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
