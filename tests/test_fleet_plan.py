"""Rollout planning and the fleet tool's input checks, without a broker."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import AgentConfig, CameraConfig, MQTTConfig
from agent.control.commands import MAX_COMMAND_BYTES
from builder.bundle.pack import pack_bundle
from fleet.cli import main
from fleet.commands import FleetError, bundle_reference
from fleet.link import Device
from fleet.protocol import AWS_MAX_PAYLOAD_BYTES, AWS_MAX_TOPIC_BYTES, AWS_MAX_TOPIC_SLASHES
from fleet.records import Status
from fleet.rollout import Rollout, Target, parse_count, parse_selector, plan_waves, selects


def test_waves_canary_first_then_steps() -> None:
    devices = [f"d{i}" for i in range(10)]
    assert plan_waves(devices, "1", "25%") == [["d0"], ["d1", "d2", "d3"], ["d4", "d5", "d6"], ["d7", "d8", "d9"]]
    assert plan_waves(devices, "20%", "100%") == [["d0", "d1"], devices[2:]]
    assert plan_waves(devices[:1], "5%", "10%") == [["d0"]]
    assert parse_count("0.1%", 3) == 1, "a wave has at least one device"


def test_selectors() -> None:
    device = Device("cam-7", Status.of({"labels": {"site": "lab", "hardware": "orin"}}))
    assert selects(parse_selector("site=lab,hardware=orin"), device) and selects({}, device)
    assert selects(parse_selector("device=cam-7"), device) and not selects(parse_selector("site=dock"), device)
    with pytest.raises(ValueError, match="key=value"):
        parse_selector("site")


def test_topics_and_payloads_fit_managed_brokers() -> None:
    """The longest names the agent's config accepts still make topics AWS IoT Core takes."""
    prefix, device, camera = "p" * 32, "d" * 64, "c" * 64
    MQTTConfig(host="h", prefix=prefix)
    CameraConfig(name=camera, source=0)
    for too_long in (
        lambda: MQTTConfig(host="h", prefix=prefix + "p"),
        lambda: CameraConfig(name=camera + "c", source=0),
    ):
        with pytest.raises(ValidationError):
            too_long()
    assert AgentConfig.model_fields["device"].metadata[0].pattern == r"^[A-Za-z0-9_-]{1,64}$"
    topic = f"{prefix}/{device}/{camera}/result"
    assert len(topic.encode()) <= AWS_MAX_TOPIC_BYTES and topic.count("/") <= AWS_MAX_TOPIC_SLASHES
    assert MAX_COMMAND_BYTES <= AWS_MAX_PAYLOAD_BYTES


def test_rollout_state_round_trips(tmp_path: Path) -> None:
    rollout = Rollout.new("b", {"url": "u"}, {"site": "a"}, max_failures_pct=10, timeout_s=60, rollback_on_halt=True)
    rollout.targets = [Target("d1", 0, "sent", "old", "c1", 1.0)]
    assert Rollout.load(rollout.save(tmp_path)) == rollout


def test_rollout_journal_replays_changes_and_survives_a_torn_line(tmp_path: Path) -> None:
    """Between full saves only changes are appended; a crash mid-write loses at most the line being written."""
    rollout = Rollout.new("b2", {"url": "u"}, {}, max_failures_pct=0, timeout_s=60, rollback_on_halt=True)
    rollout.targets = [Target(f"d{i}", i // 2) for i in range(4)]
    path = rollout.save(tmp_path)
    size = path.stat().st_size
    rollout.append(tmp_path, [
        {"target": "d0", "wave": 0, "state": "sent", "before": "b1", "command_id": "c0", "sent_at": 1.0, "detail": ""},
        {"note": "12:00:00 wave 0: deploy sent to d0"},
        {"target": "d0", "wave": 0, "state": "succeeded", "before": "b1", "command_id": "c0", "sent_at": 1.0,
         "detail": "committed after its canary window"},
        {"wave": 1},
    ])  # fmt: skip
    with open(path.with_suffix(".journal"), "a") as journal:
        journal.write('{"target": "d2", "state": "fai')  # the controller died here
    assert path.stat().st_size == size, "the full file is not rewritten for a change"
    loaded = Rollout.load(path)
    assert loaded.wave == 1 and loaded.targets[0].state == "succeeded" and loaded.targets[0].before == "b1"
    assert loaded.targets[2].state == "pending" and loaded.log == ["12:00:00 wave 0: deploy sent to d0"]
    loaded.save(tmp_path)  # compaction: the journal is folded in and removed
    assert not path.with_suffix(".journal").exists() and Rollout.load(path).targets[0].state == "succeeded"


def test_bundle_reference(demo_bundle: Path, tmp_path: Path) -> None:
    packed = pack_bundle(demo_bundle, tmp_path / "b.tar.gz", None)
    bundle_id, reference = bundle_reference(tmp_path / "b.tar.gz", "http://store/b.tar.gz")
    assert bundle_id == packed["bundle_id"] and reference == {
        "url": "http://store/b.tar.gz",
        "sha256": packed["sha256"],
        "size": packed["size"],
    }
    (tmp_path / "not.tar.gz").write_bytes(b"junk")
    with pytest.raises(FleetError, match="is not a bundle archive"):
        bundle_reference(tmp_path / "not.tar.gz", "http://x")
    for name, manifest in [("list", b"[1]"), ("deep", b"[" * 100_000), ("nameless", b'{"bundle_id": 5}')]:
        archive = tmp_path / f"{name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            member = tarfile.TarInfo("b/manifest.json")
            member.size = len(manifest)
            tar.addfile(member, io.BytesIO(manifest))
        with pytest.raises(FleetError, match="is not a bundle archive"):
            bundle_reference(archive, "http://x")


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.tar.gz").write_bytes(b"junk")
    assert main(["deploy", str(tmp_path / "x.tar.gz"), "--url", "http://x", "--state-dir", str(tmp_path)]) == 2
    assert "is not a bundle archive" in capsys.readouterr().err
    assert main(["resume", "--state-dir", str(tmp_path)]) == 2
    assert "no running or interrupted rollout" in capsys.readouterr().err
