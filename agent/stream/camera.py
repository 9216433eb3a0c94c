"""One capture thread per camera: open, read, throttle, preprocess, hand over, recover.

A camera that errors, ends or stalls (no frame for ``stall_timeout_s``) is reopened
with exponential backoff and jitter, in its own thread, so the other cameras never
notice. Files end (state ``ended``) unless ``loop`` is set. FFmpeg-backed sources
get OpenCV's open/read timeouts so a dead network stream cannot block a read
forever. For the other backends (GStreamer, V4L2) a read can block for good: the
pipeline's supervisor asks :meth:`Camera.failure` and replaces a camera whose read
is stuck or whose thread ended, abandoning the stuck thread (a capture released
under a live read would abort the process) with its events silenced.

An unexpected error inside the thread (an odd frame, a bug) is caught, reported as
the camera's error and answered by reopening with backoff: it never ends the thread.
A ``region`` that does not fit the stream's frames is reported as the camera's
error (state ``failed``) and its frames are not used until the region is changed.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import cv2
import numpy as np

from agent.config import CameraConfig, redact
from agent.engine.preprocess import InputSpec, preprocess_into
from agent.stream.frames import FrameInfo, FrameQueue

log = logging.getLogger("edgevit.camera")

# OpenCV's FFmpeg backend takes per-open options (RTSP transport) only from this process-wide variable: it is
# set, under a lock, only around the open of an RTSP camera with an explicit rtsp_transport
FFMPEG_OPTIONS = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_FFMPEG_OPTIONS_LOCK = threading.Lock()
BACKENDS = {"auto": cv2.CAP_ANY, "ffmpeg": cv2.CAP_FFMPEG, "v4l2": cv2.CAP_V4L2, "gstreamer": cv2.CAP_GSTREAMER}


class CameraState(str, Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"  # frames arrive but cannot be used (a region outside the frame)
    ENDED = "ended"
    PAUSED = "paused"
    STOPPED = "stopped"


def opencv_has_gstreamer() -> bool:
    """Whether this OpenCV was built with GStreamer (JetPack's is; pip's opencv-python wheels are not)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def unusable_sources(cameras: list[CameraConfig]) -> list[str]:
    """Why cameras cannot be opened with this OpenCV, found before any thread starts."""
    wants = [c for c in cameras if c.backend == "gstreamer" or (isinstance(c.source, str) and " ! " in c.source)]
    if not wants or opencv_has_gstreamer():
        return []
    return [
        f"cameras.{c.name}: a GStreamer pipeline, but this OpenCV ({cv2.__version__}) was built without GStreamer "
        "(pip's opencv-python-headless has none). On Jetson use JetPack's OpenCV: apt install python3-opencv and "
        "create the venv with --system-site-packages (see the README's Jetson section); elsewhere build OpenCV "
        "with -DWITH_GSTREAMER=ON, or use an rtsp:// source with the FFmpeg backend"
        for c in wants
    ]


def _is_file(source: str | int) -> bool:
    return isinstance(source, str) and "://" not in source and "!" not in source and not source.startswith("/dev/")


class Camera(threading.Thread):
    def __init__(
        self,
        config: CameraConfig,
        spec: InputSpec,
        queue: FrameQueue,
        on_event: Callable[[str, dict[str, Any]], None],
        replaces: Camera | None = None,
    ) -> None:
        """``replaces``: the camera this one takes over from (its counters go on; it starts after a backoff)."""
        super().__init__(name=f"camera-{config.name}", daemon=True)
        self.config = config
        self._spec, self._queue, self._on_event = spec, queue, on_event
        self._scratch = np.empty((spec.height, spec.width, 3), np.uint8)
        self._halt = threading.Event()
        self._settings_lock = threading.Lock()
        self._abandoned = False
        self._opening_since: float | None = None
        self.state = CameraState.CONNECTING
        self.error: str | None = None
        self.decoded: int = replaces.decoded if replaces else 0
        # when this camera's first frame arrived (monotonic): the run's rates are counted from it
        self.first_frame: float | None = replaces.first_frame if replaces else None
        # the camera side's cost, so an operator sees when it, not the engine, is the bottleneck
        self.decode_cpu_s: float = replaces.decode_cpu_s if replaces else 0.0
        self.preprocess_s: float = replaces.preprocess_s if replaces else 0.0
        self.preprocessed: int = replaces.preprocessed if replaces else 0
        self.reconnects: int = replaces.reconnects if replaces else 0
        self.restarts: int = replaces.restarts + 1 if replaces else 0
        self._start_delay = min(2.0 ** (self.restarts - 1), 60.0) if replaces else 0.0
        self.last_frame = time.monotonic() + self._start_delay
        self._seq: int = replaces._seq if replaces else 0

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._halt.set()

    def update(self, config: CameraConfig) -> None:
        """Apply new throttling/region/pause settings; a new source needs a new Camera."""
        with self._settings_lock:
            self.config = config

    def abandon(self) -> None:
        """Stop, and never speak again: a replacement reports for this camera from now on."""
        self._abandoned = True
        self._halt.set()

    def failure(self, now: float) -> str | None:
        """Why this camera's thread must be replaced, or None: it ended on its own, or a read is stuck."""
        if self._halt.is_set() or self.ident is None:
            return None
        if not self.is_alive():
            return None if self.state in (CameraState.ENDED, CameraState.STOPPED) else "its thread ended"
        # a file capped at a low fps waits 1/fps between reads on purpose
        patience = self.config.stall_timeout_s + (1 / self.config.fps if self.config.fps else 0.0)
        opening = self._opening_since
        if opening is not None and now - opening > self.config.stall_timeout_s + 1.0:
            return f"opening the source for {now - opening:.0f} s: the open is stuck"
        if self.state in (CameraState.CONNECTED, CameraState.PAUSED, CameraState.FAILED):
            if now - self.last_frame > patience + 1.0:  # a second beyond the read timeout FFmpeg honours
                return f"no frame for {now - self.last_frame:.0f} s: a read is stuck"
        return None

    # -- thread --------------------------------------------------------------------------------
    def _set_state(self, state: CameraState, error: str | None = None, **detail: object) -> None:
        if self._abandoned:
            return
        self.error = error
        if state != self.state:
            self.state = state
            extra = {"error": error} if error else {}
            self._on_event("camera", {"camera": self.config.name, "state": state.value, **extra, **detail})

    def _open(self) -> cv2.VideoCapture:
        source, backend = self.config.source, BACKENDS[self.config.backend]
        timeout_ms = int(self.config.stall_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        transport = self.config.rtsp_transport
        if transport == "auto" or not str(source).lower().startswith("rtsp"):
            capture = cv2.VideoCapture(source, backend, params)  # no lock: a stuck open blocks no other camera
        else:  # OpenCV reads FFmpeg's options from the environment while it opens: one such open at a time
            if not _FFMPEG_OPTIONS_LOCK.acquire(timeout=self.config.stall_timeout_s):
                raise OSError(f"cannot open {redact(str(source))!r}: another camera's RTSP open is still running")
            try:
                os.environ[FFMPEG_OPTIONS] = f"rtsp_transport;{transport}"
                capture = cv2.VideoCapture(source, backend, params)
            finally:
                os.environ.pop(FFMPEG_OPTIONS, None)
                _FFMPEG_OPTIONS_LOCK.release()
        if not capture.isOpened():
            capture.release()
            raise OSError(f"cannot open {redact(str(source))!r}")
        return capture

    def run(self) -> None:
        self._halt.wait(self._start_delay)
        delay = self.config.reconnect.initial_s
        while not self._halt.is_set():
            decoded = self.decoded
            try:
                outcome = self._session()
            except Exception as exc:  # an odd frame or a bug: reported, then reopened; the thread goes on
                log.exception("camera %s failed", self.config.name)
                outcome = f"{type(exc).__name__}: {exc}"[:300]
            if outcome == "ended":
                self._set_state(CameraState.ENDED)
                return
            if outcome == "stopped":
                break
            if self.decoded > decoded:  # it worked for a while: start the backoff afresh
                delay = self.config.reconnect.initial_s
            self.reconnects += 1
            self._set_state(CameraState.RECONNECTING, error=outcome)
            delay = self._backoff(delay)
        self._set_state(CameraState.STOPPED)

    def _session(self) -> str:
        """Open and read until it ends: 'stopped', 'ended', or why it must reopen."""
        self._opening_since = time.monotonic()  # an open can block too (a FIFO, a GStreamer source)
        try:
            capture = self._open()
        except OSError as exc:
            return str(exc)
        finally:
            self._opening_since = None
        try:
            self._set_state(CameraState.CONNECTED)
            self.last_frame = time.monotonic()
            outcome = self._read(capture)
        finally:
            if not self._abandoned:  # an abandoned thread leaves its capture to the process's end
                capture.release()
        return "stream ended or stalled" if outcome == "error" else outcome

    def _backoff(self, delay: float) -> float:
        reconnect = self.config.reconnect
        self._halt.wait(delay * (1 + random.uniform(-reconnect.jitter, reconnect.jitter)))
        return min(delay * 2, reconnect.max_s)

    def _read(self, capture: cv2.VideoCapture) -> str:
        """Read until stopped ('stopped'), the file ends ('ended') or the stream fails ('error')."""
        is_file = _is_file(self.config.source)
        next_due = 0.0
        index = 0
        while not self._halt.is_set():
            cpu = time.thread_time()  # CPU, not wall: a live stream's read mostly waits for the next frame
            ok, frame = capture.read()
            now = time.monotonic()
            self.decode_cpu_s += time.thread_time() - cpu
            if self._halt.is_set():  # stopped or abandoned while the read was blocked
                break
            if not ok:
                if is_file and self.config.loop and capture.set(cv2.CAP_PROP_POS_FRAMES, 0):
                    continue
                return "ended" if is_file else "error"
            self.decoded += 1
            self.last_frame = now
            if self.first_frame is None:
                self.first_frame = now
            with self._settings_lock:
                config = self.config
            index += 1
            if config.paused:
                self._set_state(CameraState.PAUSED)
                continue
            crop = self._crop(frame, config)
            if crop is None:
                continue
            self._set_state(CameraState.CONNECTED)
            if (index - 1) % config.stride:
                continue
            if config.fps:
                if is_file:  # a file decodes far faster than real time: play it at the capped rate
                    self._halt.wait(max(0.0, next_due - now))
                elif now < next_due:  # a live source: drop what comes faster than the cap
                    continue
                next_due = max(next_due + 1.0 / config.fps, time.monotonic() - 1.0 / config.fps)
            self._hand_over(crop)
        return "stopped"

    def _crop(self, frame: np.ndarray, config: CameraConfig) -> np.ndarray | None:
        """The configured region of ``frame`` (a view), or None, with the camera failed, when it does not fit."""
        if not config.region:
            return frame
        x, y, w, h = config.region
        height, width = frame.shape[:2]
        if x + w > width or y + h > height:
            self._set_state(
                CameraState.FAILED,
                error=f"region {x},{y},{w},{h} does not fit the stream's {width}x{height} frames; set a region inside",
            )
            return None
        return frame[y : y + h, x : x + w]

    def _hand_over(self, frame: np.ndarray) -> None:
        started = time.perf_counter()
        preprocess_into(frame, self._spec, self._scratch, "BGR")
        self.preprocess_s += time.perf_counter() - started
        self.preprocessed += 1
        self._seq += 1
        info = FrameInfo(self.config.name, self._seq, time.time(), time.monotonic())
        self._queue.put(info, self._scratch)
