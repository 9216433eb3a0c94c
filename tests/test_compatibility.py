"""Adjacent versions meet in the field: a fleet is updated in waves, so the controller reads agents of the
previous MQTT protocol, and an agent meets bundles of other schemas. The recorded documents below are what
protocol-1 agents published (the simulated devices in tests/fleet_devices.py speak protocol 1 too, so every
rollout test drives the current controller against it)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from agent.control.protocol import PROTOCOL_VERSION
from agent.engine.bundle import OLDEST_SCHEMA, SCHEMA_VERSION, BundleError, validate_manifest
from fleet.commands import _table
from fleet.link import Device
from fleet.records import Event, Reply, Status

PROTOCOL_1_STATUS = {
    "state": "online",
    "device": "lab-1",
    "labels": {"site": "lab"},
    "engine": {"active": "vit-digits-1-cpu-int8-509f7f60", "previous": None, "canary": None, "bad": []},
    "fps": 29.8,
    "p99_ms": 41.2,
    "drift": {"class_mix_distance": 0.04, "confidence_drift": 0.01},
    "last_event": {"event": "commit", "at": 1764700000.0, "bundle_id": "vit-digits-1-cpu-int8-509f7f60",
                   "command_id": "r1-abc", "ok": True},
    "last_canary": {"bundle_id": "vit-digits-1-cpu-int8-509f7f60", "verdict": "commit", "agreement": 0.993},
    "updated": 1764700001.5,
}  # fmt: skip


def test_the_fleet_reads_a_protocol_1_status_reply_and_event() -> None:
    status = Status.of(PROTOCOL_1_STATUS)
    assert status.protocol == 1 and status.state == "online" and status.labels == {"site": "lab"}
    assert status.engine.active == "vit-digits-1-cpu-int8-509f7f60" and status.fps == 29.8
    row = Device("lab-1", status).row()
    assert row["protocol"] == 1 and row["canary_verdict"] == "commit" and row["last_event"].startswith("commit ")
    reply = Reply.of("lab-1", {"id": "r1-abc", "ok": False, "error": "busy: a deploy is in progress"})
    assert reply is not None and not reply.ok and reply.error == "busy: a deploy is in progress"
    event = Event.of("lab-1", {"event": "revert", "command_id": "r1-abc", "ok": False, "reason": "agreement"})
    assert event is not None and event.kind == "revert" and event.reason == "agreement"


@pytest.mark.parametrize("declared", [None, "2", True, 0, -1, 10**9])
def test_an_absent_or_unreadable_protocol_is_read_as_1(declared: object) -> None:
    assert Status.of({**PROTOCOL_1_STATUS, "protocol": declared}).protocol == 1


def test_a_device_of_a_newer_protocol_is_shown_and_named() -> None:
    newer = Device("lab-2", Status.of({**PROTOCOL_1_STATUS, "protocol": PROTOCOL_VERSION + 1}))
    current = Device("lab-3", Status.of({**PROTOCOL_1_STATUS, "protocol": PROTOCOL_VERSION}))
    out = io.StringIO()
    Console(file=out, width=80).print(_table([newer.row(), current.row()]))
    assert out.getvalue().count("update edgevit-fleet") == 1 and f"protocol {PROTOCOL_VERSION + 1}" in out.getvalue()


def test_the_agent_declares_its_protocol_in_every_status() -> None:
    from agent.config import MQTTConfig
    from agent.control.mqtt import MqttLink
    from agent.control.outbox import Outbox

    link = MqttLink(MQTTConfig(host="127.0.0.1"), "box", Outbox.__new__(Outbox), {"site": "lab"})
    link.update_status({"engine": {"active": "x"}})
    assert json.loads(json.dumps(link._status))["protocol"] == PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("schema", "message"),
    [(SCHEMA_VERSION + 1, "newer than this agent reads"), (OLDEST_SCHEMA - 1, "older than this agent reads")],
)
def test_a_bundle_of_another_schema_is_refused_saying_which_side_to_update(schema: int, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        validate_manifest({"schema": schema, "bundle_id": "x"})


SCHEMA_1_MANIFEST = {
    "schema": 1,
    "bundle_id": "vit-digits-1-cpu-int8-509f7f60",
    "engine": {"backend": "onnxruntime", "target": "cpu", "precision": "int8", "files": ["engine/model.onnx"],
               "batch": {"min": 1, "opt": 8, "max": 8}},
    "input": {"height": 64, "width": 64, "channels": "RGB", "layout": "NHWC", "dtype": "uint8",
              "resize": "stretch", "interpolation": "linear"},
    "requires": {},
    "files": {name: {} for name in ["engine/model.onnx", "labels.json", "passport.json", "golden.npz"]},
}  # fmt: skip


def test_this_agent_reads_schema_1_classifiers_and_schema_2_embedding_models() -> None:
    validate_manifest(SCHEMA_1_MANIFEST)
    embeddings = {"kind": "embeddings", "width": 64, "references": 10}
    schema_2 = {**SCHEMA_1_MANIFEST, "schema": 2, "output": embeddings}
    with pytest.raises(BundleError, match="manifest 'files' does not list references.npz"):
        validate_manifest(schema_2)
    validate_manifest({**schema_2, "files": {**SCHEMA_1_MANIFEST["files"], "references.npz": {}}})
    with pytest.raises(BundleError, match="an 'output' section, which needs schema 2"):
        validate_manifest({**SCHEMA_1_MANIFEST, "output": embeddings})
    with pytest.raises(BundleError, match="'output.kind' must be logits or embeddings"):
        validate_manifest({**schema_2, "output": {"kind": "\x1b[2Jpoison"}})
