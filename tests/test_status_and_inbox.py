"""The retained status and the inbox's choice, without a process (the agents in the integration tier publish
and poll through them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agent.control.status import LIFECYCLE_EVENTS, canary_of, engine_of, figures_of
from agent.lifecycle.inbox import SETTLE_S, next_item
from agent.lifecycle.store import EngineState, Mark


def test_a_canary_verdict_becomes_what_the_fleet_compares_devices_by() -> None:
    commit = {
        "bundle_id": "b2",
        "rule": None,
        "figures": {"agreement": 0.97, "shadow_frames": 900},
        "verdict": {"alpha": 0.01, "rules": {"agreement": {"bound": 0.95, "limit": 0.9}}},
    }
    assert canary_of(commit, "commit") == {
        "bundle_id": "b2", "verdict": "commit", "rule": None, "agreement": 0.97, "agreement_bound": 0.95,
        "agreement_limit": 0.9, "alpha": 0.01, "shadow_frames": 900,
    }  # fmt: skip
    assert {"commit", "revert", "swap", "rollback"} <= set(LIFECYCLE_EVENTS)


def test_figures_and_engine_state() -> None:
    snapshot = {
        "cameras": {"a": {"processed_fps": 10.004}, "b": {"processed_fps": 5.0}},
        "latency": {"p99_ms": 40.0},
        "drift": {"confidence_drift": 0.0},
    }
    assert figures_of(snapshot) == {"fps": 15.0, "p99_ms": 40.0, "drift": {"confidence_drift": 0.0}}
    state = EngineState(active="b1", previous="b0", bad={"bx": Mark("golden set failed")})
    assert engine_of(state) == {"active": "b1", "previous": "b0", "canary": None, "bad": ["bx"]}


def test_the_inbox_takes_the_oldest_settled_bundle_and_skips_copies_in_progress(tmp_path: Path) -> None:
    now = time.time()
    old, newer, fresh = tmp_path / "old.tar.gz", tmp_path / "newer.tgz", tmp_path / "fresh.tar.gz"
    hidden, folder, other = tmp_path / ".copying.tar.gz", tmp_path / "bundle", tmp_path / "notes.txt"
    for path in (old, newer, fresh, hidden, other):
        path.write_bytes(b"x")
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    for path, age in ((old, 30), (newer, 20), (hidden, 60), (other, 60), (folder, 10), (fresh, SETTLE_S / 2)):
        os.utime(path, (now - age, now - age))
    assert next_item(tmp_path, now, set()) == old
    assert next_item(tmp_path, now, {old}) == newer
    assert next_item(tmp_path, now, {old, newer}) == folder
    assert next_item(tmp_path, now, {old, newer, folder}) is None  # fresh is still being copied
