"""Engine lifecycle through a real broker and a real agent: deploy, refuse, swap, canary, revert, rollback.

One agent serves two looping cameras for the whole module (starting one costs seconds); each test first
puts it on the engine it needs (``serving``), so the tests pass in any order and alone.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from agent_helpers import (
    NO_SWAP_LATENCY_GATE,
    Operator,
    blank_image_folder,
    device_over_mqtt,
    read_results,
    rebundle,
    start_agent,
    stop_agent,
)
from engine_variants import slow_down

from agent.engine.bundle import verify_bundle
from builder.bundle.build import build_engine_bundle
from builder.bundle.keys import keygen
from builder.bundle.options import EngineOptions
from builder.bundle.pack import pack_bundle
from builder.demo.train import CHECKPOINT_DIR
from builder.demo.variants import damaged_checkpoint, misdescribed_bundle
from builder.export.job import export_checkpoint
from fleet.serve import BundleServer

CANARY = {
    "window_s": 6,
    # a slow engine serves fewer frames: its window lasts until enough pairs are timed; and a damaged one
    # needs five blocks of evidence to be proven worse at alpha 0.005
    "min_frames": 120,
    "shadow_every": 1,
    "latency_every": 1,
    # one-second blocks: a damaged engine disagrees all the time, which the block rule reads as long runs
    # of correlated disagreement and answers with ever longer blocks (tested in test_canary_rules.py)
    "block_s": 1.0,
    "max_block_s": 1.0,
    "latency_quantile": 0.5,  # the median: a few pairs decide in a short window (p90 needs about a hundred)
    "max_latency_ratio": 2.0,
    "latency_slack_ms": 5.0,  # scheduling noise on a shared two-core machine; the slow bundle adds far more
}
# The pre-swap latency check is opened wide here so that it is the canary that catches the slow bundle.


@pytest.fixture(scope="module")
def bundles(demo_bundle: Path, demo_exports, signing_key, tmp_path_factory) -> dict[str, Path]:
    """The demo INT8 bundle's successors: good, slow, damaged, less accurate, and six that must be refused."""
    root = tmp_path_factory.mktemp("candidates")
    key = signing_key[0]
    # ONNX Runtime engines: the over-quantized one must stay over-quantized (NNCF would calibrate differently)
    fast = {"profile_seconds": 0.1, "calibration_images": 64, "runtime": "onnxruntime"}
    out = {
        "good": build_engine_bundle(
            demo_exports["vit-digits"], root / "fp32", key, EngineOptions(precision="fp32", **fast)
        ).path,
        "disagreeing": build_engine_bundle(
            demo_exports["vit-digits"],
            root / "over-quantized",
            key,
            EngineOptions(
                precision="int8",
                quantization="static",
                calib=str(blank_image_folder(root / "blank")),
                accept_accuracy_loss=True,
                name="vit-over-quantized",
                **fast,
            ),
        ).path,
    }
    damaged = damaged_checkpoint(CHECKPOINT_DIR / "vit-digits.npz", root / "damaged" / "vit-digits.npz", 1.0)
    damaged_model = export_checkpoint(damaged, root / "damaged-export").model_path
    out["damaged"] = misdescribed_bundle(out["good"], damaged_model, root / "damaged-bundle", key, "vit-damaged")
    engine = verify_bundle(demo_bundle, None).engine_path
    out["slow"] = rebundle(
        demo_bundle, root / "slow", key, "vit-slow", engine=slow_down(engine, root / "slow.onnx", matmuls=48)
    )  # ~35 ms: far past noise
    out["corrupted"] = Path(shutil.copytree(demo_bundle, root / "corrupted"))
    target = verify_bundle(out["corrupted"], None).engine_path
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    out["unsigned"] = Path(shutil.copytree(demo_bundle, root / "unsigned"))
    (out["unsigned"] / "manifest.sig").unlink()
    stranger, _, _ = keygen(root / "stranger-keys", "stranger")
    out["wrong-key"] = rebundle(demo_bundle, root / "wrong-key", stranger, "vit-stranger")
    out["incompatible"] = rebundle(
        demo_bundle,
        root / "incompatible",
        key,
        "vit-needs-cuda",
        manifest_changes={"requires": {"providers": ["CUDAExecutionProvider"]}},
    )
    out["traversal"] = root / "traversal.tar.gz"
    with tarfile.open(out["traversal"], "w:gz") as tar:
        tar.add(demo_bundle / "manifest.json", arcname="bundle/manifest.json")
        tar.add(demo_bundle / "manifest.json", arcname="../escaped.json")
    out["link"] = root / "link.tar"
    with tarfile.open(out["link"], "w") as tar:
        tar.add(demo_bundle / "manifest.json", arcname="manifest.json")
        link = tarfile.TarInfo("labels.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return out


@pytest.fixture(scope="module")
def device(tmp_path_factory, demo_bundle, signing_key, digits_video) -> Iterator[Operator]:
    folder = tmp_path_factory.mktemp("lifecycle")
    swap = NO_SWAP_LATENCY_GATE
    with device_over_mqtt(folder, demo_bundle, signing_key[1], digits_video, 15, canary=CANARY, swap=swap) as op:
        yield op


def serving(device: Operator, bundle: Path) -> str:
    """Put the device on ``bundle``'s engine, whatever an earlier test left (a canary included); its id.

    An installed bundle comes back by ``rollback``; another is deployed and committed."""
    wanted = verify_bundle(bundle, None).bundle_id
    if "canary" in status(device)["lifecycle"]:
        reset = f"reset-{time.monotonic_ns()}"
        assert device.send({"id": reset, "cmd": "rollback"})["ok"]
        device.wait_event("revert", rollback_command_id=reset)
    if status(device)["engine"] == wanted:
        return wanted
    reset = f"reset-{time.monotonic_ns()}"
    installed = {b["bundle_id"] for b in device.send({"id": f"{reset}-list", "cmd": "list"})["result"]["bundles"]}
    if wanted in installed:
        assert device.send({"id": reset, "cmd": "rollback", "bundle": wanted})["ok"]
        assert device.wait_event("rollback", command_id=reset)["ok"]
    else:
        deploy(device, reset, path=str(bundle))
        device.wait_event("commit", command_id=reset)
    return wanted


def status(device: Operator) -> dict:
    return device.send({"id": f"status-{time.monotonic_ns()}", "cmd": "status"})["result"]


def processed(device: Operator) -> int:
    return sum(c["counts"]["processed"] for c in status(device)["cameras"].values())


def deploy(device: Operator, command_id: str, **bundle: object) -> dict:
    reply = device.send({"id": command_id, "cmd": "deploy", "bundle": bundle})
    assert reply["ok"] and reply["result"]["accepted"], reply
    return reply


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("corrupted", r"does not match its sha256 in the manifest: the file was altered"),
        ("unsigned", r"is unsigned: manifest.sig is missing"),
        ("wrong-key", r"signed by key \w+, which is not trusted"),
        ("incompatible", r"cannot run on this device: it needs ONNX Runtime's CUDAExecutionProvider"),
        ("traversal", r"archive member '../escaped.json' points outside the bundle"),
        ("link", r"archive member 'labels.json' is a link \('/etc/passwd'\)"),
    ],
)
def test_bad_bundles_are_refused_while_the_engine_serves(device: Operator, bundles, variant: str, message: str):
    before, engine = processed(device), status(device)["engine"]
    deploy(device, f"bad-{variant}", path=str(bundles[variant]))
    event = device.wait_event("deploy", command_id=f"bad-{variant}")
    assert event["ok"] is False
    assert re.search(message, event["error"]), event["error"]
    time.sleep(0.5)
    now = status(device)
    assert now["engine"] == engine and processed(device) > before


def test_deploy_reference_is_validated(device: Operator) -> None:
    bad = device.send({"id": "ref-1", "cmd": "deploy", "bundle": {"path": "relative/folder"}})
    assert not bad["ok"] and "'bundle.path' must be an absolute path" in bad["error"]
    bad = device.send({"id": "ref-2", "cmd": "deploy", "bundle": {"url": "https://x/b.tgz", "sha256": "00", "size": 1}})
    assert not bad["ok"] and "'bundle.sha256' must be" in bad["error"]


def test_good_bundle_swaps_with_frames_flowing_then_commits(device: Operator, bundles, demo_bundle) -> None:
    old = serving(device, demo_bundle)
    new = verify_bundle(bundles["good"], None).bundle_id
    deploy(device, "good-1", path=str(bundles["good"]))
    verified = device.wait_event("verify", command_id="good-1")
    assert verified["golden"]["passed"] and verified["latency"]["pairs"] >= 1
    assert verified["latency"]["test"]["verdict"] in ("ok", "undecided"), verified["latency"]
    swap = device.wait_event("swap", command_id="good-1")
    assert swap["from"] == old and swap["to"] == new and swap["pause_ms"] >= 0
    assert status(device)["lifecycle"]["canary"]["bundle_id"] == new
    commit = device.wait_event("commit", command_id="good-1")
    figures, verdict = commit["figures"], commit["verdict"]
    assert figures["failed_batches"] == 0 and figures["shadow_frames"] > 0 and figures["latency_pairs"] > 0
    assert "golden set passed" in figures["golden"]
    agreement = verdict["rules"]["agreement"]  # the same checkpoint: its builds expect near-full agreement
    assert (
        agreement["verdict"] == "undecided"
        and 0.95 < agreement["limit"] < 1
        and "same checkpoint" in agreement["detail"]
    )
    assert verdict["alpha"] == 0.01 and verdict["judged_by"] == ["agreement", "latency", "failed_batches"]
    assert commit["pool"]["limit"] == pytest.approx(agreement["limit"]) and commit["pool"]["blocks"]
    lifecycle = status(device)["lifecycle"]
    assert lifecycle["active"] == new and lifecycle["previous"] == old and "canary" not in lifecycle
    results = read_results(device.folder / "results.jsonl")
    engines = [r["engine"] for r in results]
    assert old in engines and new in engines and engines.index(new) > engines.index(old)
    for camera in status(device)["cameras"].values():
        assert camera["counts"]["failed"] == 0, [e for e in device.events if e["event"] == "engine"]


def test_slower_bundle_is_reverted_in_its_canary_and_may_be_tried_again(device: Operator, bundles, demo_bundle) -> None:
    active = serving(device, demo_bundle)
    deploy(device, "slow-1", path=str(bundles["slow"]))
    device.wait_event("swap", command_id="slow-1")
    revert = device.wait_event("revert", command_id="slow-1")
    assert revert["rule"] == "latency" and revert["reason"].startswith("tail latency ") and not revert["refused_later"]
    latency = revert["verdict"]["rules"]["latency"]
    assert latency["verdict"] == "regression" and latency["estimate"] > CANARY["max_latency_ratio"]
    assert revert["restored"] == active and status(device)["engine"] == active
    listed = {b["bundle_id"]: b for b in device.send({"id": "list-slow", "cmd": "list"})["result"]["bundles"]}
    assert listed["vit-slow"]["bad"] == revert["reason"] and listed["vit-slow"]["refused_later"] is False
    deploy(device, "slow-2", path=str(bundles["slow"]))
    device.wait_event("swap", command_id="slow-2")  # a latency verdict does not refuse the bundle for good
    assert device.wait_event("revert", command_id="slow-2")["rule"] == "latency"


def test_damaged_bundle_is_reverted_in_its_canary_and_not_retried_unless_forced(
    device: Operator, bundles, demo_bundle
) -> None:
    """Its passport promises the good build's agreement; its engine computes something a few points worse."""
    active = serving(device, demo_bundle)
    deploy(device, "damaged-1", path=str(bundles["damaged"]))
    revert = device.wait_event("revert", command_id="damaged-1")
    assert revert["rule"] == "agreement" and revert["refused_later"]
    assert revert["reason"].startswith("top-1 agreement with the previous engine is ")
    evidence = revert["verdict"]["rules"]["agreement"]
    assert evidence["bound"] < evidence["limit"] and evidence["units"] >= 2 and evidence["alpha"] == 0.005
    assert status(device)["engine"] == active
    deploy(device, "damaged-2", path=str(bundles["damaged"]))
    event = device.wait_event("deploy", command_id="damaged-2")
    assert not event["ok"] and re.search(r"vit-damaged is marked bad \(top-1 agreement with", event["error"])
    assert "add force: true" in event["error"]


def test_a_known_less_accurate_bundle_is_refused_before_the_swap(device: Operator, bundles, demo_bundle) -> None:
    serving(device, demo_bundle)
    deploy(device, "over-1", path=str(bundles["disagreeing"]))
    event = device.wait_event("deploy", command_id="over-1")
    assert not event["ok"] and "points less accurate (top-1) than" in event["error"], event
    assert (
        "measured by both builds, on the same evaluation set" in event["error"] and "add force: true" in event["error"]
    )
    assert not [e for e in device.events if e["event"] == "swap" and e.get("command_id") == "over-1"]


def test_rollback_to_the_previous_engine(device: Operator, bundles, demo_bundle) -> None:
    serving(device, bundles["good"])
    serving(device, demo_bundle)  # by a rollback: the good engine is now the previous one
    before = status(device)["lifecycle"]
    reply = device.send({"id": "rb-1", "cmd": "rollback"})
    assert reply["ok"] and reply["result"]["to"] == before["previous"]
    event = device.wait_event("rollback", command_id="rb-1")
    assert event["ok"] and event["from"] == before["active"]
    after = status(device)["lifecycle"]
    assert after["active"] == before["previous"] and after["previous"] == before["active"]
    missing = device.send({"id": "rb-2", "cmd": "rollback", "bundle": "no-such-bundle"})
    assert not missing["ok"] and "no-such-bundle is not installed" in missing["error"]


def test_deploy_by_url_resumes_an_interrupted_download(device: Operator, bundles, demo_bundle, tmp_path: Path) -> None:
    serving(device, demo_bundle)
    reference = pack_bundle(bundles["good"], tmp_path / "served" / "good.tar.gz", None)
    with BundleServer(tmp_path / "served", drop_first_after=reference["size"] // 2) as server:
        deploy(device, "url-1", url=f"{server.url}/good.tar.gz", sha256=reference["sha256"], size=reference["size"])
        device.wait_event("swap", command_id="url-1")
        ranges = [r for r in server.requests if r.startswith("bytes=")]
    assert ranges and int(ranges[0][6:-1]) > 0, f"the second request resumed: {server.requests}"
    device.wait_event("commit", command_id="url-1")
    assert status(device)["engine"] == reference["bundle_id"]


def test_url_with_the_wrong_sha256_is_refused(device: Operator, bundles, tmp_path: Path) -> None:
    reference = pack_bundle(bundles["good"], tmp_path / "served" / "good.tar.gz", None)
    with BundleServer(tmp_path / "served") as server:
        deploy(device, "url-2", url=f"{server.url}/good.tar.gz", sha256="0" * 64, size=reference["size"])
        event = device.wait_event("deploy", command_id="url-2")
    assert not event["ok"] and f"sha256 is {reference['sha256']}, the command said 000" in event["error"]


def test_bundles_dropped_into_the_inbox(device: Operator, demo_bundle, bundles) -> None:
    """Needs the agent's inbox: a restart with engine.inbox set; also shows the store survives restarts."""
    serving(device, bundles["good"])
    folder: Path = device.folder
    config = yaml.safe_load((folder / "agent.yaml").read_text())
    config["engine"]["inbox"] = str(folder / "inbox")
    (folder / "agent.yaml").write_text(yaml.safe_dump(config))
    out, err = stop_agent(device.process)
    assert device.process.returncode == 0, err[-3000:]
    active = json.loads((folder / "state" / "engines.json").read_text())["active"]
    device.process = start_agent(folder / "agent.yaml")
    device.wait_serving()
    assert status(device)["engine"] == active, "the store's active engine, not engine.bundle, serves after a restart"
    inbox = folder / "inbox"
    pack_bundle(demo_bundle, inbox / ".incoming.tar.gz", None)
    (inbox / ".incoming.tar.gz").rename(inbox / "demo.tar.gz")
    shutil.copy(bundles["traversal"], inbox / "evil.tar.gz")
    swap = device.wait_event("swap", source=str(inbox / "demo.tar.gz"))
    assert swap["to"] == verify_bundle(demo_bundle, None).bundle_id
    refused = device.wait_event("deploy", source=str(inbox / "evil.tar.gz"))
    assert "points outside the bundle" in refused["error"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and {p.name for p in inbox.iterdir()} != {"rejected"}:
        time.sleep(0.2)
    assert {p.name for p in inbox.iterdir()} == {"rejected"}
    reason = (inbox / "rejected" / "evil.tar.gz.reason.txt").read_text()
    assert "points outside the bundle" in reason and (inbox / "rejected" / "evil.tar.gz").is_file()


def test_rollback_during_a_canary_reverts_it(device: Operator, bundles, demo_bundle) -> None:
    active = serving(device, demo_bundle)
    deploy(device, "cut-1", path=str(bundles["good"]))
    device.wait_event("swap", command_id="cut-1")
    reply = device.send({"id": "rb-cut", "cmd": "rollback"})
    assert reply["ok"] and reply["result"]["to"] == active
    revert = device.wait_event("revert", command_id="cut-1")
    assert revert["rollback_command_id"] == "rb-cut" and revert["restored"] == active
    assert revert["reason"] == "rolled back by command rb-cut" and status(device)["engine"] == active


def test_a_deploy_without_memory_headroom_is_refused_and_not_marked_bad(
    tmp_path: Path, demo_bundle, signing_key, digits_video, bundles
) -> None:
    # More than any machine has: no candidate may load beside the engine.
    swap = {**NO_SWAP_LATENCY_GATE, "min_free_mib": 2**20}  # 1 TiB, the most the setting allows
    with device_over_mqtt(tmp_path, demo_bundle, signing_key[1], digits_video, 15, canary=CANARY, swap=swap) as op:
        before, engine = processed(op), status(op)["engine"]
        deploy(op, "no-room", path=str(bundles["good"]))
        event = op.wait_event("deploy", command_id="no-room")
        assert event["ok"] is False and "not enough memory to load" in event["error"], event
        assert "swap.min_free_mib" in event["error"]
        time.sleep(0.5)
        now = status(op)
        assert now["engine"] == engine and processed(op) > before
        assert verify_bundle(bundles["good"], None).bundle_id not in now["lifecycle"]["bad"], "the bundle is fine"


def test_a_slower_bundle_is_refused_before_the_swap_by_the_default_gates(
    tmp_path: Path, demo_bundle, signing_key, digits_video, bundles
) -> None:
    """Timed back to back with the serving engine, the slow bundle is refused; slow here is not bad for good."""
    with device_over_mqtt(tmp_path, demo_bundle, signing_key[1], digits_video, 15, canary=CANARY) as op:
        engine = status(op)["engine"]
        deploy(op, "slow-at-swap", path=str(bundles["slow"]))
        event = op.wait_event("deploy", command_id="slow-at-swap")
        assert event["ok"] is False, event
        refusal = r"vit-slow is slower than the serving engine at batch \d+ here: p50 [\d.]+ ms against"
        assert re.search(refusal, event["error"]), event["error"]
        assert status(op)["engine"] == engine and "vit-slow" not in status(op)["lifecycle"]["bad"]
        assert not [e for e in op.events if e["event"] == "swap"], "it never went live"
