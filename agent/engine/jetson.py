"""Jetson telemetry and GPU-inclusive memory: what tegrastats, nvpmodel and nvmap say.

On a Jetson, CPU and GPU share one DRAM and GPU allocations go through nvmap, which a
process's RSS does not count: a TensorRT engine's weights and workspace would be
invisible to the swap headroom check and the worker's memory cap. :func:`nvmap_mib`
reads a process's nvmap allocations where the kernel lets us (debugfs, root), and
:class:`WorkerEngine <agent.engine.worker.WorkerEngine>` otherwise measures what its
load took out of MemAvailable beyond its RSS.

``tegrastats`` prints one line per interval; its fields differ by module and JetPack
(``GR3D_FREQ 12%@[305]`` on Orin, ``GR3D_FREQ 12%`` earlier; rails as ``VDD_IN
4800mW/4800mW`` on JetPack 5+, ``POM_5V_IN 2545/2547`` on JetPack 4). :func:`parse_tegrastats`
reads what is there and leaves out what is not; a sensor reading -256 °C is off.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from agent.engine.device import JETSON_MODEL_FILE

log = logging.getLogger("edgevit.jetson")
NVMAP_CLIENTS = Path("/sys/kernel/debug/nvmap/iovmm/clients")

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b((?:VDD|VIN|POM)_[A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?")
SENSOR_OFF_C = -256.0


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One tegrastats line as numbers: RAM/swap MiB, GPU and EMC load %, temperatures °C, rails mW (now)."""
    stats: dict[str, Any] = {}
    if m := _RAM.search(line):
        stats["ram_used_mib"], stats["ram_total_mib"] = int(m[1]), int(m[2])
    if m := _SWAP.search(line):
        stats["swap_used_mib"] = int(m[1])
    if m := _GPU.search(line):
        stats["gpu_load_pct"] = int(m[1])
    if m := _EMC.search(line):
        stats["emc_load_pct"] = int(m[1])
    temps = {name.lower(): float(c) for name, c in _TEMP.findall(line) if float(c) > SENSOR_OFF_C}
    if temps:
        stats["temperature_c"] = temps
    rails = {name: int(now) for name, now, _ in _RAIL.findall(line)}
    if rails:
        stats["power_mw"] = rails
    return stats


def unified_memory() -> bool:
    """True on a Jetson: the GPU allocates from the same DRAM as the CPU, outside any process's RSS."""
    try:
        return "jetson" in JETSON_MODEL_FILE.read_text().lower()
    except OSError:
        return False


def power_mode() -> str | None:
    """The nvpmodel power mode (``15W``, ``MAXN``...), or None off a Jetson."""
    if not shutil.which("nvpmodel"):
        return None
    try:
        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, errors="replace", timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"NV Power Mode:\s*(\S+)", out)
    return m[1] if m else None


def nvmap_mib(pid: int, clients: Path = NVMAP_CLIENTS) -> float | None:
    """MiB of nvmap (GPU) memory held by ``pid``, or None where the table cannot be read (not root, not a Jetson).

    The table reads ``CLIENT PROCESS PID SIZE`` then one line per client: ``user python3 4242 169376K``.
    """
    try:
        text = clients.read_text()
    except OSError:
        return None
    total = 0.0
    units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[2] == str(pid) and parts[3][-1:] in units and parts[3][:-1].isdigit():
            total += int(parts[3][:-1]) * units[parts[3][-1]]
    return total


def jetson_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """The few figures a fleet status carries (it stays far under managed brokers' payload limits)."""
    temps, rails = stats.get("temperature_c") or {}, stats.get("power_mw") or {}
    return {
        "gpu_load_pct": stats.get("gpu_load_pct"),
        "ram_used_mib": stats.get("ram_used_mib"),
        "temp_max_c": max(temps.values()) if temps else None,
        "power_mw": rails.get("VDD_IN") or rails.get("VIN_SYS_5V0") or rails.get("POM_5V_IN"),
        "power_mode": stats.get("power_mode"),
    }


class TegraStats:
    """``tegrastats`` in a supervised child process; :attr:`latest` is its newest line, parsed.

    A tegrastats that exits (or never starts) is restarted with a growing pause, and its
    failures are counted; telemetry is never a reason for the agent to stop.
    """

    def __init__(self, interval_ms: int = 1000, command: list[str] | None = None) -> None:
        self.command = command or ["tegrastats", "--interval", str(interval_ms)]
        self.latest: dict[str, Any] = {}
        self.updated = 0.0
        self.restarts = 0
        self._stop = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._run, name="tegrastats", daemon=True)

    @staticmethod
    def available() -> bool:
        return shutil.which("tegrastats") is not None

    def start(self) -> TegraStats:
        self._thread.start()
        return self

    def _run(self) -> None:
        pause = 1.0
        while not self._stop.is_set():
            try:
                self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True, errors="replace")
                assert self._process.stdout is not None
                for line in self._process.stdout:
                    parsed = parse_tegrastats(line)
                    if parsed:
                        self.latest, self.updated, pause = parsed, time.time(), 1.0
                    if self._stop.is_set():
                        break
            except Exception:  # a missing binary, a closed pipe: counted, retried
                log.exception("tegrastats failed")
            finally:
                if self._process is not None and self._process.poll() is None:
                    self._process.terminate()
            if not self._stop.is_set():
                self.restarts += 1
                self._stop.wait(pause)
                pause = min(pause * 2, 60.0)

    def snapshot(self) -> dict[str, Any]:
        """The latest figures with their age, for the status and the metrics."""
        return {**self.latest, "age_s": round(time.time() - self.updated, 1) if self.updated else None,
                "restarts": self.restarts}  # fmt: skip

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
