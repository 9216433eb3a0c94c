"""One camera: a thread in the agent that supervises the camera's decoder process and relays its frames.

Decoding happens in :mod:`agent.stream.decoder`, a process per camera, so one camera's open, hang
or crash never delays another's (no lock in this process is held across a network open). This
thread starts the decoder, hands it the settings on its stdin, and reads its messages: each frame
(already preprocessed to the engine's input) goes into the frame queue, each state change becomes
a camera event. A decoder that goes quiet for longer than it may (its open past
``stall_timeout_s``, no frame past ``stall_timeout_s`` while connected), or that dies, is killed
and restarted after a backoff that doubles per restart, up to a minute; its counters carry on.
Files end (state ``ended``) unless ``loop`` is set. A ``region`` that does not fit the stream's
frames is reported as the camera's error (state ``failed``) until the region is changed.

The decoder's CPU time (every thread of its process: reading, FFmpeg's decoder threads,
preprocessing) is the camera's cost in the metrics.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
from typing import IO, Any

import cv2
import numpy as np

from agent.config import CameraConfig, redact
from agent.engine.preprocess import InputSpec
from agent.stream.decoder import FRAME, HEADER, STATE
from agent.stream.frames import FrameInfo, FrameQueue

log = logging.getLogger("edgevit.camera")

START_TIMEOUT_S = 30.0  # a new decoder process imports OpenCV before its first message
OPEN_GRACE_S = 2.0  # beyond the open timeout FFmpeg honours
MAX_RESTART_DELAY_S = 60.0
POLL_S = 0.2  # how soon a stop is noticed


class CameraState(str, Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"  # frames arrive but cannot be used (a region outside the frame)
    ENDED = "ended"
    PAUSED = "paused"
    STOPPED = "stopped"


class Quiet(Exception):
    """The decoder said nothing for longer than it may: the message says what it was doing."""


def opencv_has_gstreamer() -> bool:
    """Whether this OpenCV was built with GStreamer (JetPack's is; pip's opencv-python wheels are not)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def unusable_sources(cameras: list[CameraConfig]) -> list[str]:
    """Why cameras cannot be opened with this OpenCV, found before any process starts."""
    wants = [
        c
        for c in cameras
        if c.backend == "gstreamer"
        or c.hw_decode in ("jetson", "nvcodec")
        or (isinstance(c.source, str) and " ! " in c.source)
    ]
    if not wants or opencv_has_gstreamer():
        return []
    return [
        f"cameras.{c.name}: a GStreamer pipeline, but this OpenCV ({cv2.__version__}) was built without GStreamer "
        "(pip's opencv-python-headless has none). On Jetson use JetPack's OpenCV: apt install python3-opencv and "
        "create the venv with --system-site-packages (see docs/systemd-and-jetson.md); elsewhere build OpenCV "
        "with -DWITH_GSTREAMER=ON, or use an rtsp:// source with the FFmpeg backend"
        for c in wants
    ]


class Camera(threading.Thread):
    def __init__(
        self,
        config: CameraConfig,
        spec: InputSpec,
        queue: FrameQueue,
        on_event: Callable[[str, dict[str, Any]], None],
        replaces: Camera | None = None,
    ) -> None:
        """``replaces``: the camera whose thread ended unexpectedly; its counters go on."""
        super().__init__(name=f"camera-{config.name}", daemon=True)
        self.config = config
        self._spec, self._queue, self._on_event = spec, queue, on_event
        self._message = bytearray(HEADER.size + spec.height * spec.width * 3)
        self._frame = np.frombuffer(self._message, np.uint8, offset=HEADER.size).reshape(spec.height, spec.width, 3)
        self._halt = threading.Event()
        self._settings_lock = threading.Lock()
        self._decoder: subprocess.Popen[bytes] | None = None
        self.state = CameraState.CONNECTING
        self.error: str | None = None
        self.decode: str | None = None  # how frames are decoded: software, vaapi, jetson (gstreamer)...
        self.decoded: int = replaces.decoded if replaces else 0
        # when this camera's first frame arrived (monotonic): the run's rates are counted from it
        self.first_frame: float | None = replaces.first_frame if replaces else None
        self.last_frame = time.monotonic()
        # the camera side's cost, so an operator sees when it, not the engine, is the bottleneck
        self.decode_cpu_s: float = replaces.decode_cpu_s if replaces else 0.0
        self.preprocess_s: float = replaces.preprocess_s if replaces else 0.0
        self.preprocessed: int = replaces.preprocessed if replaces else 0
        self.reconnects: int = replaces.reconnects if replaces else 0
        self.restarts: int = replaces.restarts + 1 if replaces else 0
        self._seq: int = replaces._seq if replaces else 0
        self._base = (self.decoded, self.reconnects, self.decode_cpu_s, self.preprocess_s, self.preprocessed)

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._halt.set()

    def update(self, config: CameraConfig) -> None:
        """Apply new throttling/region/pause settings in the running decoder; a new source needs a new Camera."""
        with self._settings_lock:
            self.config = config
            decoder = self._decoder
            if decoder and decoder.stdin:
                try:
                    decoder.stdin.write(json.dumps(_settings(config)).encode() + b"\n")
                    decoder.stdin.flush()
                except OSError:  # the decoder is being restarted: the new one starts with these settings
                    pass

    def failure(self, now: float) -> str | None:
        """Why this camera must be replaced, or None: only when its thread ended (a bug) while it should run."""
        if self._halt.is_set() or self.ident is None or self.is_alive():
            return None
        return None if self.state in (CameraState.ENDED, CameraState.STOPPED) else "its thread ended"

    # -- thread --------------------------------------------------------------------------------
    def _set_state(self, state: CameraState, error: str | None = None, **detail: object) -> None:
        self.error = error
        if state != self.state:
            self.state = state
            extra = {"error": error} if error else {}
            self._on_event("camera", {"camera": self.config.name, "state": state.value, **extra, **detail})

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                try:
                    reason = self._serve_one_decoder()
                except Exception as exc:  # a bug here: reported, and the decoder replaced like a stuck one
                    log.exception("camera %s failed", self.config.name)
                    reason = f"{type(exc).__name__}: {exc}"[:300]
                if reason is None:
                    break
                self.restarts += 1
                self._on_event(
                    "camera",
                    {"camera": self.config.name, "state": "restarting", "reason": reason, "restarts": self.restarts},
                )
                log.warning(
                    "camera %s: %s; restarting its decoder (restart %d)", self.config.name, reason, self.restarts
                )
                self._halt.wait(min(2.0 ** (self.restarts - 1), MAX_RESTART_DELAY_S))
        finally:
            if self.state != CameraState.ENDED:
                self._set_state(CameraState.STOPPED)

    def _serve_one_decoder(self) -> str | None:
        """Run one decoder process until the source ends or the camera stops (None), or until it must be
        killed and restarted (why)."""
        decoder = subprocess.Popen(
            [sys.executable, "-m", "agent.stream.decoder", "--camera", self.config.name],  # the name, never the source
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert decoder.stdin is not None and decoder.stdout is not None
        with self._settings_lock:
            self._decoder = decoder
            first = {"camera": _settings(self.config), "spec": asdict(self._spec)}
            decoder.stdin.write(json.dumps(first).encode() + b"\n")
            decoder.stdin.flush()
        self._base = (self.decoded, self.reconnects, self.decode_cpu_s, self.preprocess_s, self.preprocessed)
        try:
            return self._relay(decoder.stdout)
        except Quiet as exc:
            return str(exc)
        except EOFError:
            decoder.wait(5)
            return f"its decoder exited (status {decoder.returncode})"
        finally:
            with self._settings_lock:
                self._decoder = None
            decoder.kill()  # from inside a stuck read too: nothing of this process is shared with it
            decoder.wait()
            decoder.stdin.close()
            decoder.stdout.close()

    def _relay(self, pipe: IO[bytes]) -> str | None:
        """Messages from the decoder into the queue and the camera's state until it ends or must go."""
        doing, deadline = "starting", time.monotonic() + START_TIMEOUT_S
        while True:
            kind, size, captured = self._next_message(pipe, doing, deadline)
            if kind is None:  # stopping
                return None
            now = time.monotonic()
            config = self.config
            if kind == STATE:
                message = json.loads(bytes(self._message[HEADER.size : HEADER.size + size]))
                state = message["state"]
                if state == "ended":
                    self._set_state(CameraState.ENDED)
                    return None
                if state == "opening":
                    doing, deadline = "opening the source", now + config.stall_timeout_s + OPEN_GRACE_S
                    continue
                if state == "reconnecting":
                    doing, deadline = "waiting to reconnect", now + message["retry_in_s"] + START_TIMEOUT_S
                    self._set_state(CameraState.RECONNECTING, error=redact(str(message.get("error")))[:300])
                    continue
                self.decode = message.get("decode", self.decode)
                error = message.get("error")
                self._set_state(CameraState(state), error=redact(error) if error else None)
            elif kind == FRAME:  # a heartbeat only updated the counters
                self._seq += 1
                self._queue.put(FrameInfo(config.name, self._seq, captured, now), self._frame)
            patience = config.stall_timeout_s + (1 / config.fps if config.fps else 0.0) + 1.0
            doing, deadline = "reading", max(now, self.last_frame) + patience

    def _next_message(self, pipe: IO[bytes], doing: str, deadline: float) -> tuple[bytes | None, int, float]:
        """The next message's kind, payload size and capture time, read into the message buffer."""
        view = memoryview(self._message)
        self._read_exact(pipe, view[: HEADER.size], doing, deadline)
        if self._halt.is_set():
            return None, 0, 0.0
        kind, size, decoded, reconnects, cpu_s, preprocess_s, preprocessed, captured = HEADER.unpack_from(self._message)
        if size > len(self._message) - HEADER.size:
            raise Quiet(f"its decoder sent a {size}-byte message, larger than a frame")
        self._read_exact(pipe, view[HEADER.size : HEADER.size + size], doing, time.monotonic() + START_TIMEOUT_S)
        if self._halt.is_set():  # stopping: what was read may be partial
            return None, 0, 0.0
        base_decoded, base_reconnects, base_cpu, base_pre, base_preprocessed = self._base
        if decoded > self.decoded - base_decoded:
            self.last_frame = time.monotonic()
            if self.first_frame is None:
                self.first_frame = self.last_frame
        self.decoded = base_decoded + decoded
        self.reconnects = base_reconnects + reconnects
        self.decode_cpu_s = base_cpu + max(cpu_s - preprocess_s, 0.0)
        self.preprocess_s = base_pre + preprocess_s
        self.preprocessed = base_preprocessed + preprocessed
        return kind, size, captured

    def _read_exact(self, pipe: IO[bytes], view: memoryview, doing: str, deadline: float) -> None:
        got = 0
        while got < len(view):
            if self._halt.is_set():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise Quiet(self._quiet_reason(doing))
            if not select.select([pipe], [], [], min(left, POLL_S))[0]:
                continue
            n = pipe.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise EOFError
            got += n

    def _quiet_reason(self, doing: str) -> str:
        if doing == "reading":
            return f"no frame for {time.monotonic() - self.last_frame:.0f} s: a read is stuck"
        if doing == "opening the source":
            return (
                f"opening the source for more than {self.config.stall_timeout_s + OPEN_GRACE_S:g} s: the open is stuck"
            )
        return f"its decoder said nothing while {doing}: it is stuck"


def _settings(config: CameraConfig) -> dict[str, Any]:
    """What the decoder process needs, as JSON (the source with its credentials: stdin only)."""
    return config.model_dump(mode="json")
