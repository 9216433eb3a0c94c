"""Profiling stops once the mean run time is known to ±1 % (a build profiles every candidate at every
batch size), and runs to its limit when it is not. The engine's run times come from a clock the test
drives, so the rule is checked exactly, whatever the machine's load."""

from __future__ import annotations

import itertools
from functools import partial
from types import SimpleNamespace

import pytest

import agent.engine.profile as profiling
from agent.engine.profile import STABLE, profile, shared_row, timed_sizes
from agent.engine.runtimes.openvino import requests_for


def engine_taking(durations: itertools.cycle[float], monkeypatch: pytest.MonkeyPatch, threads_busy: float = 1.0):
    """An engine whose runs take ``durations`` of the test's clock, with ``threads_busy`` cores' worth of CPU."""
    clock = SimpleNamespace(now=0.0, cpu=0.0)
    monkeypatch.setattr(
        profiling, "time", SimpleNamespace(perf_counter=lambda: clock.now, process_time=lambda: clock.cpu)
    )

    def run(images: object) -> None:
        took = next(durations)
        clock.now += took
        clock.cpu += threads_busy * took

    return run


def test_a_steady_engine_stops_at_the_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    run = engine_taking(itertools.cycle([0.0100, 0.0101, 0.0099]), monkeypatch)
    steady = profile(run, 8, 1, max_seconds=5.0, min_runs=10)
    assert steady["runs"] == 10 and steady["rel_ci95"] <= STABLE


def test_an_erratic_engine_runs_until_stable_or_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    run = engine_taking(itertools.cycle([0.001, 0.02]), monkeypatch)
    erratic = profile(run, 8, 1, max_seconds=0.5, min_runs=10)
    assert erratic["rel_ci95"] > STABLE and 0.5 <= erratic["runs"] * 0.0105 < 0.55  # about 0.5 s of runs
    settling = profile(run, 8, 1, max_seconds=1000.0, min_runs=10)
    assert settling["rel_ci95"] <= STABLE < erratic["rel_ci95"] and settling["runs"] > erratic["runs"]


def test_the_share_of_the_cores_an_engine_keeps_busy_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """What an engine leaves idle on its own bounds what a device can gain by giving it more of the cores."""
    monkeypatch.setattr(profiling, "os", SimpleNamespace(sched_getaffinity=lambda pid: {0, 1, 2, 3}))
    run = engine_taking(itertools.cycle([0.01]), monkeypatch, threads_busy=3.0)
    assert profile(run, 8, 1, max_seconds=1.0, min_runs=10)["cpu_share"] == 0.75


def test_sizes_that_run_the_same_requests_share_one_timing() -> None:
    """With 4 images per stream, batches of 2 to 4 run one padded request and 5 to 8 two: each group is timed at
    its largest size; one image runs on its own compile; an engine that says nothing has every size timed."""
    requests = partial(requests_for, chunk=4)
    assert timed_sizes(list(range(1, 9)), requests) == {1: 1, 2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
    assert timed_sizes([2, 3, 5, 6, 7], requests) == {2: 3, 3: 3, 5: 7, 6: 7, 7: 7}  # only the sizes asked for
    assert timed_sizes([1, 2, 3], None) == {1: 1, 2: 2, 3: 3}
    row = {"batch": 4, "images_per_s": 40.0, "p50_ms": 100.0, "p99_ms": 110.0, "runs": 10}
    assert shared_row(row, 2) == {**row, "batch": 2, "images_per_s": 20.0, "timed_at": 4}
