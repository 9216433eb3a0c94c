"""Inference in a child process: an engine that crashes, hangs or leaks takes only its worker down.

The agent and the worker share two memory-mapped buffers, allocated once: ``SLOTS`` input
batches (uint8 NHWC at the bundle's maximum batch) and as many output logits. The pipe
between them carries only a slot, a batch size and a status, so a batch costs one memcpy
in and one small copy out. Batches can be submitted while others are in flight: the
worker runs them in order, and starts the next the moment one ends, while the agent is
still busy with the last one's results (:meth:`WorkerEngine.submit`,
:meth:`WorkerEngine.collect`). A batch that does not end within ``timeout_s`` of its
start, or a worker that dies, is killed; every batch in flight then raises
:class:`EngineError` (counted by the caller as a failed batch). A worker whose resident
memory has grown past ``max_rss_mib`` (checked after a batch with nothing else in flight,
at most once a second) is killed once that batch's logits are out. In
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
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
SLOTS = 3  # the pipeline's batch in flight and the one queued behind it, and one synchronous run beside them


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
    images_per_stream: int = 1  # the bundle's serving layout (OpenVINO)

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
            bundle.images_per_stream,
        )

    def inputs(self, path: Path, mode: Literal["r+", "w+"]) -> np.memmap[Any, np.dtype[np.uint8]]:
        return np.memmap(path, np.uint8, mode, shape=(SLOTS, self.max_batch, self.height, self.width, 3))

    def outputs(self, path: Path, mode: Literal["r+", "w+"]) -> np.memmap[Any, np.dtype[np.float32]]:
        return np.memmap(path, np.float32, mode, shape=(SLOTS, self.max_batch, self.classes))


@dataclass(eq=False)
class Ticket:
    """A batch submitted to a worker; ``done`` is set once its logits (or its error) are in."""

    slot: int
    n: int
    submitted: float
    notify: Callable[[], None] | None = None  # called from the receiving thread when the batch ends
    done: threading.Event = field(default_factory=threading.Event)
    started: float | None = None  # monotonic: when the worker took it up (the batch before it ended)
    seconds: float = 0.0  # the engine's own time for the batch, measured in the worker
    error: str | None = None


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
            spec.backend,
            spec.target,
            spec.engine_path,
            spec.max_batch,
            spec.threads,
            spec.cache_dir,
            spec.precision,
            images_per_stream=spec.images_per_stream,
        )
        engine = with_references(engine, spec.references)
        inputs, outputs = spec.inputs(inputs_path, "r+"), spec.outputs(outputs_path, "r+")
    except Exception as exc:  # reported to the agent, which refuses the engine with this message
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        slot, n = request
        started = time.perf_counter()
        try:
            outputs[slot, :n] = engine.run(inputs[slot, :n])
            conn.send(("ok", slot, time.perf_counter() - started))
        except Exception as exc:  # a failed batch is the caller's to count; the worker keeps serving
            conn.send(("error", slot, f"{type(exc).__name__}: {exc}"))


class WorkerEngine:
    """An :class:`~agent.engine.runtimes.Engine` whose runtime lives in a child process.

    Two locks: ``_state`` guards the slots, the batches in flight and the process, and is
    never held while waiting; ``_exclusive`` is held by :meth:`exclusive` across its block,
    and by each submit, so another thread's submits wait while a block runs. A thread
    receives the worker's replies, so a batch's end is seen while its submitter is busy.
    """

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
        self._exclusive = threading.RLock()
        self._state = threading.Condition()
        self._free = list(range(SLOTS))
        self._in_flight: deque[Ticket] = deque()  # the worker answers in order
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
        with self._state:
            self._process, self._conn = process, parent
        threading.Thread(target=self._receive, args=(parent, process), name="worker-replies", daemon=True).start()
        if self._unified:  # what the load took from shared DRAM beyond its RSS: the GPU's share (nvmap)
            taken = (available_before - psutil.virtual_memory().available) / 2**20
            self._gpu_at_load_mib = max(taken - (self.rss_mib() or 0.0), 0.0)

    def _receive(self, conn: Connection, process: mp.process.BaseProcess) -> None:
        """The replying thread of one worker: ends each batch in flight, in order, until the pipe closes."""
        while True:
            try:
                status, slot, detail = conn.recv()
            except (EOFError, OSError):
                with self._state:
                    if self._conn is conn:  # it died on its own: every batch in flight fails with it
                        process.join(5)
                        log.error("engine worker died (exit %s); the next batch starts another", process.exitcode)
                        self._drop(f"engine worker died (exit {process.exitcode})")
                return
            with self._state:
                if self._conn is not conn or not self._in_flight:
                    return  # killed meanwhile: its batches were failed by the kill
                ticket = self._in_flight.popleft()
                if ticket.slot != slot:  # cannot happen while the worker answers in order
                    self._drop(f"engine worker answered for slot {slot}, expected {ticket.slot}")
                    process.kill()
                    return
                if self._in_flight:
                    self._in_flight[0].started = time.monotonic()
                if status == "ok":
                    ticket.seconds = float(detail)
                else:
                    ticket.error = str(detail)
                self._end(ticket)

    def _end(self, ticket: Ticket) -> None:
        """With ``_state`` held."""
        ticket.done.set()
        self._state.notify_all()
        if ticket.notify is not None:
            ticket.notify()

    def _drop(self, why: str) -> None:
        """With ``_state`` held: the worker is gone; every batch in flight fails with ``why``."""
        self._process = self._conn = None
        while self._in_flight:
            ticket = self._in_flight.popleft()
            ticket.error = why
            self._end(ticket)

    def _kill(self, why: str) -> None:
        """With ``_state`` held."""
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        self._drop(why)
        log.error("engine worker killed: %s", why)

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
        """With ``_state`` held and nothing in flight."""
        now = time.monotonic()
        if not self.max_rss_mib or now - self._rss_checked < RSS_CHECK_EVERY_S:
            return
        self._rss_checked = now
        used = self.memory_mib()
        if used is not None and used > self.max_rss_mib:  # this batch's logits are good; the next gets a fresh worker
            self._kill(f"engine worker uses {used:.0f} MiB, over engine.worker_max_rss_mib {self.max_rss_mib:g}")

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Inside the block this worker runs only the caller's batches: others' submits wait, and what
        was in flight has ended."""
        with self._exclusive:
            with self._state:
                self._await(lambda: not self._in_flight)
            yield

    def submit(self, images: np.ndarray, notify: Callable[[], None] | None = None) -> Ticket:
        """Copy the batch in and queue it behind the batches in flight; :meth:`collect` takes its logits."""
        n = len(images)
        if n > self.spec.max_batch:
            raise EngineError(f"batch of {n} exceeds the engine's maximum of {self.spec.max_batch}")
        with self._exclusive:
            if self._conn is None:
                self.restarts += 1
                self._start()
            with self._state:
                self._state.wait_for(lambda: self._free)
                slot = self._free.pop()
            self._inputs[slot, :n] = images
            with self._state:
                ticket = Ticket(slot, n, time.monotonic(), notify)
                if not self._in_flight:
                    ticket.started = ticket.submitted
                if self._conn is None:  # died since it started: the next submit starts another
                    self._free.append(slot)
                    raise EngineError("engine worker died")
                self._in_flight.append(ticket)
                try:
                    self._conn.send((slot, n))
                except OSError:
                    self._kill("engine worker died")
            return ticket

    def collect(self, ticket: Ticket) -> np.ndarray:
        """Wait for ``ticket``'s batch; a copy of its logits. A batch is given ``timeout_s`` from its start."""
        with self._state:
            try:
                self._await(ticket.done.is_set)
                if ticket.error is not None:
                    raise EngineError(ticket.error)
                logits = np.array(self._outputs[ticket.slot, : ticket.n])
                if not self._in_flight:
                    self._check_rss()
                return logits
            finally:
                self._free.append(ticket.slot)

    def _await(self, ended: Callable[[], bool]) -> None:
        """With ``_state`` held: wait until ``ended()``, killing the worker when the batch running
        has had ``timeout_s`` since its start (the previous batch's end, or its own submit)."""
        while not ended():
            oldest = self._in_flight[0]
            assert oldest.started is not None  # the batch running: set at its submit or at the last one's end
            left = oldest.started + self.timeout_s - time.monotonic()
            if left <= 0:
                self._kill(f"batch of {oldest.n} did not finish within {self.timeout_s:g} s")
            else:
                self._state.wait(left)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Copy the batch in, wait at most ``timeout_s`` once it starts, return a copy of the logits."""
        return self.collect(self.submit(images))

    def close(self) -> None:
        with self._exclusive, self._state:
            if self._conn is not None and self._process is not None:
                conn, process = self._conn, self._process
                self._drop("the engine was closed")
                try:
                    conn.send(None)
                except OSError:
                    pass
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join(5)
            for path in (self._inputs_path, self._outputs_path):
                path.unlink(missing_ok=True)
            self._dir.rmdir()
