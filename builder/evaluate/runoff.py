"""Close candidates timed head to head: one process, each in turn, judged by the median of paired ratios.

Each candidate's profile (``agent.engine.profile``) runs alone in its own process, one after another,
and a shared machine's speed drifts between two such profiles by more than close candidates differ:
in the previous release's gate-missed bench runs the builder shipped the slower of two INT8 recipes in
two builds of three. Timed in turns in one process, every candidate sees the same moments of the
machine, and the ratio of two consecutive turns cancels the drift.

An engine's turn is one untimed batch, then, at each batch size timed, batches for at least
:data:`TURN_S`. The first batch after another engine pays for that engine's worker threads, still
spinning on the cores (OpenVINO's longer than ONNX Runtime's); timed, it handicaps whichever candidate
follows OpenVINO. The untimed batch is of one image: the spinning stops after a while of its own,
which a run of one image covers as a batch's does, at a fraction of the cost on a large model. The
order of the candidates rotates each round, for what the untimed batch does not absorb.

``python -m builder.evaluate.runoff SPEC`` runs one (SPEC: JSON, see :func:`main`) and prints, per
candidate, its seconds per image in each round. :func:`relative_speeds` turns those into the figures a
choice reads; it and :func:`settled` are pure, so the rule is tested without timing anything.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuildError

TURN_S = 0.02  # timed batches per turn: enough that one slow batch does not decide a round
MIN_ROUNDS = 10  # the fewest rounds whose median's 95 % interval (order statistics) is defined
STABLE = 0.01  # a ratio known to within ±1 % changes no choice: profiling more cannot help
# A slower median than this is not given up for accuracy, even where the interval still reaches the fastest:
# a build's few rounds of a large model's one-second batches leave intervals wide enough to tie a 1.2x gap
NEGLIGIBLE = 0.05


@dataclass(frozen=True)
class RelativeSpeed:
    """A candidate's speed as a fraction of the runoff's fastest: the median over rounds of the fastest's
    seconds per image over its own, and that median's 95 % interval."""

    ratio: float
    low: float
    high: float
    rounds: int

    @property
    def tied(self) -> bool:
        """Not told apart from the fastest: the interval reaches 1."""
        return self.high >= 1.0

    @property
    def even(self) -> bool:
        """A tie the choice gives to accuracy: not told apart, and its median within :data:`NEGLIGIBLE`."""
        return self.tied and self.ratio >= 1 - NEGLIGIBLE

    def as_dict(self) -> dict[str, Any]:
        return {"speed_vs_fastest": round(self.ratio, 4), "interval": [round(self.low, 4), round(self.high, 4)],
                "rounds": self.rounds}  # fmt: skip


def median_interval(values: np.ndarray) -> tuple[float, float, float]:
    """The median of ``values`` and its distribution-free 95 % interval (order statistics at n/2 ± 0.98√n):
    the paired ratios of a shared machine have long tails, which a normal interval would understate."""
    ordered = np.sort(values)
    n = len(ordered)
    half = 0.98 * math.sqrt(n)
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return float(np.median(ordered)), float(ordered[low]), float(ordered[high])


def relative_speeds(seconds_per_image: Mapping[str, list[float] | np.ndarray]) -> dict[str, RelativeSpeed]:
    """Each candidate against the fastest (the highest median ratio to any one reference), round by round.

    Ratios are taken against a first reference, the fastest is the candidate with the highest median,
    and every candidate is then measured against it pairwise. A median of ratios is not transitive: where
    one candidate beats that fastest pairwise, it becomes the fastest (at most once per candidate). Where
    candidates beat each other in a circle, none leads: one that still beats the fastest pairwise reads
    1, level with it, so no figure reads above 1.
    """
    times = {label: np.asarray(t, dtype=np.float64) for label, t in seconds_per_image.items()}
    reference = next(iter(times.values()))
    fastest = max(times, key=lambda label: float(np.median(reference / times[label])))
    for _ in times:
        challenger = max(times, key=lambda label: float(np.median(times[fastest] / times[label])))
        if float(np.median(times[fastest] / times[challenger])) <= 1.0:
            break
        fastest = challenger
    speeds = {}
    for label, own in times.items():
        ratio, low, high = median_interval(times[fastest] / own)
        speeds[label] = RelativeSpeed(min(ratio, 1.0), low, high, len(own))
    speeds[fastest] = RelativeSpeed(1.0, 1.0, 1.0, len(times[fastest]))
    return speeds


def settled(seconds_per_image: Mapping[str, list[float] | np.ndarray]) -> bool:
    """Whether more rounds could not change the choice: after :data:`MIN_ROUNDS`, every candidate is either
    told apart from the fastest or known to within :data:`STABLE` of it."""
    if min(len(t) for t in seconds_per_image.values()) < MIN_ROUNDS:
        return False
    return all(not s.tied or s.high - s.low <= 2 * STABLE for s in relative_speeds(seconds_per_image).values())


def rounds(
    runs: Mapping[str, Mapping[int, Callable[[], object]]],
    shares: Mapping[int, float],
    max_seconds: float,
    until: Callable[[dict[str, list[float]]], bool] = settled,
) -> dict[str, list[float]]:
    """Seconds per image of each candidate in each round: ``runs[label][batch]`` runs one batch of that size,
    ``shares`` weighs each size by its share of the images served (the device's mean speed). The smallest
    size of ``runs[label]`` (which may hold sizes ``shares`` does not) opens each turn, untimed. Rounds go on
    until ``until`` holds or ``max_seconds`` have passed, and at least :data:`MIN_ROUNDS` are made."""
    order = list(runs)
    found: dict[str, list[float]] = {label: [] for label in order}
    total = sum(shares.values())
    start = time.perf_counter()
    while True:
        for label in order:
            runs[label][min(runs[label])]()  # untimed (see the module docstring)
            found[label].append(sum(w / total * _turn(runs[label][b]) / b for b, w in shares.items()))
        order = order[1:] + order[:1]
        made = len(found[order[0]])
        if made >= MIN_ROUNDS and (until(found) or time.perf_counter() - start >= max_seconds):
            return found


def _turn(run: Callable[[], object]) -> float:
    """Seconds per batch over batches for at least :data:`TURN_S`."""
    count, t0 = 0, time.perf_counter()
    while True:
        run()
        count += 1
        took = time.perf_counter() - t0
        if took >= TURN_S:
            return took / count


Served = tuple[str, str, Path, int]  # how an engine is opened: backend, target, file, images per stream


def time_head_to_head(
    engines: Mapping[str, Served],
    size: int,
    shares: Mapping[int, float],
    max_seconds: float,
    threads: int | None,
) -> dict[str, list[float]]:
    """:func:`rounds` of ``engines`` (label -> :data:`Served`) in a process that serves only them, as the
    agent opens them: the builder's own threads and memory stay out of the timing."""
    spec = {
        "engines": {label: [backend, target, str(path), k] for label, (backend, target, path, k) in engines.items()},
        "size": size,
        "shares": {str(b): w for b, w in shares.items()},
        "max_seconds": max_seconds,
        "threads": threads,
    }
    command = [sys.executable, "-m", "builder.evaluate.runoff", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise BuildError(f"timing {', '.join(engines)} head to head failed: {proc.stderr.strip().splitlines()[-1:]}")
    found: dict[str, list[float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


def main() -> None:
    """SPEC: ``{"engines": {label: [backend, target, path, images_per_stream]}, "size": pixels,
    "shares": {batch: weight}, "max_seconds": s, "threads": n | null}``. Engines open as the agent opens them."""
    from agent.engine.runtimes import open_engine

    spec = json.loads(sys.argv[1])
    shares = {int(b): float(w) for b, w in spec["shares"].items()}
    size, batch = int(spec["size"]), max(shares)
    rng = np.random.default_rng(0)
    images = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8) for b in {1, *shares}}
    runs = {}
    for label, (backend, target, path, chunk) in spec["engines"].items():
        engine = open_engine(backend, target, path, batch, spec.get("threads"), images_per_stream=chunk)
        runs[label] = {b: (lambda e=engine, x=x: e.run(x)) for b, x in images.items()}  # 1: the untimed batch
    print(json.dumps(rounds(runs, shares, float(spec["max_seconds"]))))


if __name__ == "__main__":
    main()
