"""Profiling stops once the mean run time is known to ±1 % (a build profiles every candidate at every
batch size), and runs to its limit when it is not. The engine's run times come from a clock the test
drives, so the rule is checked exactly, whatever the machine's load."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

import agent.engine.profile as profiling
from agent.engine.profile import STABLE, profile


def engine_taking(durations: itertools.cycle[float], monkeypatch: pytest.MonkeyPatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(profiling, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def run(images: object) -> None:
        clock.now += next(durations)

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
