"""What a wave's outcomes say beyond each device's own verdict: pure functions, tested without a broker.

- **Chance.** Every device's canary reverts a good bundle with probability at most its
  ``canary.alpha``. Of n devices, some reverts are expected by chance alone; more than the
  binomial bound says is evidence against the bundle. ``--max-failures`` keeps deciding the
  halt; this says which of the two a wave's failures look like.
- **Pooling.** Each device's canary sees only its own cameras' frames. A regression too small
  for one device to be sure of within its window can be plain in the wave's frames together:
  the devices' agreement evidence (their time blocks, each against its own limit) goes into
  one test at the wave's alpha (:func:`agent.lifecycle.canary.pooled_agreement`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from agent.lifecycle.canary import Rule, pooled_agreement
from fleet.records import Event

CHANCE_LEVEL = 0.01  # failures beyond what chance gives with this probability are called "more than chance"


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def chance_failures(n: int, alpha: float, level: float = CHANCE_LEVEL) -> int:
    """The most false reverts n good canaries give with probability at least ``level``."""
    k = 0
    while k < n and binomial_tail(k + 1, n, alpha) > level:
        k += 1
    return k


def failures_note(failed: int, attempted: int, alpha: float) -> str:
    """A wave's failures against what canary.alpha explains, in one line."""
    bound = chance_failures(attempted, alpha)
    if failed <= bound:
        return (
            f"{failed} of {attempted} failed; with canary.alpha {alpha:g}, chance alone gives up to {bound} "
            f"(at {1 - CHANCE_LEVEL:.0%}): consistent with false reverts"
        )
    chance = binomial_tail(failed, attempted, alpha)
    return (
        f"{failed} of {attempted} failed: more than canary.alpha {alpha:g} explains (up to {bound}; "
        f"{failed} or more by chance has probability {chance:.1e}): evidence against the bundle"
    )


def wave_alpha(events: Iterable[Event]) -> float | None:
    """The largest canary.alpha the wave's devices reported (their verdicts carry it)."""
    found = [e.alpha for e in events if e.alpha is not None and 0 < e.alpha < 1]
    return max(found) if found else None


def pool_of(event: Event) -> tuple[float, list[tuple[int, int]]] | None:
    """A device's agreement evidence from its commit or revert event (:class:`fleet.records.Pool` read it)."""
    return (event.pool.limit, list(event.pool.blocks)) if event.pool else None


def pooled_verdict(events: list[Event], alpha: float) -> Rule | None:
    """The wave's devices' agreement evidence in one test, in device-name order; None without evidence."""
    pools = [p for e in sorted(events, key=lambda e: e.device) if (p := pool_of(e))]
    return pooled_agreement(pools, alpha) if pools else None
