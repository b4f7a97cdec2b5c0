"""The peak host memory of a process tree (a launcher, its torchrun, ranks, helpers, exports), sampled while it
runs: the sum of the processes' proportional set sizes (PSS: a page shared by several processes, such as a file
mapped by each rank, counts once in all), and the largest single process's resident set."""

from __future__ import annotations

import threading

import psutil

GIB = 2**30


class TreeMemory:
    """`with TreeMemory(pid) as memory:` samples every `interval` seconds until the block ends; then
    memory.peak_gib (the tree's summed PSS) and memory.largest_gib (one process's RSS)."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.root, self.interval = pid, interval
        self.peak = self.largest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        return False

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    @property
    def largest_gib(self) -> float:
        return self.largest / GIB

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                root = psutil.Process(self.root)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            total = 0
            for process in tree:
                try:
                    info = process.memory_full_info()  # PSS from smaps_rollup
                    total += info.pss
                    self.largest = max(self.largest, info.rss)
                except psutil.AccessDenied:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
