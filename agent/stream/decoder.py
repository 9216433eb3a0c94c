"""One camera's decoder process: open, read, throttle, crop, preprocess, send; reopen with backoff.

Each camera decodes in a process of its own (``python -m agent.stream.decoder``), so that one
camera's open, hang or crash cannot delay another's: OpenCV's FFmpeg backend serializes opens
process-wide and an RTSP server that accepts and never answers holds an open for its whole
timeout; a GStreamer or V4L2 read can block for good; a malformed stream can crash FFmpeg. The
agent's side (:mod:`agent.stream.camera`) kills and restarts a decoder that goes quiet. This
module imports only OpenCV, NumPy and the shared preprocessing, and the source (which may carry
a password) arrives on stdin, never on the command line where every local user could read it.

Frames leave preprocessed, at the engine's input size, so the pipe carries the engine's input
rather than the camera's full frames, and decoding, its FFmpeg threads and preprocessing are all
this process's CPU time, which is what the agent reports as the camera's cost.

Protocol. stdin carries JSON lines: first ``{"camera": settings, "spec": input spec}``, then new
settings whenever the operator changes them; EOF means the agent is gone, and the process exits
at once, even from inside a blocked read. stdout carries messages of a fixed header
(:data:`HEADER`: kind, payload length, the counters) and a payload: the preprocessed frame for
``FRAME``, a JSON state for ``STATE``, nothing for ``BEAT`` (frames read but not sent: paused,
throttled, a region that does not fit) which tells the agent the decoder is alive.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import sys
import threading
import time
from typing import Any, BinaryIO

import cv2
import numpy as np

from agent.engine.preprocess import InputSpec, preprocess_into

# kind, payload bytes, decoded, reconnects, process CPU s, preprocess s, preprocessed, captured (epoch s)
HEADER = struct.Struct("<cIQIddQd")
FRAME, STATE, BEAT = b"F", b"S", b"B"
BEAT_EVERY_S = 0.5
BACKENDS = {"auto": cv2.CAP_ANY, "ffmpeg": cv2.CAP_FFMPEG, "v4l2": cv2.CAP_V4L2, "gstreamer": cv2.CAP_GSTREAMER}
# hw_decode through OpenCV's FFmpeg backend (needs an OpenCV built with it; pip's wheels have none)
FFMPEG_ACCELERATION = {"vaapi": cv2.VIDEO_ACCELERATION_VAAPI, "mfx": cv2.VIDEO_ACCELERATION_MFX}
ACCELERATION_NAMES = {
    cv2.VIDEO_ACCELERATION_NONE: "software",
    cv2.VIDEO_ACCELERATION_VAAPI: "vaapi",
    cv2.VIDEO_ACCELERATION_MFX: "mfx",
    cv2.VIDEO_ACCELERATION_D3D11: "d3d11",
}
APPSINK = "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=2 sync=false"


def _is_file(source: str | int) -> bool:
    return isinstance(source, str) and "://" not in source and "!" not in source and not source.startswith("/dev/")


def gstreamer_pipeline(source: str, hw_decode: str, transport: str) -> str:
    """A GStreamer pipeline that decodes ``source`` on the device's video hardware into BGR frames.

    ``jetson``: NVDEC through ``nvv4l2decoder`` (chosen by decodebin on JetPack) and ``nvvidconv``
    out of NVMM memory. ``nvcodec``: NVIDIA's decoders on x86 (gst-plugins-bad's nvcodec, which
    decodebin prefers when it is installed).
    """
    if source.lower().startswith("rtsp"):
        protocols = f" protocols={transport}" if transport in ("tcp", "udp") else ""
        head = f'rtspsrc location="{source}" latency=200{protocols} ! decodebin'
    else:
        uri = source if "://" in source else "file://" + os.path.abspath(source)
        head = f'uridecodebin uri="{uri}"'
    convert = " ! nvvidconv ! video/x-raw,format=BGRx ! " if hw_decode == "jetson" else " ! "
    return head + convert + APPSINK


class Decoder:
    def __init__(self, settings: dict[str, Any], spec: InputSpec, out: BinaryIO) -> None:
        self.settings = settings
        self.spec = spec
        self._out = out
        self._message = bytearray(HEADER.size + spec.height * spec.width * 3)
        self._frame = np.frombuffer(self._message, np.uint8, offset=HEADER.size).reshape(spec.height, spec.width, 3)
        self._wake = threading.Event()  # new settings: a throttled wait ends early
        self.decoded = self.reconnects = self.preprocessed = 0
        self.preprocess_s = 0.0
        self._last_beat = 0.0

    # -- what the agent reads -----------------------------------------------------------------
    def _pack(self, kind: bytes, payload: int, captured: float = 0.0) -> None:
        HEADER.pack_into(
            self._message,
            0,
            kind,
            payload,
            self.decoded,
            self.reconnects,
            time.process_time(),  # every thread of this process: FFmpeg's decoder threads count
            self.preprocess_s,
            self.preprocessed,
            captured,
        )
        self._last_beat = time.monotonic()

    def _send(self, kind: bytes, payload: int, captured: float = 0.0) -> None:
        self._pack(kind, payload, captured)
        self._out.write(memoryview(self._message)[: HEADER.size + payload])
        self._out.flush()

    def state(self, state: str, **detail: Any) -> None:
        text = json.dumps({"state": state, **detail}).encode()
        self._pack(STATE, len(text))
        self._out.write(bytes(self._message[: HEADER.size]) + text)  # rare: the frame area stays untouched
        self._out.flush()

    def _beat(self, now: float) -> None:
        if now - self._last_beat >= BEAT_EVERY_S:
            self._send(BEAT, 0)

    # -- reading ----------------------------------------------------------------------------------
    def update(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self._wake.set()

    def run(self) -> None:
        """Open and read until the file ends; a stream that fails is reopened with backoff and jitter."""
        delay = self.settings["reconnect"]["initial_s"]
        while True:
            decoded = self.decoded
            try:
                outcome = self._session()
            except Exception as exc:  # an odd frame or a bug: reported, then reopened
                outcome = f"{type(exc).__name__}: {exc}"[:300]
            if outcome == "ended":
                self.state("ended")
                return
            if self.decoded > decoded:  # it worked for a while: start the backoff afresh
                delay = self.settings["reconnect"]["initial_s"]
            self.reconnects += 1
            reconnect = self.settings["reconnect"]
            wait = delay * (1 + random.uniform(-reconnect["jitter"], reconnect["jitter"]))
            self.state("reconnecting", error=outcome, retry_in_s=round(wait, 3))
            time.sleep(wait)
            delay = min(delay * 2, reconnect["max_s"])

    def _open(self) -> tuple[cv2.VideoCapture, str]:
        settings = self.settings
        source, transport, hw = settings["source"], settings["rtsp_transport"], settings["hw_decode"]
        timeout_ms = int(settings["stall_timeout_s"] * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        if hw in ("jetson", "nvcodec") and isinstance(source, str) and " ! " not in source:
            capture = cv2.VideoCapture(gstreamer_pipeline(source, hw, transport), cv2.CAP_GSTREAMER)
            decode = f"{hw} (gstreamer)"
        else:
            if hw in FFMPEG_ACCELERATION:
                params += [cv2.CAP_PROP_HW_ACCELERATION, FFMPEG_ACCELERATION[hw]]
            if transport != "auto" and str(source).lower().startswith("rtsp"):  # this process's own setting
                os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;{transport}"
            capture = cv2.VideoCapture(source, BACKENDS[settings["backend"]], params)
            used = int(capture.get(cv2.CAP_PROP_HW_ACCELERATION)) if capture.isOpened() else 0
            decode = ACCELERATION_NAMES.get(used, "software")
        if not capture.isOpened():
            capture.release()
            raise OSError(f"cannot open {source!r}")  # the agent masks credentials before it reports this
        return capture, decode

    def _session(self) -> str:
        self.state("opening")
        try:
            capture, decode = self._open()
        except OSError as exc:
            return str(exc)
        try:
            self.state("connected", decode=decode)
            return self._read(capture)
        finally:
            capture.release()

    def _read(self, capture: cv2.VideoCapture) -> str:
        """Read until the file ends ('ended') or the stream fails (why)."""
        file = _is_file(self.settings["source"])
        next_due = 0.0
        index = 0
        state = "connected"
        while True:
            ok, frame = capture.read()
            now = time.monotonic()
            captured = time.time()
            if not ok:
                if file and self.settings["loop"] and capture.set(cv2.CAP_PROP_POS_FRAMES, 0):
                    continue
                return "ended" if file else "stream ended or stalled"
            self.decoded += 1
            settings = self.settings
            index += 1
            if settings["paused"]:
                state = self._change(state, "paused")
                self._beat(now)
                continue
            crop, problem = self._crop(frame, settings["region"])
            if crop is None:
                state = self._change(state, "failed", problem)
                self._beat(now)
                continue
            state = self._change(state, "connected")
            if (index - 1) % settings["stride"]:
                self._beat(now)
                continue
            fps = settings["fps"]
            if fps:
                if file:  # a file decodes far faster than real time: play it at the capped rate
                    self._wake.clear()
                    self._wake.wait(max(0.0, next_due - now))
                elif now < next_due:  # a live source: drop what comes faster than the cap
                    self._beat(now)
                    continue
                next_due = max(next_due + 1.0 / fps, time.monotonic() - 1.0 / fps)
            started = time.perf_counter()
            preprocess_into(crop, self.spec, self._frame, "BGR")
            self.preprocess_s += time.perf_counter() - started
            self.preprocessed += 1
            self._send(FRAME, self._frame.nbytes, captured)

    def _change(self, state: str, new: str, error: str | None = None) -> str:
        if new != state:
            self.state(new, **({"error": error} if error else {}))
        return new

    @staticmethod
    def _crop(frame: np.ndarray, region: list[int] | None) -> tuple[np.ndarray | None, str | None]:
        """The configured region of ``frame`` (a view), or None and why it does not fit."""
        if not region:
            return frame, None
        x, y, w, h = region
        height, width = frame.shape[:2]
        if x + w > width or y + h > height:
            return (
                None,
                f"region {x},{y},{w},{h} does not fit the stream's {width}x{height} frames; set a region inside",
            )
        return frame[y : y + h, x : x + w], None


def _follow_settings(decoder: Decoder, lines: BinaryIO) -> None:
    """New settings from the agent; EOF (the agent stopped or died) ends the process at once."""
    for line in lines:
        decoder.update(json.loads(line))
    os._exit(0)


def main() -> None:
    # the agent stops its decoders (stdin's EOF, or SIGKILL); a terminal's Ctrl-C or systemd's SIGTERM to the
    # whole group must not make them look crashed while the agent is stopping
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    first = json.loads(sys.stdin.buffer.readline() or "null")
    if first is None:
        return
    decoder = Decoder(first["camera"], InputSpec(**first["spec"]), sys.stdout.buffer)
    threading.Thread(target=_follow_settings, args=(decoder, sys.stdin.buffer), daemon=True).start()
    try:
        decoder.run()
    except BrokenPipeError:  # the agent closed its end
        pass
    os._exit(0)  # a capture stuck in a read must not hold the exit


if __name__ == "__main__":
    main()
