"""A wave judged as a whole: failures against chance, and the devices' canary evidence pooled.

The pure functions first; then the real controller (``fleet.rollout.Runner``) on a real Mosquitto
against protocol-level devices (tests/fleet_devices.py: each answers ``deploy`` with the reply,
commit event and status an agent would publish, carrying canary evidence the test chooses).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fleet_devices import SimulatedDevice, blocks, run_rollout

from fleet.gates import binomial_tail, chance_failures, failures_note, pool_of, pooled_verdict, wave_alpha
from fleet.records import Event, Pool


def test_chance_explains_a_few_false_reverts_in_a_large_wave() -> None:
    assert binomial_tail(0, 100, 0.01) == 1.0 and binomial_tail(1, 100, 0.01) == pytest.approx(1 - 0.99**100)
    assert chance_failures(100, 0.01) == 4 and chance_failures(1, 0.01) == 0 and chance_failures(1000, 0.01) == 18
    assert "consistent with false reverts" in failures_note(3, 100, 0.01)
    note = failures_note(9, 100, 0.01)
    assert "more than canary.alpha 0.01 explains (up to 4" in note and "evidence against the bundle" in note


def event(device: str = "d", **payload) -> Event:
    found = Event.of(device, {"event": "commit", "command_id": "c", **payload})
    assert found is not None
    return found


def test_device_evidence_is_read_as_hostile_input() -> None:
    good = event(pool={"limit": 0.98, "blocks": [[15, 15], [14, 13]]})
    assert pool_of(good) == (0.98, [(15, 15), (14, 13)])
    for bad in (
        {},
        {"pool": "x"},
        {"pool": {"limit": 2, "blocks": []}},
        {"pool": {"limit": 0.9, "blocks": [[1, 2]]}},
        {"pool": {"limit": 0.9, "blocks": [[1.5, 1]]}},
        {"pool": {"limit": 0.9, "blocks": [["a", 1]]}},
        {"pool": {"limit": float("nan"), "blocks": []}},
    ):
        assert pool_of(event(**bad)) is None, bad
    # only the evidence is kept of what the device sent: the controller holds events and journals verdicts
    padded = event(pool={"limit": 0.98, "blocks": [[15, 15]], "junk": "x" * 100_000, "more": [[0] * 1000]})
    assert padded.pool is not None and padded.pool.as_dict() == {"limit": 0.98, "blocks": [[15, 15]]}
    assert Pool.of(padded.pool.as_dict()) == padded.pool  # a journal's verdict reads back the same
    assert wave_alpha([event(verdict={"alpha": 0.01}), event(verdict={"alpha": "x"}), event(verdict=5)]) == 0.01
    assert wave_alpha([event()]) is None


def test_pooling_finds_what_each_device_alone_does_not() -> None:
    rng = np.random.default_rng(4)
    events = [event(f"d{i}", pool={"limit": 0.976, "blocks": blocks(rng, 0.966)}) for i in range(10)]
    verdict = pooled_verdict(events, 0.01)
    assert verdict is not None and verdict.verdict == "regression" and verdict.units == 1500
    fine = [event(f"d{i}", pool={"limit": 0.976, "blocks": blocks(rng, 0.996)}) for i in range(10)]
    assert pooled_verdict(fine, 0.01).verdict == "undecided"  # type: ignore[union-attr]
    assert pooled_verdict([event("d0")], 0.01) is None


@pytest.mark.parametrize("agreement, halts, lag", [(0.966, True, 0.0), (0.996, False, 0.0), (0.966, True, 1.0)])
def test_a_wave_whose_pooled_evidence_shows_a_regression_halts(
    mosquitto: int, tmp_path: Path, agreement: float, halts: bool, lag: float
) -> None:
    """``lag``: each device's status shows the bundle committed a second before its verdict arrives; the
    wave still waits for the verdicts it pools."""
    rng = np.random.default_rng(7)
    devices = [
        SimulatedDevice(mosquitto, f"d{i:02d}", pool=blocks(rng, agreement), verdict_lag_s=lag) for i in range(10)
    ]
    started = time.monotonic()
    done, lines = run_rollout(mosquitto, tmp_path, devices, "10", "100%", timeout_s=30)
    out = "\n".join(lines)
    assert time.monotonic() - started < 30
    assert "wave 0: 0 of 10 failed; with canary.alpha 0.01, chance alone gives up to 1" in out, out
    assert "wave 0: pooled canary evidence, 1500 blocks" in out
    if halts:
        assert done.state == "rolled-back" and "a regression at alpha 0.01" in out
        assert "halted after wave 0: the devices' pooled canary evidence shows a regression" in out
        assert all(t.state == "rolled-back" for t in done.targets), out
    else:
        assert done.state == "completed" and "no regression at alpha 0.01" in out
