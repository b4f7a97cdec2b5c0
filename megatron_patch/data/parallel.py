"""An ordered map over a process pool with a bounded number of chunks in flight.

`Pool.imap` reads its whole input ahead of the workers, which holds a large corpus in memory; this keeps at most
`workers * 4` chunks queued and yields results in input order, so output files are deterministic.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from megatron_patch.errors import children_ignore_interrupts


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
