"""The operator's side under hostile devices, crashes and a second operator, against a real Mosquitto.

Devices here are protocol-level (tests/fleet_devices.py), some of them hostile: they forge
other devices' outcomes, send what no agent sends, flood, and write terminal control and rich
markup into every string. The controller must keep every honest device's outcome true, stay up,
and print only what a terminal shows as text.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from fleet_devices import SimulatedDevice, blocks, run_rollout
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console

from agent.lifecycle.failpoints import FLEET_STEPS
from fleet.commands import _table, changes, summary_table
from fleet.link import Broker, Device, FleetLink
from fleet.records import Event, Reply, Status
from fleet.rollout import Rollout, RolloutFileError, Runner, TargetState, list_rollouts, repair_journal

NASTY = "\x1b]0;owned\x07\x1b[2J\x1b]52;c;cm0gLXJmIH4K\x07[/dim][red]x[/]\ud800"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=20,
)
FIELDS = st.sampled_from(["state", "labels", "engine", "fps", "p99_ms", "drift", "last_event", "last_canary"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(FIELDS | st.text(max_size=5), JSON, max_size=8), JSON, JSON)
def test_no_device_message_raises_in_the_records(status: dict, engine: object, other: object) -> None:
    status = {**status, "engine": engine} if isinstance(engine, dict) else status
    device = Device("d", Status.of(status))
    row = device.row()
    assert row["device"] == "d" and isinstance(row["bad"], list)
    if isinstance(other, dict):
        Event.of("d", other), Reply.of("d", other)
        Event.of("d", {**other, "event": "commit", "command_id": "c"})


MESSAGES = st.lists(
    st.tuples(
        st.sampled_from(["status", "events", "reply", "metrics"]),
        st.sampled_from(["d0", "evil", "[/dim]evil", "a" * 64]),  # Mosquitto refuses control characters in topics
        st.dictionaries(FIELDS | st.sampled_from(["event", "command_id", "id", "ok", "error"]), JSON, max_size=6)
        | JSON,
    ),
    min_size=10,
    max_size=40,
)


@settings(
    max_examples=6, deadline=None, phases=[Phase.generate], suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(MESSAGES)
def test_hostile_messages_through_a_real_broker_leave_the_controller_reading(mosquitto: int, messages: list) -> None:
    link = FleetLink(Broker("127.0.0.1", mosquitto)).connect(settle_s=0.2)
    link.track({"c1": "d0"})
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", mosquitto)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        for kind, device, payload in messages:
            client.publish(f"edgevit/{device}/{kind}", json.dumps(payload), qos=1).wait_for_publish(5)
        client.publish("edgevit/good/status", json.dumps({"state": "online"}), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while (link.device("good") is None or link.device("good").status.state != "online") and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert link.device("good").status.state == "online", "the link still reads after every hostile message"
        render(_table([d.row() for d in link.snapshot().values()]))
        assert link.client.is_connected()
    finally:
        client.publish("edgevit/good/status", b"", retain=True).wait_for_publish(5)
        for _, device, _ in messages:  # clear what was retained, for the next example
            client.publish(f"edgevit/{device}/status", b"", qos=1, retain=True).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        link.close()


def render(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=False).print(renderable)
    return out.getvalue()


def test_device_text_reaches_the_terminal_as_text() -> None:
    hostile = {
        "state": "online",
        "labels": {"site": NASTY, "[bold]": "x"},
        "engine": {"active": NASTY, "canary": "[/]", "bad": [NASTY]},
        "last_event": {"event": NASTY, "bundle_id": "[/dim]"},
    }
    rows = [Device("evil[/]", Status.of(hostile)).row(), Device("ok", Status.of({"engine": {"active": 5}})).row()]
    table = render(_table(rows))
    headline, counts = summary_table([Device("evil", Status.of(hostile))])
    lines = changes({"evil": rows[1]}, {"evil": rows[0]})
    for text in (table, render(counts), headline, *lines):
        assert "\x1b" not in text and "\x07" not in text and "\ud800" not in text
    assert "[/dim]" in table and "evil[/]" in table, "markup shown as text, not interpreted"


def journal_rollout(folder: Path) -> Path:
    from fleet.rollout import Target

    rollout = Rollout.new("b", {"url": "u"}, {}, max_failures_pct=0, timeout_s=60, rollback_on_halt=True)
    rollout.targets = [Target("d0", 0), Target("d1", 0)]
    path = rollout.save(folder)
    rollout.append(folder, [{"target": "d0", "state": "sent", "command_id": "c0", "sent_at": 1.0}])
    return path


def test_damaged_journals_and_files_are_named_and_the_rest_carries_on(tmp_path: Path) -> None:
    path = journal_rollout(tmp_path)
    with open(path.with_suffix(".journal"), "ab") as journal:
        journal.write(os.urandom(300).replace(b"\n", b"") + b"\n")  # random bytes
        journal.write(b'{"target": "d1", "state": 5}\n{"target": "nobody"}\n[1, 2]\n{"wave": "x"}\n')
        journal.write(b"[" * 100_000 + b"\n")  # nested past the parser's recursion limit
        journal.write(b'{"note": "' + b"x" * (3 << 20) + b'"}\n')  # past the line limit: skipped, never held
        journal.write(b'{"target": "d1", "state": "sent", "command_id": "c1", "sent_at": 2.0}\n')
        journal.write(b'{"target": "d1", "state": "succ')  # torn by a crash
    loaded = Rollout.load(path)
    assert loaded.targets[0].state == "sent" and loaded.targets[1].command_id == "c1"
    assert loaded.log[-1].endswith("journal: 7 damaged lines skipped")
    (tmp_path / "rollouts" / "00000000-empty.json").write_bytes(b"")
    (tmp_path / "rollouts" / "00000001-list.json").write_text("[1, 2, 3]")
    (tmp_path / "rollouts" / "00000002-deep.json").write_bytes(b'{"a": ' * 100_000)
    rollouts, problems = list_rollouts(tmp_path)
    assert [r.id for r in rollouts] == [loaded.id]
    unread = ["00000000-empty.json", "00000001-list.json", "00000002-deep.json"]
    assert sorted(p.split(" ")[0] for p in problems) == unread
    with pytest.raises(RolloutFileError, match="00000000-empty.json cannot be read"):
        Rollout.load(tmp_path / "rollouts" / "00000000-empty.json")
    done = subprocess.run([sys.executable, "-m", "fleet.cli", "history", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "skipped 00000000-empty.json cannot be read" in done.stdout
    assert loaded.id in done.stdout


def test_a_torn_tail_is_cut_before_the_next_append(tmp_path: Path) -> None:
    path = journal_rollout(tmp_path)
    with open(path.with_suffix(".journal"), "ab") as journal:
        journal.write(b'{"target": "d1", "sta' + b"x" * 200_000)  # longer than the block read back from the end
    repair_journal(path.with_suffix(".journal"))
    Rollout.load(path).append(tmp_path, [{"target": "d1", "state": "failed", "detail": "x"}])
    loaded = Rollout.load(path)
    assert loaded.targets[1].state == "failed" and not any("damaged" in line for line in loaded.log)


def forger(port: int, name: str, stop: threading.Event) -> None:
    """A hostile device: sees every command (no ACL here) and answers each on its own topics, in the name of
    the command's device; floods; sends statuses no agent sends."""

    def run() -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{name}", protocol=mqtt.MQTTv5)
        seen: list[tuple[str, dict]] = []
        client.on_message = lambda c, u, m: seen.append((m.topic, json.loads(m.payload)))
        client.connect("127.0.0.1", port)
        client.subscribe("edgevit/+/cmd", 1)
        client.loop_start()
        garbage = [
            {"state": "online", "labels": {"site": "lab"}, "engine": {"active": NASTY, "bad": 5}},
            {"state": "online", "labels": {"site": "lab"}, "engine": {"active": [1], "canary": {"x": 1}}},
            {"state": "online", "labels": {"site": "lab"}, "engine": 7, "fps": "fast", "last_event": [NASTY]},
        ]
        i = 0
        while not stop.wait(0.05):
            client.publish(f"edgevit/{name}/status", json.dumps(garbage[i % 3]), qos=1, retain=True)
            client.publish(f"edgevit/{name}/events", json.dumps({"command_id": f"flood-{i}", "event": "commit"}))
            client.publish(f"edgevit/{name}/events", json.dumps({"event": None, "command_id": 5}))
            client.publish(f"edgevit/{name}/reply", b"\xff\xfe")
            for topic, command in seen[:]:
                victim_says = {"command_id": command.get("id"), "bundle_id": "new"}
                kind = "commit" if i % 2 else "revert"
                client.publish(f"edgevit/{name}/events", json.dumps({"event": kind, "reason": NASTY, **victim_says}))
                client.publish(f"edgevit/{name}/reply", json.dumps({"id": command.get("id"), "ok": False,
                                                                     "error": NASTY}))  # fmt: skip
                seen.remove((topic, command))
            i += 1
        client.loop_stop()
        client.disconnect()

    threading.Thread(target=run, daemon=True).start()


def test_a_rollout_with_a_tenth_of_the_devices_hostile_keeps_every_honest_outcome_true(
    mosquitto: int, tmp_path: Path
) -> None:
    honest = [SimulatedDevice(mosquitto, f"d{i:02d}") for i in range(16)]
    dead, liar = SimulatedDevice(mosquitto, "d16", "dead"), SimulatedDevice(mosquitto, "d17", "liar")
    stop = threading.Event()
    for name in ("h18", "h19"):
        forger(mosquitto, name, stop)
    time.sleep(1)
    link = FleetLink(Broker("127.0.0.1", mosquitto)).connect()
    lines: list[str] = []
    held: list[int] = []
    sampling = threading.Event()

    def sample() -> None:  # what the link holds while the forgers flood it
        while not sampling.wait(0.05):
            held.append(len(link.events) + len(link.replies))

    threading.Thread(target=sample, daemon=True).start()
    try:
        rollout = Rollout.new("new", {"url": "u"}, {"site": "lab"}, max_failures_pct=30, timeout_s=8,
                              rollback_on_halt=True)  # fmt: skip
        runner = Runner(rollout, link, tmp_path, lines.append)
        runner.plan("4", "100%")
        done = runner.run()
    finally:
        sampling.set()
        stop.set()
        link.close()
        for device in [*honest, dead, liar]:
            device.close()
    outcome = {t.device: (t.state, t.detail) for t in done.targets}
    assert done.state == "completed", "\n".join(lines)
    assert all(outcome[d.name][0] == TargetState.SUCCEEDED for d in honest), outcome
    assert outcome["d16"] == (TargetState.FAILED, "no outcome within --timeout 8 s (it never answered the command)")
    assert outcome["d17"][0] == TargetState.FAILED, "a status that claims the bundle is not an answer"
    assert all(outcome[h][0] in (TargetState.SUCCEEDED, TargetState.FAILED) for h in ("h18", "h19")), (
        "its own outcome is its own to claim"
    )
    assert held and max(held) <= 2 * 20, "answers to commands not in flight, floods included, are not kept"
    assert all(d.commands and len({c["id"] for c in d.commands}) == 1 for d in honest)


def archive(tmp_path: Path) -> Path:
    """A bundle archive as far as the controller reads one: a manifest naming the bundle 'new'."""
    path = tmp_path / "new.tar.gz"
    data = json.dumps({"bundle_id": "new"}).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("bundle/manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def fleet_cli(port: int, state: Path, *args: str, env: dict | None = None, **popen) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "fleet.cli", args[0], "--port", str(port), "--state-dir", str(state), *args[1:]]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **popen)  # fmt: skip


@pytest.mark.parametrize("step", FLEET_STEPS)
def test_a_controller_killed_at_each_journal_step_resumes_to_the_truth(mosquitto: int, tmp_path: Path, step: str):
    devices = [SimulatedDevice(mosquitto, f"d{i}") for i in range(4)]
    try:
        deploy = ["deploy", str(archive(tmp_path)), "--url", "http://x/new.tar.gz", "--canary", "1", "--step", "3",
                  "--timeout", "30"]  # fmt: skip
        killed = fleet_cli(mosquitto, tmp_path / "state", *deploy, env={"EDGEVIT_FAILPOINT": step})
        out, err = killed.communicate(timeout=120)
        assert killed.returncode == -signal.SIGKILL, out + err
        resumed = fleet_cli(mosquitto, tmp_path / "state", "resume")
        out, err = resumed.communicate(timeout=120)
        assert resumed.returncode == 0, out + err
        assert "completed: 4 devices run new" in out and "Traceback" not in err
    finally:
        for device in devices:
            device.close()
    for device in devices:
        ids = {c["id"] for c in device.commands}
        assert len(ids) == 1, f"{device.name} was sent one command, perhaps twice: {device.commands}"


def test_a_resumed_controller_pools_the_verdicts_it_read_before_it_was_killed(mosquitto: int, tmp_path: Path) -> None:
    """The devices' commit events are sent once: the controller, killed once every outcome of the wave is
    journaled and before it weighs the wave, pools their evidence after resuming, and halts on the
    regression that only the pooled test finds. The journal's verdicts are read back as hostile input."""
    rng = np.random.default_rng(7)
    devices = [SimulatedDevice(mosquitto, f"d{i:02d}", pool=blocks(rng, 0.966)) for i in range(10)]
    state = tmp_path / "state"
    try:
        deploy = ["deploy", str(archive(tmp_path)), "--url", "http://x/new.tar.gz", "--canary", "10", "--step", "100%",
                  "--timeout", "30"]  # fmt: skip
        killed = fleet_cli(mosquitto, state, *deploy, env={"EDGEVIT_FAILPOINT": "outcomes-journaled"})
        out, err = killed.communicate(timeout=120)
        assert killed.returncode == -signal.SIGKILL and "pooled" not in out, out + err
        journal = next((state / "rollouts").glob("*.journal"))
        with open(journal, "a", encoding="utf-8") as damage:  # a verdict of the wrong shape is not replayed
            damage.write(json.dumps({"target": "d00", "verdict": {"event": "deploy"}}) + "\n")
        resumed = fleet_cli(mosquitto, state, "resume")
        out, err = resumed.communicate(timeout=120)
    finally:
        for device in devices:
            device.close()
    assert "no canary verdict" not in out, out + err
    assert "wave 0: pooled canary evidence, 1500 blocks" in out and "a regression at alpha 0.01" in out, out + err
    assert "halted after wave 0: the devices' pooled canary evidence shows a regression" in out
    log = json.loads(next((state / "rollouts").glob("*.json")).read_text())["log"]
    assert any(line.endswith(".journal: 1 damaged lines skipped") for line in log), log


def test_one_driver_per_device(mosquitto: int, tmp_path: Path) -> None:
    devices = [SimulatedDevice(mosquitto, f"d{i}", commit_after_s=6) for i in range(3)]
    state = tmp_path / "state"
    deploy = ["deploy", str(archive(tmp_path)), "--url", "http://x/new.tar.gz", "--canary", "1", "--step", "2"]
    try:
        first = fleet_cli(mosquitto, state, *deploy)
        assert first.stdout is not None
        for line in first.stdout:
            if "deploy sent to d0" in line:
                break
        second = fleet_cli(mosquitto, state, *deploy, "--select", "device=d2")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "refused: d2 belong to rollout" in err and "its controller is running" in err
        third = fleet_cli(mosquitto, state, "resume")
        _, err = third.communicate(timeout=60)
        assert third.returncode == 2 and "is driven by a running controller" in err
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, out + err
    finally:
        for device in devices:
            device.close()
    assert all(len(d.commands) == 1 for d in devices), "each device was driven by one controller"


@pytest.mark.integration  # its own brokers, one killed mid-wave
def test_a_lost_broker_interrupts_the_rollout_cleanly_and_it_resumes(tmp_path: Path) -> None:
    from agent_helpers import start_mosquitto

    from conftest import free_port

    port = free_port()
    broker = start_mosquitto(tmp_path / "b1", port)
    dead = SimulatedDevice(port, "d0", "dead")
    link = FleetLink(Broker("127.0.0.1", port)).connect()
    rollout = Rollout.new("new", {"url": "u"}, {}, max_failures_pct=0, timeout_s=120, rollback_on_halt=True)
    runner = Runner(rollout, link, tmp_path, print, broker_grace_s=2)
    runner.plan("1", "1")
    threading.Timer(1.0, broker.kill).start()
    started = time.monotonic()
    done = runner.run()
    link.close()
    dead.client.loop_stop()
    assert done.state == "interrupted" and time.monotonic() - started < 30
    assert Rollout.load(tmp_path / "rollouts" / f"{rollout.id}.json").state == "interrupted"
    broker = start_mosquitto(tmp_path / "b2", port)
    try:
        honest = SimulatedDevice(port, "d0")
        link = FleetLink(Broker("127.0.0.1", port)).connect()
        resumed = Runner(Rollout.load(tmp_path / "rollouts" / f"{rollout.id}.json"), link, tmp_path, print).run()
        link.close()
        honest.close()
    finally:
        broker.terminate()
    assert resumed.state == "completed" and resumed.targets[0].state == TargetState.SUCCEEDED


def test_a_halt_whose_rollbacks_are_refused_is_not_recorded_as_rolled_back(mosquitto: int, tmp_path: Path) -> None:
    devices = [SimulatedDevice(mosquitto, "d0", "refuses_rollback"), SimulatedDevice(mosquitto, "d1", "dead")]
    done, lines = run_rollout(mosquitto, tmp_path, devices, "2", "1", timeout_s=4)
    assert done.state == "halted", lines
    assert "d0: rollback refused: there is no previous engine" in lines
    assert "1 of 1 updated devices could not be rolled back" in lines


def test_a_hostile_device_cannot_end_the_fleet_link(mosquitto: int) -> None:
    """What devices publish is read with limits and type checks: deep JSON, huge numbers, an unhashable
    command id. The link keeps reading, and a real status after them is seen."""
    link = FleetLink(Broker("127.0.0.1", mosquitto)).connect(settle_s=0.2)
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="evil-box")
    device.connect("127.0.0.1", mosquitto)
    device.loop_start()
    try:
        hostile = [
            ("edgevit/evil-box/status", b"[" * 50_000 + b"]" * 50_000),
            ("edgevit/evil-box/status", b'{"n": ' + b"9" * 20_000 + b"}"),
            ("edgevit/evil-box/events", json.dumps({"event": "deploy", "command_id": [1, 2]}).encode()),
            ("edgevit/evil-box/reply", json.dumps({"id": {"a": 1}, "ok": True}).encode()),
            ("edgevit/evil-box/status", b"\xff\xfe"),
        ]
        for topic, payload in hostile:
            device.publish(topic, payload, qos=1).wait_for_publish(5)
        device.publish("edgevit/good-box/status", json.dumps({"state": "online"}).encode(), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while "good-box" not in link.snapshot() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert link.snapshot()["good-box"].status.state == "online"
        assert "evil-box" not in link.snapshot()
    finally:
        device.loop_stop()
        device.disconnect()
        link.close()
