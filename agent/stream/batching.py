"""Choosing batch size and maximum wait from a latency budget, and adjusting them as load changes.

A frame's latency is the time it waits for its batch to start, then that batch's latency
``L(b)``. It waits for the batch in flight to end (at most ``L(b)``) and for its batch to
fill, at once: frames from the other cameras arrive during the batch in flight. Each camera
has one pending slot (latest frame wins), so a frame still pending one camera interval
``T = sources / arrival_rate`` after it arrived has been replaced, and the frame served in
its place is younger. When a batch serves every pending frame (it keeps up with the arrival
rate, or holds every camera), a frame waits for one batch at most; when it does not, the
frame may be passed over for other cameras' until it is replaced, ``T`` at most::

    worst(b) = L(b) + max(held(b), (b - 1) / arrival_rate)
    held(b)  = min(L(b), T) when batch b serves every pending frame, else T

Charging twice a batch's latency instead (the batch in flight, then the frame's own) rules
out, under overload, the large batches whose measured p99 fits the budget, and undercharges
a batch of one, whose frames wait while other cameras' are served.

``L(b)`` starts from the passport's p99 for batch size ``b`` and follows what this
device measures of that size (an exponentially weighted estimate of the p99: it rises
at once with a slow batch and decays slowly). The policy runs only the sizes it picks,
so a size whose estimate one slow batch raised (a preempted thread, a decoder's burst)
would never be measured again, and a policy that stepped down from it would never step
back up. Each batch of one size therefore moves every other size's estimate a little
back toward its passport figure: an unused size is tried again once it looks feasible,
and one slow batch then raises it again. The estimates stay per size because sizes
differ in how much a loaded device slows them (one image over every core waits on both
cores at every layer; a chunk per stream does not), except for sizes that run the same
requests (an OpenVINO engine pads a short chunk: with 4 images per stream, 5 to 8 run two
chunks of 4), which the passport times once and the policy estimates once: a slow batch
of 8 is a slow batch of 7, and a policy that stepped down to 7 would run the same requests,
for fewer frames, over the budget it stepped down to keep.

The policy picks the smallest batch that keeps up with the arrival rate (with 10 %
headroom) and fits the budget; when none keeps up, the feasible batch with the highest
throughput, and the frame queue sheds what cannot be served in time. Throughput is judged
by each size's typical (mean) latency, not its p99: the two differ most where one image
runs over every core, and a p99 ranks that size below a padded larger batch that leaves a
core idle. The maximum wait
(from the oldest pending frame's arrival) is what the budget leaves after ``L(b)``, never
more than filling the batch takes. ``fixed`` mode keeps one batch size, for comparison.

Beside the p99, the policy follows each batch size's typical (mean) latency, from the
passport's images/s and then as measured here (relaxed toward the passport like the p99):
the pipeline also takes the next batch's frames when the batch running is about to end, and
a p99 would take them late.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

HEADROOM = 1.1
SMOOTHING = 0.1
RELAX = 0.01  # per batch of another size: how far a size's p99 estimate returns toward its passport figure
NEUTRAL_P99_S = 0.010  # where the passport measured nothing: replaced by the first batches' own times


@dataclass(frozen=True)
class Decision:
    batch: int
    max_wait: float
    predicted_worst: float


class BatchPolicy:
    def __init__(
        self,
        budget_s: float,
        p99_by_batch: dict[int, float],
        max_batch: int,
        mode: str = "adaptive",
        fixed_batch: int = 1,
        mean_by_batch: dict[int, float] | None = None,
        runs_as: dict[int, int] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.relearn(p99_by_batch, mean_by_batch, runs_as)
        self.configure(budget_s, max_batch, mode, fixed_batch)

    def configure(self, budget_s: float, max_batch: int, mode: str, fixed_batch: int) -> None:
        """Apply new settings (a config reload) without forgetting what was measured."""
        with self._lock:
            self.budget, self.max_batch, self.mode = budget_s, max_batch, mode
            self.fixed_batch = min(fixed_batch, max_batch)

    def relearn(
        self,
        p99_by_batch: dict[int, float],
        mean_by_batch: dict[int, float] | None = None,
        runs_as: dict[int, int] | None = None,
    ) -> None:
        """Start over from another engine's passport (a swap): the old measurements describe the old engine.
        A passport that measured nothing starts from a neutral guess, which the first batches replace.
        ``runs_as`` maps a batch size to the size whose requests it runs (the passport's ``timed_at``)."""
        p99_by_batch = p99_by_batch or {1: NEUTRAL_P99_S}
        with self._lock:
            self._runs_as = dict(runs_as or {})
            self._passport = self._by_request(p99_by_batch)
            self._latency = dict(self._passport)
            # the p99 where no mean was measured
            self._passport_typical = {**self._passport, **self._by_request(mean_by_batch or {})}
            self._typical = dict(self._passport_typical)

    def _by_request(self, figures: dict[int, float]) -> dict[int, float]:
        """``figures`` keyed by the size each batch size runs as; that size's own figure where it has one."""
        shared = {self._key(b): figure for b, figure in figures.items()}
        return shared | {b: figure for b, figure in figures.items() if b in shared}

    def _key(self, batch: int) -> int:
        return self._runs_as.get(batch, batch)

    def latency(self, batch: int) -> float:
        """Predicted p99 seconds for ``batch``: measured or from the passport, else extrapolated linearly."""
        key = self._key(batch)
        if key in self._latency:
            return self._latency[key]
        known = sorted(self._latency)
        below = max((b for b in known if b < batch), default=known[0])
        return self._latency[below] * batch / below

    def observe(self, batch: int, seconds: float) -> None:
        """Fold one measured batch latency into the p99 estimate (rises fast, decays slowly) and the mean of every
        size that runs the same requests; every other size's estimates move :data:`RELAX` of the way back toward
        their passport figures."""
        with self._lock:
            key = self._key(batch)
            current = self.latency(batch)
            weight = 0.5 if seconds > current else SMOOTHING / 10  # a p99 must react to slow batches
            for estimates, passport in ((self._latency, self._passport), (self._typical, self._passport_typical)):
                for other, estimate in estimates.items():
                    if other != key and other in passport:
                        estimates[other] = estimate + RELAX * (passport[other] - estimate)
            self._latency[key] = current + weight * (seconds - current)
            typical = self._typical.get(key, seconds)
            self._typical[key] = typical + SMOOTHING * (seconds - typical)

    def typical(self, batch: int) -> float:
        """Mean seconds for ``batch``: as measured here, else the passport's, else the p99 estimate."""
        with self._lock:
            return self._mean(batch)

    def _mean(self, batch: int) -> float:
        return self._typical.get(self._key(batch)) or self.latency(batch)

    def decide(self, arrival_rate: float, sources: int) -> Decision:
        """``sources``: cameras delivering frames. Each has one pending slot (latest frame wins),
        so no batch can hold more frames than there are cameras."""
        with self._lock:
            if self.mode == "fixed":
                b = self.fixed_batch
                return Decision(b, max(0.0, self.budget - self.latency(b)), self._worst(b, arrival_rate, sources))
            sizes = range(1, max(1, min(self.max_batch, sources)) + 1)
            feasible = [b for b in sizes if self._worst(b, arrival_rate, sources) <= self.budget] or [1]
            keeping_up = [b for b in feasible if b / self._mean(b) >= HEADROOM * arrival_rate]
            b = keeping_up[0] if keeping_up else max(feasible, key=lambda s: s / self._mean(s))
            max_wait = max(0.0, min(_fill(b, arrival_rate), self.budget - self.latency(b)))
            return Decision(b, max_wait, self._worst(b, arrival_rate, sources))

    def worst(self, batch: int, arrival_rate: float, sources: int) -> float:
        """Predicted worst frame-to-result seconds for ``batch`` at this load (the module's docstring)."""
        with self._lock:
            return self._worst(batch, arrival_rate, sources)

    def _worst(self, batch: int, arrival_rate: float, sources: int) -> float:
        latency = self.latency(batch)
        if arrival_rate <= 0:
            return 2 * latency
        interval = max(sources, 1) / arrival_rate  # a frame pending this long has been replaced
        serves_all = batch >= sources or batch / self._mean(batch) >= arrival_rate
        held = min(latency, interval) if serves_all else interval
        return latency + max(held, _fill(batch, arrival_rate))


def _fill(batch: int, arrival_rate: float) -> float:
    """Seconds for ``batch`` frames to arrive, from the first."""
    return (batch - 1) / arrival_rate if arrival_rate > 0 else 0.0


class RateMeter:
    """Frames per second over a sliding horizon, from arrival counts."""

    def __init__(self, horizon_s: float = 2.0) -> None:
        self._horizon = horizon_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, now: float, count: int = 1) -> None:
        with self._lock:
            self._events.append((now, count))
            cutoff = now - self._horizon
            while self._events and self._events[0][0] < cutoff:
                self._events.popleft()

    def rate(self, now: float) -> float:
        with self._lock:
            events = [(t, c) for t, c in self._events if t >= now - self._horizon]
        if not events:
            return 0.0
        span = max(now - events[0][0], 1e-3)
        return sum(c for _, c in events) / max(span, self._horizon / 4)
