"""Where cameras hand frames to the batcher: one pending frame per camera, latest wins.

A camera preprocesses into its own scratch buffer, then :meth:`FrameQueue.put`
copies it into the camera's single pending slot; a frame still pending there is
overwritten and counted as skipped, so a slow engine can never build a queue. The
batcher's :meth:`FrameQueue.take` copies up to ``n`` pending frames, oldest first,
into a preallocated batch buffer. Frames that could no longer meet the latency
budget are shed (counted) when fresher ones are waiting. Nothing here allocates per
frame: the slots and the batch buffer are allocated once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.stream.batching import RateMeter


@dataclass
class FrameInfo:
    camera: str
    seq: int
    captured: float  # wall clock (epoch seconds), for results
    arrived: float  # monotonic, for latency


@dataclass
class CameraCounters:
    taken: int = 0
    skipped: int = 0  # overwritten while pending: the engine was busy
    shed: int = 0  # dropped by the batcher: too old to meet the budget
    processed: int = 0
    failed: int = 0  # in a batch the engine failed on
    last_processed: float = 0.0  # monotonic time of the latest result


def never() -> bool:
    """A ``stop_waiting`` that never stops a :meth:`FrameQueue.take` early."""
    return False


class FrameQueue:
    def __init__(self, cameras: list[str], height: int, width: int) -> None:
        self._slots = {name: np.empty((height, width, 3), np.uint8) for name in cameras}
        self._pending: dict[str, FrameInfo] = {}
        self._waiting_since: dict[str, float] = {}  # survives overwrites: fairness across cameras
        self.counters = {name: CameraCounters() for name in cameras}
        self.arrivals = RateMeter()
        self._cond = threading.Condition()

    def add_camera(self, name: str) -> None:
        with self._cond:
            height, width, _ = next(iter(self._slots.values())).shape
            self._slots.setdefault(name, np.empty((height, width, 3), np.uint8))
            self.counters.setdefault(name, CameraCounters())

    def remove_camera(self, name: str) -> None:
        with self._cond:
            self._pending.pop(name, None)

    def put(self, info: FrameInfo, image: np.ndarray) -> None:
        with self._cond:
            counters = self.counters[info.camera]
            counters.taken += 1
            self.arrivals.add(info.arrived)
            if info.camera in self._pending:
                counters.skipped += 1
            else:
                self._waiting_since[info.camera] = info.arrived
            np.copyto(self._slots[info.camera], image)
            self._pending[info.camera] = info
            self._cond.notify()

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def oldest_age(self, now: float) -> float:
        """Seconds the oldest pending frame has waited (0 when none): the watchdog's stall signal."""
        with self._cond:
            return max((now - i.arrived for i in self._pending.values()), default=0.0)

    def wake(self) -> None:
        """Make a waiting :meth:`take` look at its ``stop_waiting`` again."""
        with self._cond:
            self._cond.notify_all()

    def take(
        self,
        n: int,
        max_wait: float,
        shed_after: float,
        into: np.ndarray,
        timeout: float,
        stop_waiting: Callable[[], bool] = never,
    ) -> list[FrameInfo]:
        """Up to ``n`` frames into ``into[:k]``, longest-waiting camera first.

        Waits up to ``timeout`` for a first frame, then up to ``max_wait`` (from the
        oldest frame's arrival) for the batch to fill; either wait ends early once
        ``stop_waiting()`` (checked when :meth:`wake` is called). Frames older than
        ``shed_after`` seconds are shed while fresher frames can take their place.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending or stop_waiting(), timeout) or not self._pending:
                return []
            deadline = min(self._waiting_since[c] for c in self._pending) + max_wait
            while len(self._pending) < n and (left := deadline - time.monotonic()) > 0 and not stop_waiting():
                self._cond.wait(left)
            now = time.monotonic()
            ordered = sorted(self._pending.values(), key=lambda i: self._waiting_since[i.camera])
            stale = [i for i in ordered if now - i.arrived > shed_after]
            fresh = [i for i in ordered if now - i.arrived <= shed_after]
            chosen = fresh[:n]
            if len(chosen) < n:  # nothing fresher to serve: the newest stale frames still beat an idle engine
                chosen = stale[max(0, len(stale) - (n - len(chosen))) :] + chosen
            for info in stale:
                if info not in chosen:
                    self.counters[info.camera].shed += 1
                    del self._pending[info.camera]
            for slot, info in zip(into, chosen, strict=False):
                np.copyto(slot, self._slots[info.camera])
                del self._pending[info.camera]
            return chosen
