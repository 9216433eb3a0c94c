"""Canary verdicts: anytime-valid sequential tests of a new engine against the one it replaced.

Everything here is a pure function of figures and settings (no threads, clocks or engines):
the shadow and the lifecycle feed it, the fleet pools it, and ``bench/canary_bench.py``
simulates it, all through the same code.

Why sequential tests
    The canary watches its evidence continuously and must be able to revert at any moment.
    A fixed threshold on a running estimate, checked again and again, rejects good bundles
    by chance (the peeking problem). Each rule here is a test whose probability of *ever*
    rejecting a good bundle, however often it is looked at and for however long, is at most
    its share of ``canary.alpha``: a nonnegative supermartingale (the wealth of a bet against
    the bundle being good) that crosses ``1/alpha`` with probability at most ``alpha``
    (Ville's inequality). Agreement, confidence and class mix are bounded means, tested by
    betting (Waudby-Smith & Ramdas, "Estimating means of bounded random variables by
    betting", JRSS-B 2023); latency compares quantiles with confidence sequences built on
    order statistics (Howard & Ramdas, "Sequential estimation of quantiles", Bernoulli 2022).
    This is the approach of Netflix's canary analysis (Lindon, Sanden, Shirikian, KDD 2022).

Units of evidence
    Consecutive camera frames are not independent: one hard object in view for ten seconds
    is hundreds of disagreeing frames but one event. The shadow's frames are therefore
    grouped into time blocks (:class:`Blocks`), and each block is one observation. A block
    lasts ``block_s`` seconds, or twice the measured duration of the runs of disagreeing
    frames seen so far on any camera (the longest ongoing run included), whichever is
    longer, up to ``max_block_s``: the block length is chosen from the past only, before the
    block starts, so the test stays a fair bet, and a scene that produces long runs is judged
    in correspondingly long blocks. The simulation in the bench shows the false-revert rate
    holding for runs from one frame to thirty seconds.

What each rule asks
    - agreement: is top-1 agreement with the previous engine lower than the build said it
      would be, by more than the tolerance? (:func:`expectation_for` finds the expectation;
      without one the rule is off, not guessed.)
    - confidence, class mix (when agreement is off): does the new engine's output depart
      from its own passport's profile further than the previous engine's output departs from
      *its* passport's, on the same frames? Live scenes differ from any evaluation set; both
      engines see the same scene, so only a difference between them is evidence.
    - latency: is the new engine's p90 confidently above ``max_latency_ratio`` times the
      previous engine's, plus a slack? Both are timed under the same conditions (see
      :mod:`agent.engine.shadow`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, TypeAlias, TypeGuard

import numpy as np
import numpy.typing as npt

from agent.config import CanaryConfig

Values: TypeAlias = Sequence[float] | npt.NDArray[np.floating[Any]]  # observations, in order

BET_CAP = 0.5  # the adaptive bet: a single observation can at most halve its wealth
FIXED_TOP, FIXED_BETS = 0.125, 8  # the fixed bets: the largest, and how many (each half the one before)
RUN_FACTOR = 2.0  # blocks last at least this many times the measured duration of disagreeing runs
INTERVAL_Z = 1.96  # the passport's agreement intervals are 95 % Wilson intervals


# -- the two tests ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Excess:
    """A bet that observations have a positive mean, against the hypothesis that it is at most 0."""

    rejected: bool
    at: int | None  # the observation at which the wealth first crossed 1/alpha
    log_wealth: float  # the largest it reached
    mean: float | None


def excess_test(values: Values, floor: float, alpha: float) -> Excess:
    """Test H0: E[v_i | the past] <= 0 for observations with v_i >= -floor, by betting.

    The wealth starts at 1 and is staked in two halves. One half follows an adaptive bet: at each
    observation the growth-optimal fraction for the mean and variance of the observations before
    it (aGRAPA, shrunk towards a mean of 0 and the variance of a coin at the boundary), at most
    ``BET_CAP / floor``. The other half is spread evenly over fixed bets of ``FIXED_TOP / floor``
    and seven halvings of it. The fixed bets grow fast when a regression is large; the adaptive
    one finds a small or noisy one. Every bet keeps its wealth positive and, under H0, is a
    nonnegative supermartingale; so is their average, which ever reaches ``1/alpha`` with
    probability at most alpha (Ville's inequality).
    """
    floor = min(max(floor, 1e-6), 1.0)
    threshold = math.log(1 / alpha)
    fixed = FIXED_TOP / floor / 2.0 ** np.arange(FIXED_BETS)
    log_fixed = np.zeros(FIXED_BETS)
    prior_var = floor * (1 - floor) + 1e-6
    log_adaptive = best = 0.0
    total = squares = mean = 0.0
    for i, v in enumerate(values):
        variance = (prior_var + squares) / (i + 1)
        bet = 0.0 if mean <= 0 else min(mean / (variance + mean * mean), BET_CAP / floor)
        log_adaptive += math.log1p(bet * v)
        log_fixed += np.log1p(fixed * v)
        top = max(log_adaptive, float(log_fixed.max()))
        spread = float(np.exp(log_fixed - top).mean())
        log_wealth = top + math.log(0.5 * math.exp(log_adaptive - top) + 0.5 * spread)
        best = max(best, log_wealth)
        if log_wealth >= threshold:
            return Excess(True, i, best, (total + v) / (i + 1))
        squares += (v - mean) ** 2
        total += v
        mean = total / (i + 2)  # shrunk towards 0 by one pseudo-observation
    return Excess(False, None, best, total / len(values) if len(values) else None)


def upper_mean_bound(values: Values, alpha: float) -> float:
    """Anytime-valid lower confidence bound on the mean of observations in [0, 1], for reporting.

    The largest ``m`` that :func:`excess_test` rejects on ``values - m`` (bisection; rejection is
    monotone in ``m`` up to the bet's rounding). 0 when nothing is rejected.
    """
    xs = np.asarray(values, float)
    if not len(xs) or not excess_test(xs, 1e-3, alpha).rejected:
        return 0.0
    low, high = 1e-3, float(xs.max())
    for _ in range(14):
        mid = (low + high) / 2
        if excess_test(xs - mid, mid, alpha).rejected:
            low = mid
        else:
            high = mid
    return low


@lru_cache(maxsize=8192)
def count_bounds(n: int, q: float, alpha: float) -> tuple[int, int]:
    """Anytime bounds on how many of n samples lie at or below their q-quantile.

    That count is Binomial(n, q) whatever the distribution; the beta-binomial mixture
    martingale (Beta(8q, 8(1-q)) prior) gives a range that holds for every n at once with
    probability 1 - alpha. Its log is convex in the count: walk out from n*q.
    """
    a, b = 8 * q, 8 * (1 - q)
    log_threshold = math.log(1 / alpha)
    norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def log_mixture(s: int) -> float:
        beta = math.lgamma(a + s) + math.lgamma(b + n - s) - math.lgamma(a + b + n)
        return beta - norm - s * math.log(q) - (n - s) * math.log(1 - q)

    low = high = min(n, max(0, round(n * q)))
    while low > 0 and log_mixture(low - 1) < log_threshold:
        low -= 1
    while high < n and log_mixture(high + 1) < log_threshold:
        high += 1
    return low, high


def quantile_interval(ordered: Sequence[float], q: float, alpha: float) -> tuple[float, float]:
    """Anytime-valid confidence interval for the q-quantile of sorted samples (ends may be ±inf).

    At least ``low`` samples lie at or below the quantile, so it is at least the low-th
    smallest; at most ``high`` do, so it is below the (high+1)-th.
    """
    n = len(ordered)
    if not n:
        return -math.inf, math.inf
    low, high = count_bounds(n, q, alpha)
    return (ordered[low - 1] if low else -math.inf), (ordered[high] if high < n else math.inf)


# -- units of evidence -----------------------------------------------------------------------------
@dataclass
class Block:
    """One unit of canary evidence: what the shadow saw of both engines during a span of time."""

    start: float
    length_s: float
    frames: int = 0
    agreeing: int = 0
    confidence_new: float = 0.0  # sums of top-1 confidences
    confidence_old: float = 0.0
    mix_new: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # top-1 class counts
    mix_old: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def agreement(self) -> float:
        return self.agreeing / self.frames


class Blocks:
    """Shadow frames grouped into time blocks whose length follows the measured runs (module docstring).

    Fed in time order by one thread (the shadow); :attr:`closed` is what the rules read.
    """

    def __init__(self, classes: int, block_s: float, max_block_s: float) -> None:
        self.classes, self.block_s, self.max_block_s = classes, block_s, max_block_s
        self.closed: list[Block] = []
        self.current: Block | None = None
        self._run_started: dict[str, float] = {}  # camera -> time of the first disagreeing frame of its run
        self._last_seen: dict[str, float] = {}  # camera -> time of its latest disagreeing frame in that run
        self._runs_s = 0.0  # total and count of the finished runs' durations
        self._runs = 0

    def run_estimate(self, now: float) -> float:
        """Seconds a run of disagreeing frames lasts here: the mean of finished runs, or a longer ongoing one."""
        ongoing = max((now - t for t in self._run_started.values()), default=0.0)
        return max(self._runs_s / self._runs if self._runs else 0.0, ongoing)

    def add(
        self,
        at: float,
        cameras: Sequence[str],
        agree: np.ndarray,
        confidence_new: np.ndarray,
        confidence_old: np.ndarray,
        top1_new: np.ndarray,
        top1_old: np.ndarray,
    ) -> None:
        """One shadow run: per frame, its camera, whether the engines agreed, confidences and classes."""
        block = self.current
        if block is None or at >= block.start + block.length_s:
            if block is not None and block.frames:
                self.closed.append(block)
            length = min(max(self.block_s, RUN_FACTOR * self.run_estimate(at)), self.max_block_s)
            block = self.current = Block(
                at, length, mix_new=np.zeros(self.classes, np.int64), mix_old=np.zeros(self.classes, np.int64)
            )
        block.frames += len(agree)
        block.agreeing += int(agree.sum())
        block.confidence_new += float(confidence_new.sum())
        block.confidence_old += float(confidence_old.sum())
        np.add.at(block.mix_new, top1_new, 1)
        np.add.at(block.mix_old, top1_old, 1)
        for camera, same in zip(cameras, agree.tolist(), strict=True):
            if not same:
                self._run_started.setdefault(camera, at)
                self._last_seen[camera] = at
            elif camera in self._run_started:
                self._runs_s += self._last_seen.pop(camera) - self._run_started.pop(camera)
                self._runs += 1


# -- what to expect of a pair of bundles -----------------------------------------------------------
@dataclass(frozen=True)
class BundleFacts:
    """What the rules read of a bundle: its id, the checkpoint it came from, its passport."""

    bundle_id: str
    checkpoint_sha256: str | None
    passport: dict[str, Any]

    @property
    def fp32_agreement(self) -> tuple[float, int] | None:
        """(top-1 agreement with its own FP32 export, images) from the passport."""
        accuracy = self.passport.get("accuracy") or {}
        agreement, images = accuracy.get("top1_agreement"), accuracy.get("images")
        return (float(agreement), int(images)) if _number(agreement) and _number(images) and images > 0 else None

    @property
    def baseline(self) -> dict[str, Any]:
        baseline = self.passport.get("baseline")
        return baseline if isinstance(baseline, dict) else {}


@dataclass(frozen=True)
class Expectation:
    """Top-1 agreement the build measured (or implies) between a new bundle and the one it replaces."""

    agreement: float
    low: float  # 95 % interval of that figure
    high: float
    source: str

    def limit(self, tolerance: float) -> float:
        """The agreement under which the canary reverts: the expectation less the tolerance, or less
        the interval's lower half-width when the evaluation set was too small to know it that well."""
        return self.agreement - max(tolerance, self.agreement - self.low)


def wilson(p: float, n: int, z: float = INTERVAL_Z) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion p measured on n images."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _measured(baseline: dict[str, Any]) -> tuple[float, float, float] | None:
    agreement, interval = baseline.get("top1_agreement"), baseline.get("interval")
    if not _number(agreement) or not isinstance(interval, list) or len(interval) != 2:
        return None
    if not all(_number(x) for x in interval):
        return None
    return float(agreement), float(interval[0]), float(interval[1])


def expectation_for(new: BundleFacts, previous: BundleFacts) -> Expectation | None:
    """The agreement to expect between ``new`` and ``previous``, or None when no build measured it.

    In order: the new bundle was measured against this very bundle (``--baseline``), or this
    bundle against the new one (agreement is symmetric); the new bundle was measured against
    another engine of the previous bundle's checkpoint (then each side's own disagreement with
    that checkpoint's FP32 is subtracted: a lower bound); the two come from the same checkpoint
    (each one's agreement with the shared FP32, subtracted likewise). Lower bounds only ever
    make the canary more lenient, never stricter than the evidence.
    """
    for mine, theirs, direction in ((new, previous, "new"), (previous, new, "previous")):
        measured = _measured(mine.baseline)
        if measured and mine.baseline.get("bundle_id") == theirs.bundle_id:
            p, low, high = measured
            return Expectation(p, low, high, f"measured by the {direction} bundle's build against the other")
    measured = _measured(new.baseline)
    previous_fp32 = previous.fp32_agreement
    source = new.baseline.get("source_sha256")
    if measured and previous_fp32 and source and source == previous.checkpoint_sha256:
        p, low, high = measured
        slack = (1 - previous_fp32[0]) + (1 - float(new.baseline.get("fp32_agreement", 1.0)))
        return Expectation(
            max(p - slack, 0.0), max(low - slack, 0.0), high, "measured against the previous bundle's checkpoint"
        )
    new_fp32 = new.fp32_agreement
    if new_fp32 and previous_fp32 and new.checkpoint_sha256 and new.checkpoint_sha256 == previous.checkpoint_sha256:
        (a, n), (b, m) = new_fp32, previous_fp32
        return Expectation(
            max(a + b - 1, 0.0),
            max(wilson(a, n)[0] + wilson(b, m)[0] - 1, 0.0),
            1.0,
            "same checkpoint: each bundle's agreement with its FP32 export",
        )
    return None


def known_regression(new: BundleFacts, previous: BundleFacts) -> str | None:
    """Why ``new`` is already known to be less accurate than ``previous``, beyond the top-1 drop the
    deciding build allowed; None when no build says so.

    A build that compared the two (``--baseline``, either way round) says so directly. Two engines of
    one checkpoint evaluated on the same evaluation set say so through their passports' top-1.
    """
    for mine, theirs, sign in ((new, previous, 1), (previous, new, -1)):
        baseline = mine.baseline
        change = baseline.get("top1_change_points")  # the measured bundle's top-1 minus its baseline's
        if baseline.get("bundle_id") == theirs.bundle_id and _number(change):
            return _less_accurate(new, previous, -sign * change, _budget(mine), f"{mine.bundle_id}'s build")
    if new.checkpoint_sha256 and new.checkpoint_sha256 == previous.checkpoint_sha256:
        ours, theirs_ = new.passport.get("accuracy") or {}, previous.passport.get("accuracy") or {}
        same_set = new.passport.get("evaluation_set") == previous.passport.get("evaluation_set")
        if same_set and _number(ours.get("engine_top1")) and _number(theirs_.get("engine_top1")):
            drop = (theirs_["engine_top1"] - ours["engine_top1"]) * 100
            return _less_accurate(new, previous, drop, _budget(new), "both builds, on the same evaluation set")
    return None


def _budget(facts: BundleFacts) -> float:
    allowed = (facts.passport.get("gate") or {}).get("max_top1_drop_points", 1.0)
    return float(allowed) if _number(allowed) else 1.0


def _less_accurate(new: BundleFacts, previous: BundleFacts, drop: float, budget: float, by: str) -> str | None:
    if drop <= budget:
        return None
    return (
        f"{new.bundle_id} is {drop:.2f} points less accurate (top-1) than {previous.bundle_id}, measured by {by}: "
        f"more than the {budget:g} allowed"
    )


# -- rules -----------------------------------------------------------------------------------------
REGRESSION, OK, UNDECIDED, OFF = "regression", "ok", "undecided", "off"


@dataclass(frozen=True)
class Rule:
    """One rule's verdict and the evidence behind it (what events and the status carry)."""

    name: str
    verdict: str  # regression | ok (confidently within, where the rule can say so) | undecided | off
    alpha: float
    units: int = 0
    frames: int = 0
    estimate: float | None = None
    bound: float | None = None  # the anytime-valid confidence bound on the side the rule judges
    limit: float | None = None  # what that bound is compared with
    detail: str = ""

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("estimate", "bound", "limit", "alpha"):
            if isinstance(data[key], float):
                data[key] = round(data[key], 6) if math.isfinite(data[key]) else None
        return data


def exceeds(values: Values, low: float, high: float, limit: float, alpha: float) -> Excess:
    """:func:`excess_test` of H0: E[value] <= ``limit``, for values in [low, high]."""
    span = high - low
    return excess_test((np.asarray(values, float) - limit) / span, (limit - low) / span, alpha)


def agreement_rule(blocks: Sequence[Block], expectation: Expectation | None, tolerance: float, alpha: float) -> Rule:
    """Reverts when agreement with the previous engine is confidently under the expectation's limit."""
    if expectation is None:
        return Rule("agreement", OFF, alpha, detail="no build measured what to expect of this pair")
    limit = expectation.limit(tolerance)
    detail = f"expected {expectation.agreement:.2%} ({expectation.source})"
    if not blocks:
        return Rule("agreement", UNDECIDED, alpha, limit=limit, detail=detail)
    disagreement = np.array([1 - b.agreement for b in blocks])
    rejected = exceeds(disagreement, 0.0, 1.0, 1 - limit, alpha).rejected
    frames = sum(b.frames for b in blocks)
    estimate = sum(b.agreeing for b in blocks) / frames
    bound = 1 - upper_mean_bound(disagreement, alpha)  # agreement is at most this, at 1 - alpha
    verdict = REGRESSION if rejected else UNDECIDED
    return Rule("agreement", verdict, alpha, len(blocks), frames, estimate, bound, limit, detail)


def confidence_rule(
    blocks: Sequence[Block], reference: tuple[float, float] | None, tolerance: float, alpha: float
) -> Rule:
    """The new engine's mean top-1 confidence less its passport's, against the previous engine's less its,
    per block; either direction beyond ``tolerance`` (alpha split between the two)."""
    if reference is None or not blocks:
        return Rule("confidence", OFF if reference is None else UNDECIDED, alpha, detail="no output profiles")
    expected = reference[0] - reference[1]
    shift = np.array([(b.confidence_new - b.confidence_old) / b.frames for b in blocks]) - expected
    low, high = -1 - expected, 1 - expected
    rejected = (
        exceeds(shift, low, high, tolerance, alpha / 2).rejected
        or exceeds(-shift, -high, -low, tolerance, alpha / 2).rejected
    )
    frames = sum(b.frames for b in blocks)
    detail = "shift of mean top-1 confidence from the passports' difference"
    verdict = REGRESSION if rejected else UNDECIDED
    return Rule("confidence", verdict, alpha, len(blocks), frames, float(shift.mean()), None, tolerance, detail)


def class_mix_rule(
    blocks: Sequence[Block], reference: tuple[np.ndarray, np.ndarray] | None, tolerance: float, alpha: float
) -> Rule:
    """Total-variation distance of each engine's live class mix from its passport's, new minus previous."""
    if reference is None or not blocks:
        return Rule("class_mix", OFF if reference is None else UNDECIDED, alpha, detail="no output profiles")
    new_ref, old_ref = reference
    distance = np.array(
        [
            np.abs(b.mix_new / b.frames - new_ref).sum() / 2 - np.abs(b.mix_old / b.frames - old_ref).sum() / 2
            for b in blocks
        ]
    )
    rejected = exceeds(distance, -1.0, 1.0, tolerance, alpha).rejected
    frames = sum(b.frames for b in blocks)
    detail = "class-mix distance from the passport, new engine's minus previous engine's"
    verdict = REGRESSION if rejected else UNDECIDED
    return Rule("class_mix", verdict, alpha, len(blocks), frames, float(distance.mean()), None, tolerance, detail)


def latency_rule(
    new_s: Sequence[float], old_s: Sequence[float], q: float, ratio: float, slack_s: float, alpha: float
) -> Rule:
    """Reverts when the new engine's q-quantile is confidently above ``ratio`` x the previous one's + slack.

    ``new_s`` and ``old_s`` are sorted timings taken under the same conditions. Each quantile has an
    anytime interval at alpha/2: the new engine's lower end against the previous one's upper end.
    ``ok`` when the new engine's upper end is within the limit of the previous one's lower end. The
    rule's estimate is the ratio of the two quantiles; its bound and limit are in milliseconds.
    """
    if not new_s or not old_s:
        return Rule("latency", UNDECIDED, alpha, detail=f"p{q * 100:g}: no timings yet")
    new_low, new_high = quantile_interval(new_s, q, alpha / 2)
    old_low, old_high = quantile_interval(old_s, q, alpha / 2)
    new_q, old_q = _quantile(new_s, q), _quantile(old_s, q)
    limit = ratio * old_high + slack_s
    if new_low > limit:
        verdict = REGRESSION
    elif new_high <= ratio * old_low + slack_s:
        verdict = OK
    else:
        verdict = UNDECIDED
    detail = (
        f"p{q * 100:g} {new_q * 1e3:.3f} ms against the previous engine's {old_q * 1e3:.3f} ms "
        f"(new at least {_ms(new_low)}, previous at most {_ms(old_high)}; limit {ratio:g}x + {slack_s * 1e3:g} ms)"
    )
    bound = new_low * 1e3 if math.isfinite(new_low) else None  # in ms, as the limit
    return Rule(
        "latency",
        verdict,
        alpha,
        min(len(new_s), len(old_s)),
        0,
        new_q / max(old_q, 1e-9),
        bound,
        limit * 1e3 if math.isfinite(limit) else None,
        detail,
    )


def _quantile(ordered: Sequence[float], q: float) -> float:
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if math.isfinite(seconds) else "unbounded"


# -- pooling across devices ------------------------------------------------------------------------
def pooled_agreement(devices: Sequence[tuple[float, Sequence[tuple[int, int]]]], alpha: float) -> Rule:
    """One agreement verdict from many devices' blocks: ``(limit, [(frames, agreeing), ...])`` each.

    Blocks are taken round-robin across devices in the order given (fixed before looking at
    them), each as its disagreement beyond its own device's limit: the bet of one device's
    rule, on more evidence than any one device has.
    """
    values, frames, agreeing = [], 0, 0
    for i in range(max((len(blocks) for _, blocks in devices), default=0)):
        for limit, blocks in devices:
            if i < len(blocks) and blocks[i][0] > 0:
                n, agree = blocks[i]
                values.append((1 - agree / n) - (1 - limit))
                frames, agreeing = frames + n, agreeing + agree
    if not values:
        return Rule("pooled_agreement", UNDECIDED, alpha, detail="no agreement evidence from the devices")
    floor = max(1 - limit for limit, _ in devices)
    rejected = excess_test(values, floor, alpha).rejected
    detail = f"{len(devices)} devices; mean disagreement beyond their limits {float(np.mean(values)) * 100:+.2f} points"
    verdict = REGRESSION if rejected else UNDECIDED
    return Rule("pooled_agreement", verdict, alpha, len(values), frames, agreeing / frames, None, None, detail)


# -- the verdict -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputReferences:
    confidence: tuple[float, float]  # mean top-1 confidence in each passport: new, previous
    class_mix: tuple[np.ndarray, np.ndarray]


def output_references(new: dict[str, Any], previous: dict[str, Any]) -> OutputReferences | None:
    """Both passports' output profiles (mean top-1 confidence, class mix), when both have comparable ones."""
    a, b = new.get("outputs"), previous.get("outputs")
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    try:
        mix_a, mix_b = np.asarray(a["class_mix"], float), np.asarray(b["class_mix"], float)
        confidence = (float(a["mean_confidence"]), float(b["mean_confidence"]))
    except (KeyError, TypeError, ValueError):
        return None
    if mix_a.shape != mix_b.shape or mix_a.ndim != 1:
        return None
    return OutputReferences(confidence, (mix_a, mix_b))


@dataclass(frozen=True)
class CanaryEvidence:
    """Everything a verdict is a function of."""

    blocks: Sequence[Block]
    new_s: Sequence[float]  # paired timings, sorted
    previous_s: Sequence[float]
    failed_batches: int
    expectation: Expectation | None
    outputs: OutputReferences | None


@dataclass(frozen=True)
class Judgement:
    rules: tuple[Rule, ...]
    alpha: float
    regression: Rule | None  # the first rule that found one
    reason: str  # why, in words an operator can act on ("" without a regression)
    pool: dict[str, Any] | None = None  # the agreement evidence a fleet controller pools across devices

    def public(self) -> dict[str, Any]:
        """For events and the status: each rule's evidence, which rules judged, and alpha."""
        judged = [r.name for r in self.rules if r.verdict != OFF]
        return {"alpha": self.alpha, "judged_by": judged, "rules": {r.name: r.public() for r in self.rules}}


def judge(cfg: CanaryConfig, evidence: CanaryEvidence) -> Judgement:
    """Every rule on the evidence, canary.alpha split evenly between the statistical rules that are on.

    Agreement judges when the builds measured what to expect of the pair; otherwise confidence
    and class mix do (each a departure between the two engines on the same frames, beyond what
    their passports' profiles differ by). Latency always judges. Failed batches are counted, not
    tested: any number over ``max_errors`` is a regression.
    """
    label_free = evidence.expectation is None and evidence.outputs is not None
    alpha = cfg.alpha / (2 + label_free)
    rules = [agreement_rule(evidence.blocks, evidence.expectation, cfg.agreement_tolerance, alpha)]
    outputs = evidence.outputs if label_free else None
    confidence, class_mix = (outputs.confidence, outputs.class_mix) if outputs else (None, None)
    rules.append(confidence_rule(evidence.blocks, confidence, cfg.confidence_tolerance, alpha))
    rules.append(class_mix_rule(evidence.blocks, class_mix, cfg.class_mix_tolerance, alpha))
    rules.append(
        latency_rule(
            evidence.new_s,
            evidence.previous_s,
            cfg.latency_quantile,
            cfg.max_latency_ratio,
            cfg.latency_slack_ms / 1e3,
            alpha,
        )
    )
    failed = evidence.failed_batches
    rules.append(
        Rule(
            "failed_batches",
            REGRESSION if failed > cfg.max_errors else UNDECIDED,
            0.0,
            estimate=float(failed),
            limit=float(cfg.max_errors),
        )
    )
    regression = next((r for r in rules if r.verdict == REGRESSION), None)
    pool = None
    if evidence.expectation is not None:
        blocks = [[b.frames, b.agreeing] for b in evidence.blocks]
        pool = {"limit": round(evidence.expectation.limit(cfg.agreement_tolerance), 6), "blocks": blocks}
    return Judgement(tuple(rules), cfg.alpha, regression, _reason(regression, cfg) if regression else "", pool)


def _reason(rule: Rule, cfg: CanaryConfig) -> str:
    confidence = f"at {1 - rule.alpha:.1%} confidence"
    if rule.name == "agreement":
        return (
            f"top-1 agreement with the previous engine is {rule.estimate:.2%} over {rule.frames} frames in "
            f"{rule.units} blocks, at most {rule.bound:.2%} {confidence}: under the limit of {rule.limit:.2%} "
            f"({rule.detail}, less the tolerance)"
        )
    if rule.name == "latency":
        return f"tail latency {rule.estimate:.2f}x the previous engine's on {rule.units} paired batches: {rule.detail}"
    if rule.name == "failed_batches":
        return f"{rule.estimate:.0f} failed batches, more than canary.max_errors {cfg.max_errors}"
    return (
        f"{rule.detail}: {rule.estimate:+.3f} on average over {rule.frames} frames in {rule.units} blocks, "
        f"beyond the tolerance of {rule.limit:g} {confidence}"
    )
