"""Jetson telemetry from recorded tegrastats output (tests/data/tegrastats.txt), replayed by a real process."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import pytest

from agent.engine import worker as worker_module
from agent.engine.bundle import verify_bundle
from agent.engine.jetson import TegraStats, jetson_summary, nvmap_mib, parse_tegrastats
from agent.engine.worker import WorkerEngine, WorkerSpec
from agent.stream.metrics import jetson_families

RECORDED = Path(__file__).parent / "data" / "tegrastats.txt"
LINES = [line for line in RECORDED.read_text().splitlines() if line and not line.startswith("#")]


def test_orin_nano_jetpack_6() -> None:
    stats = parse_tegrastats(LINES[0])
    assert stats["ram_used_mib"] == 2871 and stats["ram_total_mib"] == 7620 and stats["swap_used_mib"] == 0
    assert stats["gpu_load_pct"] == 61 and stats["emc_load_pct"] == 17
    assert stats["temperature_c"]["gpu"] == 51.281 and stats["temperature_c"]["tj"] == 52.5
    assert stats["power_mw"] == {"VDD_IN": 7120, "VDD_CPU_GPU_CV": 2360, "VDD_SOC": 1960}
    assert jetson_summary(stats) == {
        "gpu_load_pct": 61, "ram_used_mib": 2871, "temp_max_c": 52.5, "power_mw": 7120, "power_mode": None,
    }  # fmt: skip


def test_agx_orin_sensors_that_are_off_are_left_out() -> None:
    stats = parse_tegrastats(LINES[1])
    assert "gpu" not in stats["temperature_c"] and "cv0" not in stats["temperature_c"]
    assert stats["temperature_c"]["tboard"] == 32.0 and stats["gpu_load_pct"] == 0
    assert jetson_summary(stats)["power_mw"] == 4707  # VIN_SYS_5V0: this module's input rail


def test_older_jetpacks() -> None:
    xavier, nano = parse_tegrastats(LINES[2]), parse_tegrastats(LINES[3])
    assert (
        xavier["gpu_load_pct"] == 12 and xavier["power_mw"]["VDD_IN"] == 2763 and xavier["temperature_c"]["gpu"] == 45.5
    )
    assert nano["gpu_load_pct"] == 7 and nano["emc_load_pct"] == 0  # no @freq on JetPack 4
    assert nano["power_mw"] == {"POM_5V_IN": 2545, "POM_5V_GPU": 0, "POM_5V_CPU": 549} and nano["ram_used_mib"] == 1766
    assert parse_tegrastats("garbage") == {} and parse_tegrastats("") == {}


def test_metrics_families() -> None:
    families = {f.name: f for f in jetson_families(parse_tegrastats(LINES[0]), "15W")}
    assert families["edgevit_jetson_gpu_load_percent"].samples[0].value == 61
    assert {s.labels["rail"]: s.value for s in families["edgevit_jetson_power_milliwatts"].samples}["VDD_IN"] == 7120
    assert families["edgevit_jetson_power_mode"].samples[0].labels == {"mode": "15W"}


def test_tegrastats_process_is_read_and_restarted_when_it_exits() -> None:
    """A real child replays the recorded lines and exits, as a killed tegrastats would: it is started again."""
    replay = f"import sys; sys.stdout.write(open({str(RECORDED)!r}).read()); sys.stdout.flush()"
    stats = TegraStats(command=[sys.executable, "-c", replay]).start()
    try:
        deadline = time.monotonic() + 10
        while stats.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        snapshot = stats.snapshot()
        assert stats.restarts >= 1 and snapshot["ram_used_mib"] == 1766  # the last line read (the Nano's)
        assert snapshot["age_s"] is not None and snapshot["age_s"] < 10
    finally:
        stats.stop()


def test_a_line_that_is_not_utf8_does_not_stop_the_reader() -> None:
    """tegrastats is outside input: a corrupt byte spoils one line, not the thread that reads the rest."""
    corrupt = b"RAM 1766/3956MB \xff\xfe garbage\n"
    replay = (
        f"import sys, time; sys.stdout.buffer.write({corrupt!r}); "
        f"sys.stdout.write(open({str(RECORDED)!r}).readlines()[2]); sys.stdout.flush(); time.sleep(30)"
    )
    stats = TegraStats(command=[sys.executable, "-c", replay]).start()
    try:
        deadline = time.monotonic() + 10
        while stats.snapshot().get("gpu_load_pct") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # the line after the corrupt one (an Orin Nano's) was read, by the same thread
        assert stats.snapshot()["ram_used_mib"] == 2871 and stats.restarts == 0
    finally:
        stats.stop()


NVMAP = """CLIENT                        PROCESS      PID        SIZE
user                   gnome-shell     1811     120000K
user                       python3     4242     169376K
user                       python3     4242        512M
kernel                         -       0        8192K
"""


def test_nvmap_per_process(tmp_path: Path) -> None:
    table = tmp_path / "clients"
    table.write_text(NVMAP)
    assert nvmap_mib(4242, table) == pytest.approx(169376 / 1024 + 512)
    assert nvmap_mib(9999, table) == 0.0 and nvmap_mib(4242, tmp_path / "unreadable") is None


def test_worker_memory_counts_gpu_memory_on_a_jetson(
    demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On unified memory the worker's cap and the headroom check see RSS plus its nvmap allocations."""
    bundle = verify_bundle(demo_bundle, None)
    engine = WorkerEngine(WorkerSpec.of(bundle, bundle.target, 1))
    try:
        rss = engine.rss_mib()
        assert rss and engine.memory_mib() == rss  # not a Jetson: RSS is all of it
        table = tmp_path / "clients"
        table.write_text(f"CLIENT PROCESS PID SIZE\nuser python3 {engine.pid} 307200K\n")
        monkeypatch.setattr(worker_module, "nvmap_mib", functools.partial(nvmap_mib, clients=table))
        engine._unified = True  # what unified_memory() says on a Jetson
        assert engine.memory_mib() == pytest.approx(engine.rss_mib() + 300, abs=5)
    finally:
        engine.close()
