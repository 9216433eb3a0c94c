"""The resident memory of a process and all its children together, sampled on a thread of its own.

What a machine must hold for a builder that starts profiling processes, or an agent with its engine
workers and decoders: one process's peak RSS misses the others.
"""

from __future__ import annotations

import threading
import time

import psutil


class TreeMemory:
    """RSS (MiB) of ``pid`` and its children, every ``every_s``, as (wall-clock time, MiB) samples."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.samples: list[tuple[float, float]] = []
        self._root, self._every, self._stop = psutil.Process(pid), every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                processes = [self._root, *self._root.children(recursive=True)]
                total = sum(p.memory_info().rss for p in processes) / 2**20
            except psutil.Error:  # a child came or went while it was read
                continue
            self.samples.append((time.time(), total))

    def between(self, start: float, end: float) -> list[float]:
        return [mib for at, mib in self.samples if start <= at <= end]

    def peak(self) -> tuple[float, float]:
        """(time, MiB) of the largest sample; (0, 0) before the first."""
        return max(self.samples, key=lambda s: s[1], default=(0.0, 0.0))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
