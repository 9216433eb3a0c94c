"""Inference isolated in a worker process: same outputs, and a crash or hang costs a batch, not the agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from agent_helpers import read_results, rebundle, run_agent, summary, write_config
from engine_variants import hang_on_bright_frames

from agent.engine.bundle import Bundle, verify_bundle
from agent.engine.headroom import MemoryShortage, check_headroom, estimated_need_mib
from agent.engine.runtimes import EngineError, open_engine
from agent.engine.worker import BUFFER_PREFIX, WorkerEngine, WorkerSpec, remove_stale_buffers
from agent.stream.pipeline import Serving


def _spec(bundle: Bundle, engine_path: Path | None = None) -> WorkerSpec:
    return WorkerSpec.of(bundle, bundle.target, 1, engine_path)


@pytest.fixture(scope="module")
def bundle(demo_bundle: Path) -> Bundle:
    return verify_bundle(demo_bundle, None)


def test_worker_matches_the_engine_in_process(bundle: Bundle) -> None:
    with np.load(bundle.golden_path) as golden:
        images = golden["images"]
    local = open_engine(bundle.backend, bundle.target, bundle.engine_path, bundle.batch_range[1], 1)
    worker = WorkerEngine(_spec(bundle))
    try:
        np.testing.assert_array_equal(worker.run(images[:3]), local.run(images[:3]))
        np.testing.assert_array_equal(worker.run(images), local.run(images))
    finally:
        worker.close()
        local.close()


def test_a_killed_worker_fails_its_batches_in_flight_then_restarts(bundle: Bundle, tmp_path: Path) -> None:
    """Killed mid-batch: that batch and the one queued behind it fail, and the next gets a fresh worker."""
    hanging = hang_on_bright_frames(bundle.engine_path, tmp_path / "hangs.onnx")
    worker = WorkerEngine(_spec(bundle, hanging), timeout_s=60)
    white = np.full((1, worker.spec.height, worker.spec.width, 3), 255, np.uint8)
    try:
        expected = worker.run(white * 0)
        hung, queued = worker.submit(white), worker.submit(white * 0)
        time.sleep(0.5)  # the white frame is in the worker now
        os.kill(worker.pid, signal.SIGKILL)
        for ticket in (hung, queued):
            with pytest.raises(EngineError, match=r"engine worker died \(exit -9\)"):
                worker.collect(ticket)
        np.testing.assert_array_equal(worker.run(white * 0), expected)
        assert worker.restarts == 1
    finally:
        worker.close()


def test_a_worker_killed_while_idle_costs_no_batch(bundle: Bundle) -> None:
    """Its death is seen when it happens, not by the next batch: that batch goes to a fresh worker."""
    with np.load(bundle.golden_path) as golden:
        images = golden["images"][:2]
    worker = WorkerEngine(_spec(bundle))
    try:
        expected = worker.run(images)
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while worker.pid is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.pid is None
        np.testing.assert_array_equal(worker.run(images), expected)
        assert worker.restarts == 1
    finally:
        worker.close()


def test_batches_queue_in_the_worker_and_end_in_order(bundle: Bundle) -> None:
    """The pipeline submits the next batch while one runs: each ticket gets its own batch's logits,
    and the time the worker measured is the engine's alone, not the wait behind the batch before."""
    with np.load(bundle.golden_path) as golden:
        images = golden["images"]
    worker = WorkerEngine(_spec(bundle))
    ended: list[int] = []
    try:
        expected = [worker.run(images[i : i + 2]) for i in range(0, 6, 2)]
        tickets = [worker.submit(images[i : i + 2], lambda i=i: ended.append(i)) for i in range(0, 6, 2)]
        for ticket, logits in reversed(list(zip(tickets, expected, strict=True))):  # any order of collecting
            np.testing.assert_array_equal(worker.collect(ticket), logits)
            assert 0 < ticket.seconds < time.monotonic() - ticket.submitted
        assert ended == [0, 2, 4]
    finally:
        worker.close()


def test_exclusive_waits_for_batches_in_flight_and_holds_off_other_threads(bundle: Bundle) -> None:
    """The pre-swap latency comparison times the serving engine alone: what was queued ends first, and
    the inference thread's next submit waits until the block is over."""
    with np.load(bundle.golden_path) as golden:
        images = golden["images"][:2]
    worker = WorkerEngine(_spec(bundle))
    try:
        queued = [worker.submit(images), worker.submit(images)]
        later: list[float] = []
        with worker.exclusive():
            assert all(t.done.is_set() for t in queued)
            other = threading.Thread(target=lambda: later.append(worker.submit(images).submitted))
            other.start()
            other.join(0.3)
            assert other.is_alive() and not later  # waiting for the block
            inside = time.monotonic()
            worker.run(images)
        other.join(10)
        assert later and later[0] > inside
        for ticket in queued:
            worker.collect(ticket)
    finally:
        worker.close()


def test_a_hung_batch_times_out_and_the_worker_is_replaced(bundle: Bundle, tmp_path: Path) -> None:
    hanging = hang_on_bright_frames(bundle.engine_path, tmp_path / "hangs.onnx")
    worker = WorkerEngine(_spec(bundle, hanging), timeout_s=1.0)
    try:
        white = np.full((1, worker.spec.height, worker.spec.width, 3), 255, np.uint8)
        with pytest.raises(EngineError, match="did not finish within 1 s"):
            worker.run(white)
        assert worker.run(white * 0).shape == (1, len(bundle.labels))
    finally:
        worker.close()


def test_an_engine_that_cannot_load_is_reported(bundle: Bundle, tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(EngineError, match="ONNX Runtime cannot load"):
        WorkerEngine(_spec(bundle, tmp_path / "broken.onnx"))


def test_agent_keeps_serving_through_hung_batches(demo_bundle, signing_key, tmp_path: Path) -> None:
    """Digits, then white frames that hang the engine, then digits: the hung batches are counted as
    failed, the worker is replaced, and the digits after them are classified."""
    from test_systemd import digits_then_white

    video = digits_then_white(tmp_path / "mixed.mp4", digits=30, white=10)
    tail = digits_then_white(tmp_path / "tail.mp4", digits=90, white=0)
    engine = hang_on_bright_frames(verify_bundle(demo_bundle, None).engine_path, tmp_path / "hangs.onnx")
    hanging = rebundle(demo_bundle, tmp_path / "hanging", signing_key[0], "hangs-on-white", engine=engine)
    config = write_config(
        tmp_path / "agent.yaml",
        hanging,
        signing_key[1],
        [{"name": "cam", "source": str(video), "fps": 30}, {"name": "late", "source": str(tail), "fps": 10}],
        engine={
            "bundle": str(hanging),
            "trusted_keys": [str(signing_key[1])],
            "batch_timeout_s": 0.5,
        },
        exit_when_sources_end=True,
    )
    done = run_agent(config, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = summary(done.stdout)["cameras"]
    assert counts["cam"]["failed"] >= 1 and counts["late"]["processed"] >= 30
    assert "did not finish within 0.5 s" in done.stderr
    results = read_results(tmp_path / "results.jsonl")
    assert {r["camera"] for r in results} == {"cam", "late"} and summary(done.stdout)["engine"]["worker_restarts"] >= 1


def test_a_worker_over_its_memory_cap_is_replaced(bundle: Bundle) -> None:
    with np.load(bundle.golden_path) as golden:
        images = golden["images"][:2]
    worker = WorkerEngine(_spec(bundle), max_rss_mib=1)  # any ONNX Runtime process is bigger: "a leak"
    try:
        first = worker.run(images)
        assert worker.pid is None, "killed after the batch that found it over the cap"
        np.testing.assert_array_equal(worker.run(images), first)
        assert worker.restarts == 1
    finally:
        worker.close()


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a reaper (a container's PID 1 may never reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_hung_worker_exits_when_its_agent_is_killed(bundle: Bundle, tmp_path: Path) -> None:
    hanging = hang_on_bright_frames(bundle.engine_path, tmp_path / "hangs.onnx")
    spec = _spec(bundle, hanging)
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from agent.engine.worker import WorkerEngine, WorkerSpec\n"
        f"spec = WorkerSpec({spec.backend!r}, {spec.target!r}, Path({str(spec.engine_path)!r}), {spec.max_batch}, "
        f"{spec.height}, {spec.width}, {spec.classes}, 1)\n"
        "worker = WorkerEngine(spec, timeout_s=600)\n"
        "print(worker.pid, flush=True)\n"
        f"worker.run(np.full((1, {spec.height}, {spec.width}, 3), 255, np.uint8))  # never returns\n"
    )
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert agent.stdout is not None
    pid = int(agent.stdout.readline())
    time.sleep(1)  # the white frame is in the worker now
    assert _alive(pid)
    agent.kill()
    agent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), "the worker noticed its agent was gone, mid-batch"


def test_a_candidate_is_loaded_beside_the_serving_engine_only_with_headroom(bundle: Bundle) -> None:
    worker = WorkerEngine(_spec(bundle))
    try:
        serving = Serving.of(bundle, worker)
        need = estimated_need_mib(bundle, serving)
        rss = worker.rss_mib()
        assert rss is not None and need >= rss > bundle.engine_path.stat().st_size / 2**20
        # the same engine: its passport's figure, scaled by how this worker compares with it, is this worker
        assert bundle.passport["peak_rss_mib"] and need == pytest.approx(rss, rel=0.05)
        check_headroom(bundle, serving, 16)  # this machine has room for a second tiny engine
        total = psutil.virtual_memory().total / 2**20  # more than can ever stay available
        with pytest.raises(MemoryShortage, match=r"swap.min_free_mib [\d.]+ must stay free"):
            check_headroom(bundle, serving, total)
        check_headroom(bundle, serving, 0)  # 0 turns the check off
    finally:
        worker.close()


def test_stale_buffers_go_and_a_race_for_them_does_not_stop_an_agent(tmp_path: Path) -> None:
    """Agents starting together race for one killed agent's buffers (the fleet demo starts three): removing
    what another took first, or what cannot be removed, is not an error."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{BUFFER_PREFIX}{dead.stdout.strip()}-abc"
    (stale / "inputs").parent.mkdir()
    (stale / "inputs").write_bytes(b"x")
    stuck = tmp_path / f"{BUFFER_PREFIX}{dead.stdout.strip()}-def"
    (stuck / "a folder").mkdir(parents=True)  # unlink fails on it: left for the operator, the agent starts
    live = tmp_path / f"{BUFFER_PREFIX}{os.getpid()}-ghi"
    live.mkdir()
    remove_stale_buffers(tmp_path)
    assert not stale.exists() and stuck.exists() and live.exists()
    remove_stale_buffers(tmp_path)  # again, as the second of two agents finds them gone


class _Collected:
    """A result sink that keeps what it was handed."""

    def __init__(self) -> None:
        self.results: list[dict] = []

    def emit(self, results: list[dict]) -> None:
        self.results.extend(results)

    def close(self) -> None:
        pass


def test_the_pipeline_fills_the_next_batch_while_one_runs(
    demo_bundle: Path, bundle: Bundle, signing_key, tmp_path: Path
) -> None:
    """A batch's results are handed on after the next batch is submitted, so the worker never waits for the
    agent; each frame's result is its own, in order."""
    from agent.config import load_config
    from agent.stream.frames import FrameInfo
    from agent.stream.pipeline import Pipeline

    cameras = [{"name": name, "source": "rtsp://127.0.0.1:1/none"} for name in ("a", "b")]
    batching = {"mode": "fixed", "fixed_batch": 2}  # no camera connects here: adaptive would run single frames
    config = load_config(write_config(tmp_path / "agent.yaml", demo_bundle, signing_key[1], cameras, batching=batching))
    with np.load(bundle.golden_path) as golden:
        images, expected = golden["images"][:6], golden["reference"][:6].argmax(axis=1)
    worker = WorkerEngine(_spec(bundle))
    sink = _Collected()
    pipeline = Pipeline(config, Serving.of(bundle, worker), [sink], lambda *_: None)  # not started: no cameras
    try:

        def put(i: int) -> None:
            now = time.monotonic()
            pipeline.queue.put(FrameInfo("ab"[i % 2], i, time.time(), now), images[i])

        put(0), put(1)
        pipeline._step(timeout=1)
        assert not sink.results and worker._in_flight  # submitted, not waited for
        for i in range(2, 6, 2):
            put(i), put(i + 1)
            pipeline._step(timeout=1)
            assert [r["seq"] for r in sink.results] == list(range(i))  # the batch before, handed on
        pipeline._step(timeout=0)  # no frame waiting: the batch in flight is handed on
        assert [r["seq"] for r in sink.results] == list(range(6))
        assert [r["top"][0]["label"] for r in sink.results] == [bundle.labels[i] for i in expected]
    finally:
        worker.close()
