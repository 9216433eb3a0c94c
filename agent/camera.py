"""One capture thread per camera: open, read, throttle, preprocess, hand over, recover.

A camera that errors, ends or stalls (no frame for ``stall_timeout_s``) is reopened
with exponential backoff and jitter, in its own thread, so the other cameras never
notice. Files end (state ``ended``) unless ``loop`` is set. FFmpeg-backed sources
get OpenCV's open/read timeouts so a dead network stream cannot block a read
forever; the watchdog in :meth:`Camera.stalled` covers the other backends.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from enum import Enum

import cv2
import numpy as np

from agent.config import CameraConfig
from agent.frames import FrameInfo, FrameQueue
from agent.preprocess import InputSpec, preprocess_into

log = logging.getLogger("edgevit.camera")

BACKENDS = {"auto": cv2.CAP_ANY, "ffmpeg": cv2.CAP_FFMPEG, "v4l2": cv2.CAP_V4L2, "gstreamer": cv2.CAP_GSTREAMER}


class CameraState(str, Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    PAUSED = "paused"
    STOPPED = "stopped"


def _is_file(source: str | int) -> bool:
    return isinstance(source, str) and "://" not in source and "!" not in source and not source.startswith("/dev/")


class Camera(threading.Thread):
    def __init__(
        self, config: CameraConfig, spec: InputSpec, queue: FrameQueue, on_event: Callable[[str, dict], None]
    ) -> None:
        super().__init__(name=f"camera-{config.name}", daemon=True)
        self.config = config
        self._spec, self._queue, self._on_event = spec, queue, on_event
        self._scratch = np.empty((spec.height, spec.width, 3), np.uint8)
        self._halt = threading.Event()
        self._settings_lock = threading.Lock()
        self.state = CameraState.CONNECTING
        self.decoded = 0
        self.reconnects = 0
        self.last_frame = time.monotonic()
        self._seq = 0

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._halt.set()

    def update(self, config: CameraConfig) -> None:
        """Apply new throttling/region/pause settings; a new source needs a new Camera."""
        with self._settings_lock:
            self.config = config

    def stalled(self, now: float) -> bool:
        return self.state == CameraState.CONNECTED and now - self.last_frame > self.config.stall_timeout_s

    # -- thread --------------------------------------------------------------------------------
    def _set_state(self, state: CameraState, **detail: object) -> None:
        if state != self.state:
            self.state = state
            self._on_event("camera", {"camera": self.config.name, "state": state.value, **detail})

    def _open(self) -> cv2.VideoCapture:
        source, backend = self.config.source, BACKENDS[self.config.backend]
        timeout_ms = int(self.config.stall_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        capture = cv2.VideoCapture(source, backend, params)
        if not capture.isOpened():
            capture.release()
            raise OSError(f"cannot open {source!r}")
        return capture

    def run(self) -> None:
        delay = self.config.reconnect.initial_s
        while not self._halt.is_set():
            try:
                capture = self._open()
            except OSError as exc:
                self._set_state(CameraState.RECONNECTING, error=str(exc))
                delay = self._backoff(delay)
                self.reconnects += 1
                continue
            self._set_state(CameraState.CONNECTED)
            self.last_frame = time.monotonic()
            outcome = self._read(capture)
            capture.release()
            if outcome == "ended":
                self._set_state(CameraState.ENDED)
                return
            if outcome == "error":
                self.reconnects += 1
                self._set_state(CameraState.RECONNECTING, error="stream ended or stalled")
                delay = self._backoff(self.config.reconnect.initial_s)
        self._set_state(CameraState.STOPPED)

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
            ok, frame = capture.read()
            now = time.monotonic()
            if not ok:
                if is_file and self.config.loop and capture.set(cv2.CAP_PROP_POS_FRAMES, 0):
                    continue
                return "ended" if is_file else "error"
            self.decoded += 1
            self.last_frame = now
            with self._settings_lock:
                config = self.config
            index += 1
            if config.paused:
                self._set_state(CameraState.PAUSED)
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
            self._hand_over(frame, config)
        return "stopped"

    def _hand_over(self, frame: np.ndarray, config: CameraConfig) -> None:
        if config.region:
            x, y, w, h = config.region
            frame = frame[y : y + h, x : x + w]
        preprocess_into(frame, self._spec, self._scratch, "BGR")
        self._seq += 1
        info = FrameInfo(config.name, self._seq, time.time(), time.monotonic())
        self._queue.put(info, self._scratch)
