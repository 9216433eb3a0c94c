"""Inference in a child process: an engine that crashes, hangs or leaks takes only its worker down.

The agent and the worker share two memory-mapped buffers, allocated once: the input
batch (uint8 NHWC at the bundle's maximum batch) and the output logits. The pipe
between them carries only a batch size and a status, so a batch costs one memcpy in
and one small copy out. A batch that does not return within ``timeout_s`` or a worker
that dies is killed; the call raises :class:`EngineError` (counted by the caller as a
failed batch). A worker whose resident memory has grown past ``max_rss_mib`` (checked
after a batch, at most once a second) is killed once its batch's logits are out. In
every case the next call starts a fresh worker. The worker exits as soon as the
agent is gone (a thread watching its parent pid), so a hung engine never outlives a
killed agent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psutil

from agent.engine.bundle import Bundle
from agent.engine.jetson import nvmap_mib, unified_memory
from agent.engine.runtimes import EngineError, open_engine
from agent.engine.similarity import with_references
from agent.systemd import notify

log = logging.getLogger("edgevit.worker")
_CONTEXT = mp.get_context("spawn")  # never fork a process that runs camera and MQTT threads
PARENT_CHECK_S = 0.5
RSS_CHECK_EVERY_S = 1.0
LOAD_NOTIFY_S = 10.0  # while an engine loads, systemd's start (or stop) timeout is extended this often
# Buffers live in RAM where the system has /dev/shm: never write batches to a Jetson's eMMC.
BUFFER_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
BUFFER_PREFIX = "edgevit-worker-"


def remove_stale_buffers(folder: Path = BUFFER_DIR) -> None:
    """Delete buffers left by agents that were killed (their pid is in the folder name).

    Best effort: agents starting together on one machine race for the same stale folders, and a folder
    this agent cannot remove must not stop it from starting.
    """
    for path in folder.glob(f"{BUFFER_PREFIX}*"):
        pid = path.name[len(BUFFER_PREFIX) :].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                for item in path.iterdir():
                    item.unlink(missing_ok=True)
                path.rmdir()


@dataclass(frozen=True)
class WorkerSpec:
    """What the child needs to open the engine and map the buffers."""

    backend: str
    target: str
    engine_path: Path
    max_batch: int
    height: int
    width: int
    classes: int
    threads: int | None
    cache_dir: Path | None = None  # compiled engines kept across loads (OpenVINO, the TensorRT provider)
    precision: str = "fp32"
    references: Path | None = None  # an embedding model's: the worker outputs similarities to them

    @classmethod
    def of(
        cls,
        bundle: Bundle,
        target: str,
        threads: int | None,
        engine_path: Path | None = None,
        cache_dir: Path | None = None,
    ) -> WorkerSpec:
        """The worker for ``bundle``'s engine (``engine_path`` replaces its file: tests' variants)."""
        spec = bundle.input_spec
        return cls(
            bundle.backend,
            target,
            engine_path or bundle.engine_path,
            bundle.batch_range[1],
            spec.height,
            spec.width,
            len(bundle.labels),
            threads,
            cache_dir,
            bundle.manifest["engine"].get("precision", "fp32"),
            bundle.references_path,
        )

    def inputs(self, path: Path, mode: Literal["r+", "w+"]) -> np.memmap[Any, np.dtype[np.uint8]]:
        return np.memmap(path, np.uint8, mode, shape=(self.max_batch, self.height, self.width, 3))

    def outputs(self, path: Path, mode: Literal["r+", "w+"]) -> np.memmap[Any, np.dtype[np.float32]]:
        return np.memmap(path, np.float32, mode, shape=(self.max_batch, self.classes))


def _die_with_parent() -> None:
    """Exit as soon as the agent is gone, even mid-batch (the pipe's EOF only ends an idle worker).

    Not PR_SET_PDEATHSIG: that fires when the *thread* that started the worker ends, and
    workers are started by short-lived deploy threads. ONNX Runtime and TensorRT release
    the GIL while they run, so this thread gets its turn during a hung batch too.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(conn: Connection, spec: WorkerSpec, inputs_path: Path, outputs_path: Path) -> None:
    """The child: open the engine, then run batches on request until the pipe closes."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when its worker stops
    try:
        engine = open_engine(
            spec.backend, spec.target, spec.engine_path, spec.max_batch, spec.threads, spec.cache_dir, spec.precision
        )
        engine = with_references(engine, spec.references)
        inputs, outputs = spec.inputs(inputs_path, "r+"), spec.outputs(outputs_path, "r+")
    except Exception as exc:  # reported to the agent, which refuses the engine with this message
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            n = conn.recv()
        except EOFError:
            return
        if n is None:
            return
        try:
            outputs[:n] = engine.run(inputs[:n])
            conn.send(("ok", n))
        except Exception as exc:  # a failed batch is the caller's to count; the worker keeps serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class WorkerEngine:
    """An :class:`~agent.engine.runtimes.Engine` whose runtime lives in a child process."""

    def __init__(
        self,
        spec: WorkerSpec,
        timeout_s: float = 10.0,
        start_timeout_s: float = 300.0,
        max_rss_mib: float | None = None,
    ) -> None:
        self.spec, self.timeout_s, self.start_timeout_s = spec, timeout_s, start_timeout_s
        self.max_rss_mib = max_rss_mib

        self.restarts = 0
        self._lock = threading.RLock()  # exclusive() holds it across runs
        self._dir = Path(tempfile.mkdtemp(prefix=f"{BUFFER_PREFIX}{os.getpid()}-", dir=BUFFER_DIR))
        self._inputs_path, self._outputs_path = self._dir / "inputs", self._dir / "outputs"
        self._inputs, self._outputs = spec.inputs(self._inputs_path, "w+"), spec.outputs(self._outputs_path, "w+")
        self._process: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._rss_checked = 0.0
        self._unified = unified_memory()
        self._gpu_at_load_mib = 0.0
        self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _start(self) -> None:
        parent, child = _CONTEXT.Pipe()
        process = _CONTEXT.Process(
            target=_serve,
            args=(child, self.spec, self._inputs_path, self._outputs_path),
            name=f"engine-{self.spec.engine_path.parent.parent.name}",
            daemon=True,
        )
        available_before = psutil.virtual_memory().available
        process.start()
        child.close()
        deadline = time.monotonic() + self.start_timeout_s
        while not parent.poll(min(LOAD_NOTIFY_S, max(deadline - time.monotonic(), 0))):
            if time.monotonic() >= deadline:
                process.kill()
                raise EngineError(
                    f"engine worker did not load {self.spec.engine_path} within {self.start_timeout_s:g} s"
                )
            # still loading (a first TensorRT build takes minutes): systemd's start timeout waits with us
            notify(f"EXTEND_TIMEOUT_USEC={int(2 * LOAD_NOTIFY_S * 1e6)}")
        try:
            status, detail = parent.recv()
        except EOFError:
            process.join(5)
            raise EngineError(f"engine worker died loading {self.spec.engine_path} (exit {process.exitcode})") from None
        if status != "ready":
            process.join(5)
            raise EngineError(str(detail))
        self._process, self._conn = process, parent
        if self._unified:  # what the load took from shared DRAM beyond its RSS: the GPU's share (nvmap)
            taken = (available_before - psutil.virtual_memory().available) / 2**20
            self._gpu_at_load_mib = max(taken - (self.rss_mib() or 0.0), 0.0)

    def _kill(self, why: str) -> EngineError:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        self._process = self._conn = None
        log.error("engine worker killed: %s", why)
        return EngineError(why)

    def rss_mib(self) -> float | None:
        """The worker's resident memory (engine, runtime and buffers), or None while none runs."""
        try:
            return psutil.Process(self._process.pid).memory_info().rss / 2**20 if self._process else None
        except psutil.Error:
            return None

    def memory_mib(self) -> float | None:
        """The worker's memory where it is spent: RSS, plus on a Jetson its GPU (nvmap) allocations.

        nvmap's own table when this process may read it (root), else what the load took out of
        MemAvailable beyond its RSS.
        """
        rss = self.rss_mib()
        if rss is None or not self._unified:
            return rss
        assert self._process is not None and self._process.pid is not None
        gpu = nvmap_mib(self._process.pid)
        return rss + (gpu if gpu is not None else self._gpu_at_load_mib)

    def _check_rss(self) -> None:
        now = time.monotonic()
        if not self.max_rss_mib or now - self._rss_checked < RSS_CHECK_EVERY_S:
            return
        self._rss_checked = now
        used = self.memory_mib()
        if used is not None and used > self.max_rss_mib:  # this batch's logits are good; the next gets a fresh worker
            self._kill(f"engine worker uses {used:.0f} MiB, over engine.worker_max_rss_mib {self.max_rss_mib:g}")

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No other thread runs a batch on this worker inside the block (the caller's runs still do)."""
        with self._lock:
            yield

    def run(self, images: np.ndarray) -> np.ndarray:
        """Copy the batch in, wait at most ``timeout_s``, return a copy of the logits."""
        n = len(images)
        if n > self.spec.max_batch:
            raise EngineError(f"batch of {n} exceeds the engine's maximum of {self.spec.max_batch}")
        with self._lock:
            if self._conn is None:
                self.restarts += 1
                self._start()
            assert self._conn is not None and self._process is not None
            self._inputs[:n] = images
            try:
                self._conn.send(n)
                if not self._conn.poll(self.timeout_s):
                    raise self._kill(f"batch of {n} did not finish within {self.timeout_s:g} s")
                status, detail = self._conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError):
                self._process.join(5)
                raise self._kill(f"engine worker died (exit {self._process.exitcode})") from None
            if status != "ok":
                raise EngineError(str(detail))
            logits = np.array(self._outputs[:n])
            self._check_rss()
            return logits

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._process is not None:
                try:
                    self._conn.send(None)
                except OSError:
                    pass
                self._process.join(5)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join(5)
            self._process = self._conn = None
            for path in (self._inputs_path, self._outputs_path):
                path.unlink(missing_ok=True)
            self._dir.rmdir()
