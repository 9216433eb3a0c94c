"""Simulated canaries through the agent's own rules (agent.lifecycle.canary): error rates and detection.

Streams, at 30 fps with every 4th frame shadowed (one camera, batches of one, as in a quiet
scene):

- agreement: per-frame disagreement with the previous engine in runs (a two-state Markov
  chain: a run of disagreeing frames lasts ``run_frames`` on average, the long-run rate is the
  row's). The runs' length is measured from the demo video (``correlation``), and the rows are
  repeated with runs of 1 s and 10 s, as a camera that keeps one hard object in view sees;
- latency: pairs of timings of the two engines taken together (the holdback design), with 15 %
  lognormal jitter on each and a shared load that makes both 1.6x slower 20 % of the time in
  spells of 5 s; one pair per five batches.

Frames go through :class:`agent.lifecycle.canary.Blocks` exactly as the shadow feeds them; the
agreement test is the one ``agreement_rule`` applies, the latency rule is ``latency_rule``,
judged after every pair. A verdict's time is when its evidence closed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from agent.config import CanaryConfig
from agent.lifecycle import canary as rules

FPS, SHADOW_EVERY, WINDOW_S, EVAL_IMAGES = 30.0, 4, 300.0, 450
PAIRS_PER_S = FPS / 5  # latency_every 4: four batches of the new engine, then one held back


def runs(rng: np.random.Generator, frames: int, rate: float, run_frames: float) -> np.ndarray:
    """Per-frame disagreement (1) at long-run ``rate``, in runs of ``run_frames`` frames on average."""
    if run_frames <= 1.0 or rate <= 0:
        return (rng.random(frames) < rate).astype(np.int8)
    out, i, state = np.empty(frames, np.int8), 0, bool(rng.random() < rate)
    end, start = 1 / run_frames, rate / ((1 - rate) * run_frames)
    while i < frames:
        length = int(rng.geometric(end if state else start))
        out[i : i + length] = state
        i, state = i + length, not state
    return out


def correlation(disagree: np.ndarray) -> dict[str, float]:
    """Rate, lag-1..3 autocorrelation and mean run length (frames) of a disagreement sequence."""
    x = disagree.astype(float)
    centred = x - x.mean()
    var = float((centred**2).mean()) or 1.0
    lags = {f"lag{k}": float((centred[:-k] * centred[k:]).mean() / var) for k in (1, 2, 3)}
    edges = np.flatnonzero(np.diff(np.concatenate([[0], disagree, [0]])))
    lengths = edges[1::2] - edges[::2]
    return {"rate": float(x.mean()), **lags, "mean_run_frames": float(lengths.mean()) if len(lengths) else 0.0}


def agreement_canary(
    rng: np.random.Generator, limit: float, rate: float, run_frames: float, alpha: float
) -> float | None:
    """Seconds until the agreement rule reverts, or None when the window passes."""
    stream = runs(rng, int(WINDOW_S * FPS), rate, run_frames)
    blocks = rules.Blocks(1, CanaryConfig().block_s, CanaryConfig().max_block_s)
    zero, classes = np.zeros(1, np.float32), np.zeros(1, np.int64)
    for f in range(0, len(stream), SHADOW_EVERY):
        blocks.add(f / FPS, ("cam",), np.array([not stream[f]]), zero, zero, classes, classes)
    closed = blocks.closed
    test = rules.exceeds([1 - b.agreement for b in closed], 0.0, 1.0, 1 - limit, alpha)
    return None if test.at is None else closed[test.at].start + closed[test.at].length_s


def latency_canary(rng: np.random.Generator, ratio: float, alpha: float) -> float | None:
    """Seconds until the latency rule reverts, or None when the window passes."""
    cfg = CanaryConfig()
    pairs = int(WINDOW_S * PAIRS_PER_S)
    busy_start, busy_end = 1 / (4 * 5 * PAIRS_PER_S), 1 / (5 * PAIRS_PER_S)  # busy 20 % of the time, 5 s spells
    busy, new, old = False, [], []
    for i in range(pairs):
        busy = (rng.random() >= busy_end) if busy else (rng.random() < busy_start)
        load = 1.6 if busy else 1.0
        old_s, new_s = 0.010 * load * np.exp(rng.normal(0, 0.15, 2))
        new_s *= ratio
        bisect.insort(old, float(old_s))
        bisect.insort(new, float(new_s))
        rule = rules.latency_rule(
            new, old, cfg.latency_quantile, cfg.max_latency_ratio, cfg.latency_slack_ms / 1e3, alpha
        )
        if rule.verdict == rules.REGRESSION:
            return (i + 1) / PAIRS_PER_S
    return None


@dataclass(frozen=True)
class Row:
    rule: str
    case: str
    truth: str
    reverted: float
    canaries: int
    median_s: float | None
    median_frames: float | None  # shadow frames seen until the revert

    def cells(self) -> list[str]:
        median = "-" if self.median_s is None else f"{self.median_s:.0f} s ({self.median_frames:.0f} frames)"
        return [self.rule, self.case, self.truth, f"{self.reverted:.1%} of {self.canaries}", median]


def _row(rule: str, case: str, truth: str, times: list[float | None]) -> Row:
    hit = [t for t in times if t is not None]
    median = float(np.median(hit)) if hit else None
    frames = median * FPS / SHADOW_EVERY if median is not None else None
    return Row(rule, case, truth, len(hit) / len(times), len(times), median, frames)


@dataclass(frozen=True)
class Spec:
    """One row to simulate: an agreement stream (limit, true agreement, run length) or a latency ratio."""

    rule: str
    case: str
    truth: str
    limit: float = 0.0
    agreement: float = 0.0
    run_frames: float = 1.0
    ratio: float = 1.0


def specs(demo_run_frames: float) -> list[Spec]:
    """The bench's rows: false reverts at the expectation and at the limit, detection of drops."""
    cfg = CanaryConfig()
    out = []
    for case, expected in (("same model, FP32 <-> INT8", 0.996), ("retrained model over its predecessor", 0.92)):
        low = rules.wilson(expected, EVAL_IMAGES)[0]
        limit = rules.Expectation(expected, low, 1.0, "").limit(cfg.agreement_tolerance)
        correlations = [
            (f"demo video runs ({demo_run_frames:.2f} frames)", demo_run_frames),
            ("runs of 1 s", FPS),
            ("runs of 10 s", 10 * FPS),
        ]
        for streams, run_frames in correlations:
            label = f"{case}: expected {expected:.1%}, limit {limit:.1%}; {streams}"
            truths = [("at the expectation", expected), ("at the limit", limit)]
            truths += [(f"{points} points under the expectation", expected - points / 100) for points in (2, 5, 10)]
            out += [Spec("agreement", label, truth, limit, agreement, run_frames) for truth, agreement in truths]
    latency = f"paired timings, {PAIRS_PER_S:g} pairs/s, shared load"
    for truth, ratio in (
        ("the same engine", 1.0),
        ("p90 +20 % (the tolerance)", 1.2),
        ("p90 +50 %", 1.5),
        ("p90 +100 %", 2.0),
    ):
        out.append(Spec("latency", latency, truth, ratio=ratio))
    return out


def simulate(spec: Spec, canaries: int, seed: int) -> Row:
    rng = np.random.default_rng(seed)
    alpha = CanaryConfig().alpha / 2  # agreement and latency share canary.alpha
    if spec.rule == "agreement":
        times = [agreement_canary(rng, spec.limit, 1 - spec.agreement, spec.run_frames, alpha) for _ in range(canaries)]
    else:
        times = [latency_canary(rng, spec.ratio, alpha) for _ in range(canaries)]
    return _row(spec.rule, spec.case, spec.truth, times)


def whole_canary_false_reverts(canaries: int, demo_run_frames: float, seed: int = 1) -> float:
    """A good same-model bundle judged by both rules at once: the per-canary false-revert rate."""
    rng = np.random.default_rng(seed)
    cfg = CanaryConfig()
    limit = rules.Expectation(0.996, rules.wilson(0.996, EVAL_IMAGES)[0], 1.0, "").limit(cfg.agreement_tolerance)
    reverted = 0
    for _ in range(canaries):
        agreement = agreement_canary(rng, limit, 0.004, demo_run_frames, cfg.alpha / 2)
        latency = latency_canary(rng, 1.0, cfg.alpha / 2)
        reverted += agreement is not None or latency is not None
    return reverted / canaries


def table(rows: list[Row]) -> str:
    lines = ["| rule | case | truth | reverted | median time to revert |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines) + "\n"
