"""kill -9 at every step of a swap, a crash loop during a canary, start-up fallback, a bug mid-deploy.

Whatever instant the agent dies at, the next start serves a verified engine the state
file names, and the interrupted deploy completes or is undone. Bundles arrive through
the inbox folder, so these tests need no broker.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import NO_SWAP_LATENCY_GATE, read_results, rebundle, run_agent, start_agent, stop_agent, write_config

from agent.engine.bundle import verify_bundle
from agent.lifecycle.failpoints import STEPS

NEW = "vit-digits-v2"
# Latency is not what these tests judge (the candidate is the same engine): a wide slack keeps
# a busy test machine's scheduling noise from reverting it.
CANARY = {"window_s": 2, "min_frames": 20, "shadow_every": 1, "latency_slack_ms": 50}


@pytest.fixture(scope="module")
def v2(demo_bundle: Path, signing_key, tmp_path_factory) -> Path:
    """The same engine as a new version: a candidate that passes every check."""
    return rebundle(demo_bundle, tmp_path_factory.mktemp("v2") / "v2", signing_key[0], NEW)


def _config(folder: Path, demo_bundle: Path, signing_key, video: Path, **canary: Any) -> Path:
    return write_config(
        folder / "agent.yaml",
        demo_bundle,
        signing_key[1],
        [{"name": "cam", "source": str(video), "loop": True, "fps": 15}],
        engine={"bundle": str(demo_bundle), "trusted_keys": [str(signing_key[1])], "inbox": str(folder / "inbox")},
        canary={**CANARY, **canary},
        swap=NO_SWAP_LATENCY_GATE,
    )


def _state(folder: Path) -> dict[str, Any]:
    path = folder / "state" / "engines.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _wait_state(folder: Path, predicate: Callable[[dict[str, Any]], bool], timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(folder)
        if state and predicate(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"state never matched; last: {_state(folder)}")


def _wait_serving(folder: Path, already: int, frames: int = 10) -> None:
    """Until the restarted agent has written ``frames`` more results."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(read_results(folder / "results.jsonl")) < already + frames:
        time.sleep(0.2)
    assert len(read_results(folder / "results.jsonl")) >= already + frames, "the agent serves after the restart"


def _drop(bundle: Path, inbox: Path) -> None:
    """As an operator should: copy under a hidden name, then rename into place."""
    inbox.mkdir(exist_ok=True)
    shutil.copytree(bundle, inbox / f".{bundle.name}")
    (inbox / f".{bundle.name}").rename(inbox / bundle.name)


def _assert_consistent(folder: Path, signing_key) -> dict[str, Any]:
    """The state file parses and names installed, verifiable engines."""
    from agent.engine.signing import load_public_key

    state = _state(folder)
    keys = [load_public_key(signing_key[1])]
    for bundle_id in filter(None, (state.get("active"), state.get("previous"))):
        assert verify_bundle(folder / "state" / "engines" / bundle_id, keys).bundle_id == bundle_id
    return state


@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_then_restart_is_consistent(
    step: str, demo_bundle, v2, signing_key, digits_video, tmp_path: Path
) -> None:
    config = _config(tmp_path, demo_bundle, signing_key, digits_video)
    old = verify_bundle(demo_bundle, None).bundle_id
    assert run_agent(config, "--check").returncode == 0  # installs the first engine
    first = start_agent(config, env={"EDGEVIT_FAILPOINT": step})
    time.sleep(2)
    _drop(v2, tmp_path / "inbox")
    first.communicate(timeout=180)
    assert first.returncode == -signal.SIGKILL, f"the failpoint {step} was reached"
    assert _assert_consistent(tmp_path, signing_key)["active"] in (old, NEW)
    served = len(read_results(tmp_path / "results.jsonl"))
    second = start_agent(config)
    _wait_serving(tmp_path, served)
    state = _wait_state(tmp_path, lambda s: s["active"] == NEW and s["canary"] is None)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.name == "v2" for p in (tmp_path / "inbox").iterdir()):
        time.sleep(0.2)
    _, err = stop_agent(second)
    assert second.returncode == 0, err[-3000:]
    assert state["previous"] == old and NEW not in state["bad"]
    assert not list((tmp_path / "state" / "engines").glob(".incoming-*")), "an interrupted copy is cleared"
    assert not (tmp_path / "inbox" / "v2").exists() and not (tmp_path / "inbox" / "rejected").exists()
    assert read_results(tmp_path / "results.jsonl")[-1]["engine"] == NEW
    _assert_consistent(tmp_path, signing_key)


def test_a_crash_loop_in_the_canary_reverts(demo_bundle, v2, signing_key, digits_video, tmp_path: Path) -> None:
    config = _config(tmp_path, demo_bundle, signing_key, digits_video, window_s=600, max_restarts=2)
    old = verify_bundle(demo_bundle, None).bundle_id
    agent = start_agent(config)
    _wait_state(tmp_path, lambda s: s.get("active") == old)
    _drop(v2, tmp_path / "inbox")
    _wait_state(tmp_path, lambda s: (s["canary"] or {}).get("bundle") == NEW)
    for boots in (1, 2):  # systemd restarts the agent; it dies again during the canary
        time.sleep(1)
        agent.kill()
        agent.communicate()
        agent = start_agent(config)
        _wait_state(tmp_path, lambda s, b=boots: (s["canary"] or {}).get("boots") == b)
    time.sleep(1)
    agent.kill()
    agent.communicate()
    served = len(read_results(tmp_path / "results.jsonl"))
    agent = start_agent(config)
    _wait_serving(tmp_path, served)
    state = _wait_state(tmp_path, lambda s: s["canary"] is None)
    _, err = stop_agent(agent)
    assert agent.returncode == 0, err[-3000:]
    assert state["active"] == old and "crash loop: the agent started 3 times" in state["bad"][NEW]["reason"]
    assert read_results(tmp_path / "results.jsonl")[-1]["engine"] == old


def test_start_falls_back_when_the_active_engine_is_damaged(
    demo_bundle, v2, signing_key, digits_video, tmp_path: Path
) -> None:
    config = _config(tmp_path, demo_bundle, signing_key, digits_video)
    old = verify_bundle(demo_bundle, None).bundle_id
    agent = start_agent(config)
    _wait_state(tmp_path, lambda s: s.get("active") == old)
    _drop(v2, tmp_path / "inbox")
    _wait_state(tmp_path, lambda s: s["active"] == NEW and s["canary"] is None)
    stop_agent(agent)
    engine = verify_bundle(tmp_path / "state" / "engines" / NEW, None).engine_path
    engine.write_bytes(engine.read_bytes()[:-100])  # a flash write error, say
    served = len(read_results(tmp_path / "results.jsonl"))
    agent = start_agent(config)
    _wait_serving(tmp_path, served)
    state = _wait_state(tmp_path, lambda s: s["active"] == old)
    _, err = stop_agent(agent)
    assert agent.returncode == 0 and f"fell back to engine {old}" in err
    assert "does not match its sha256" in state["bad"][NEW]["reason"]
    for bundle_id in (old, NEW):  # both store copies damaged: engine.bundle is installed afresh
        manifest = json.loads((tmp_path / "state" / "engines" / bundle_id / "manifest.json").read_text())
        (tmp_path / "state" / "engines" / bundle_id / manifest["engine"]["files"][0]).write_bytes(b"broken")
    served = len(read_results(tmp_path / "results.jsonl"))
    agent = start_agent(config)
    _wait_serving(tmp_path, served)
    _, err = stop_agent(agent)
    assert agent.returncode == 0 and f"reinstalled {old} from engine.bundle" in err, err[-3000:]
    assert _state(tmp_path)["active"] == old and read_results(tmp_path / "results.jsonl")[-1]["engine"] == old


def test_an_unexpected_error_in_a_deploy_is_reported_and_the_item_set_aside(
    demo_bundle, v2, signing_key, digits_video, tmp_path: Path
) -> None:
    config = _config(tmp_path, demo_bundle, signing_key, digits_video)
    old = verify_bundle(demo_bundle, None).bundle_id
    assert run_agent(config, "--check").returncode == 0  # installs the first engine, before the bug is armed
    agent = start_agent(config, env={"EDGEVIT_FAILPOINT": "install-copied:raise"})
    _wait_serving(tmp_path, 0)
    _drop(v2, tmp_path / "inbox")
    reason = tmp_path / "inbox" / "rejected" / "v2.reason.txt"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not reason.exists():
        time.sleep(0.2)
    assert reason.read_text().strip() == "internal error: FailpointError: failpoint install-copied"
    _wait_serving(tmp_path, len(read_results(tmp_path / "results.jsonl")))
    _, err = stop_agent(agent)
    assert agent.returncode == 0, err[-3000:]
    assert _assert_consistent(tmp_path, signing_key)["active"] == old
    assert not list((tmp_path / "state" / "engines").glob(".incoming-*")), "the half-installed copy is gone"
