"""The real agent process, standalone: labelled video in, per-frame results out, bad configs refused."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_helpers import read_results, run_agent, start_agent, stop_agent, summary, wait_for_result, write_config

from agent.engine.bundle import verify_bundle
from agent.engine.preprocess import preprocess_into
from agent.engine.runtimes import open_engine
from agent.engine.signing import load_public_key


def offline_predictions(video: Path, bundle_path: Path, public_key: Path) -> list[int]:
    """The bundle's engine on every decoded frame of the video, outside the agent."""
    bundle = verify_bundle(bundle_path, [load_public_key(public_key)])
    engine = open_engine(bundle.backend, bundle.target, bundle.engine_path, 1)
    capture, slot = cv2.VideoCapture(str(video)), np.empty((64, 64, 3), np.uint8)
    predictions = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return predictions
        predictions.append(int(engine.run(preprocess_into(frame, bundle.input_spec, slot)[None]).argmax()))


def test_labelled_video_end_to_end(demo_bundle: Path, signing_key, digits_video: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "agent.yaml",
        demo_bundle,
        signing_key[1],
        [{"name": "digits", "source": str(digits_video), "fps": 30}],
        exit_when_sources_end=True,
        metrics={"print_every_s": 0.5},
    )
    proc = run_agent(config)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " fps | p50 " in line]  # the live lines of standalone mode
    assert lines and all(len(line) < 80 for line in lines), lines
    results = read_results(tmp_path / "results.jsonl")
    labels = json.loads(digits_video.with_suffix(".json").read_text())["labels"]
    seqs = [r["seq"] for r in results]
    assert len(seqs) == len(set(seqs)) and set(seqs) <= set(range(1, len(labels) + 1))
    stats = summary(proc.stdout)["cameras"]["digits"]
    assert stats["state"] == "ended" and stats["taken"] == len(labels)
    assert stats["processed"] == len(results) == len(labels) - stats["skipped"] - stats["shed"]
    assert stats["decode_cpu_ms"] > 0 and stats["preprocess_ms"] > 0  # the camera side's cost per frame
    # the summary's rates cover the run (first frame to last result) and agree with the live lines
    assert stats["processed_fps"] <= stats["decoded_fps"] and 24 <= stats["decoded_fps"] <= 32  # played at 30 fps
    live = [float(m) for m in re.findall(r"^\s*([\d.]+) fps \|", proc.stdout, re.M)][1:-1]  # whole intervals
    assert live and abs(float(np.median(live)) - stats["processed_fps"]) <= 0.25 * stats["processed_fps"]
    assert len(results) >= 0.9 * len(labels)  # latest-frame-wins may skip a frame if the engine was busy
    expected = offline_predictions(digits_video, demo_bundle, signing_key[1])
    agent = {r["seq"]: int(r["top"][0]["label"]) for r in results}
    assert {s: expected[s - 1] for s in agent} == agent, "agent top-1 == engine top-1 on the same frames"
    assert np.mean([agent[s] == labels[s - 1] for s in agent]) >= 0.95
    drift = summary(proc.stdout)["drift"]  # held-out digits look like the evaluation set: little drift
    assert drift["frames"] == len(results) and drift["class_mix_distance"] < 0.2
    assert abs(drift["confidence_drift"]) < 0.1
    r = results[0]
    assert {"camera", "seq", "captured", "top", "engine", "latency_ms", "batch"} <= r.keys() and len(r["top"]) == 3


def test_sigterm_drains_and_flushes(demo_bundle: Path, signing_key, digits_video: Path, tmp_path: Path) -> None:
    cameras = [{"name": f"c{i}", "source": str(digits_video), "loop": True, "fps": 60} for i in range(2)]
    proc = start_agent(write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras))
    assert wait_for_result(tmp_path / "results.jsonl", lambda _: True, 60), "the agent served no frame in 60 s"
    time.sleep(1)
    stdout, stderr = stop_agent(proc)
    assert proc.returncode == 0, stderr
    results = read_results(tmp_path / "results.jsonl")  # every line parses: nothing half-written
    counts = summary(stdout)["cameras"]
    assert len(results) == sum(c["processed"] for c in counts.values()) > 0
    for name, c in counts.items():
        assert c["taken"] == c["processed"] + c["skipped"] + c["shed"] + c["failed"], name


def test_reload_applies_batching_without_restart(demo_bundle, signing_key, digits_video: Path, tmp_path: Path) -> None:
    cameras = [{"name": f"c{i}", "source": str(digits_video), "loop": True, "fps": 60} for i in range(3)]
    config = write_config(
        tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras, batching={"mode": "fixed", "fixed_batch": 1}
    )
    proc = start_agent(config)
    results = tmp_path / "results.jsonl"
    deadline = time.monotonic() + 60  # a loaded runner can take seconds to start serving
    while time.monotonic() < deadline and (not results.exists() or results.read_text().count("\n") < 20):
        time.sleep(0.2)
    write_config(
        config,
        demo_bundle,
        signing_key[1],
        cameras,
        batching={"mode": "fixed", "fixed_batch": 3, "latency_budget_ms": 400},
    )
    time.sleep(1.0)
    proc.send_signal(signal.SIGHUP)  # the file watcher has usually applied it already; SIGHUP is the other way in
    assert wait_for_result(results, lambda r: r["batch"] == 3, 60), "the new batch size never served"
    (tmp_path / "agent.yaml").write_text("device: [unclosed")  # a broken edit must not stop the agent
    time.sleep(1.5)
    assert proc.poll() is None
    stdout, stderr = stop_agent(proc)
    assert proc.returncode == 0, stderr
    sizes = [r["batch"] for r in read_results(tmp_path / "results.jsonl")]
    assert set(sizes[:20]) == {1} and max(sizes) == 3
    assert "reload refused, keeping the running configuration" in stderr


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(cameras=[]), "cameras: List should have at least 1 item"),
        (lambda c: c["cameras"][0].update(fps=-5), "cameras.0.fps: Input should be greater than or equal to 0"),
        (
            lambda c: c.update(batching={"latency_budget_ms": "fast"}),
            "batching.latency_budget_ms: Input should be a valid number",
        ),
        (lambda c: c.update(colour="blue"), "colour: Extra inputs are not permitted"),
        (lambda c: c["engine"].update(trusted_keys=[]), "engine: Value error, trusted_keys must list at least one"),
        (lambda c: c["engine"].update(bundle="/nonexistent"), "/nonexistent is not a bundle: manifest.json is missing"),
    ],
)
def test_bad_configs_are_refused(demo_bundle, signing_key, digits_video: Path, tmp_path: Path, edit, message) -> None:
    import yaml

    path = write_config(
        tmp_path / "agent.yaml", demo_bundle, signing_key[1], [{"name": "a", "source": str(digits_video)}]
    )
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    proc = run_agent(path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration  # a real agent process
def test_not_yaml(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text("device: [unclosed")
    proc = run_agent(tmp_path / "agent.yaml")
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr


def test_a_gstreamer_source_without_gstreamer_names_the_fix(demo_bundle, signing_key, tmp_path: Path) -> None:
    from agent.stream.camera import opencv_has_gstreamer

    camera = {"name": "csi", "source": "videotestsrc ! videoconvert ! appsink", "backend": "gstreamer"}
    path = write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], [camera])
    proc = run_agent(path, "--check")
    if opencv_has_gstreamer():  # JetPack's OpenCV: the pipeline is fine
        assert proc.returncode == 0, proc.stderr
    else:  # pip's OpenCV: refused at start, naming the fix
        assert proc.returncode == 2 and "this OpenCV" in proc.stderr and "built without GStreamer" in proc.stderr
        assert "--system-site-packages" in proc.stderr and "Traceback" not in proc.stderr


def test_check_mode(demo_bundle, signing_key, digits_video: Path, tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "agent.yaml", demo_bundle, signing_key[1], [{"name": "a", "source": str(digits_video)}]
    )
    proc = run_agent(path, "--check")
    assert proc.returncode == 0 and "golden set reproduced" in proc.stdout


@pytest.mark.parametrize("name", ["agent.yaml", "jetson.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name: str, monkeypatch) -> None:
    from agent.config import load_config

    for variable in ("GATE_PASSWORD", "YARD_PASSWORD"):  # the examples keep passwords in the environment
        monkeypatch.setenv(variable, "example")
    config = load_config(Path(__file__).parents[1] / "configs" / name)
    assert config.canary.max_restarts >= 0 and config.state_dir.name in ("edgevit", "state")


def test_a_swap_with_no_frames_coming_ends_when_the_agent_stops(
    demo_bundle, signing_key, digits_video: Path, tmp_path: Path
) -> None:
    """The gap to the new engine's first result is only measured: a stopping agent does not wait for it
    (with no frames coming it would wait out the whole swap timeout, past systemd's stop timeout)."""
    import threading

    from agent.config import load_config
    from agent.stream.pipeline import Pipeline, Serving

    config = load_config(
        write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], [{"name": "a", "source": str(digits_video)}])
    )
    bundle = verify_bundle(demo_bundle, [load_public_key(signing_key[1])])
    engine = open_engine(bundle.backend, bundle.target, bundle.engine_path, 1)
    pipeline = Pipeline(config, Serving.of(bundle, engine), [], lambda *_: None)  # not started: no frames
    stopping = threading.Event()
    threading.Timer(0.5, stopping.set).start()
    started = time.monotonic()
    swap = pipeline.swap(Serving.of(bundle, engine), stopping, timeout_s=60)
    assert time.monotonic() - started < 10 and swap["gap_ms"] is None
