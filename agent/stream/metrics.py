"""Pipeline metrics: one set of figures, read two ways.

Prometheus scrapes them (text format on a local port) through a custom collector
that reads the pipeline's own counters at scrape time, so nothing is counted twice;
:meth:`Metrics.snapshot` turns the same state into the JSON published to
``<prefix>/<device>/metrics`` and printed in standalone mode, with rates computed
between snapshots.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from agent.engine.jetson import TegraStats


class Pipeline(Protocol):
    """What the metrics read of the pipeline, at snapshot and scrape time (the pipeline imports this module)."""

    queue: Any  # FrameQueue: depth()
    serving: Any  # Serving: bundle, engine, drift

    def camera_states(self) -> dict[str, dict[str, Any]]: ...

    def decision_summary(self) -> dict[str, float]: ...

    def inference_state(self, now: float) -> dict[str, Any]: ...


DRIFT_GAUGES = {
    "mean_confidence": "Mean top-1 confidence over the live window",
    "confidence_drift": "Live mean top-1 confidence minus the passport's",
    "class_mix_distance": "Total variation distance between live and passport class mix",
}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latencies: collections.deque[float] = collections.deque(maxlen=4096)  # seconds, frame to result
        self.latency_buckets = np.zeros(len(LATENCY_BUCKETS) + 1, np.int64)
        self.latency_sum = 0.0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.engine_seconds: dict[int, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        self.engine_errors = 0
        self._previous: dict[str, Any] = {}
        self._started = time.monotonic()
        self.jetson: TegraStats | None = None  # set by the daemon on a Jetson
        self.power_mode: str | None = None

    def record_batch(self, batch: int, engine_s: float, frame_latencies: np.ndarray) -> None:
        with self._lock:
            self.batch_sizes[batch] += 1
            total = self.engine_seconds[batch]
            total[0] += engine_s
            total[1] += 1
            self.latencies.extend(frame_latencies.tolist())
            self.latency_buckets += np.bincount(
                np.searchsorted(LATENCY_BUCKETS, frame_latencies), minlength=len(self.latency_buckets)
            )
            self.latency_sum += float(frame_latencies.sum())

    def percentiles(self) -> dict[str, float | None]:
        with self._lock:
            window = np.asarray(self.latencies)
        if not len(window):
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
        p50, p95, p99 = np.percentile(window, [50, 95, 99]) * 1e3
        return {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2)}

    def snapshot(self, pipeline: Pipeline, whole_run: bool = False) -> dict[str, Any]:
        """Per-camera rates, latency percentiles, batching, process.

        Rates are over the interval since the previous snapshot (the live lines), or with
        ``whole_run`` over each camera's active span, first frame to latest result (the closing
        summary): a last interval cut short by the end of a file would say neither.
        """
        now = time.monotonic()
        interval = max(now - self._previous.get("at", self._started), 1e-6)
        cameras = {}
        for name, state in pipeline.camera_states().items():
            counts = state["counts"]
            before = {} if whole_run else self._previous.get(name, {})
            elapsed = max(state["active_s"], 1e-6) if whole_run else interval
            rates = {f"{k}_fps": round((v - before.get(k, 0)) / elapsed, 2) for k, v in counts.items()}
            health = {k: state[k] for k in ("state", "decode", "error", "reconnects", "restarts", "active_s")}
            cost, cost_before = state["cost"], before.get("cost", {})
            decoded = counts["decoded"] - before.get("decoded", 0)
            prepped = cost["preprocessed"] - cost_before.get("preprocessed", 0)
            side = {  # per frame over the interval: decode CPU (the decoder process) and preprocessing
                "decode_cpu_ms": round((cost["decode_cpu_s"] - cost_before.get("decode_cpu_s", 0)) / decoded * 1e3, 3)
                if decoded
                else None,
                "preprocess_ms": round((cost["preprocess_s"] - cost_before.get("preprocess_s", 0)) / prepped * 1e3, 3)
                if prepped
                else None,
            }
            cameras[name] = {**health, **counts, **rates, **side}
            self._previous[name] = {**counts, "cost": cost}
        self._previous["at"] = now
        with self._lock:
            engine = {str(b): round(s / n * 1e3, 3) for b, (s, n) in sorted(self.engine_seconds.items()) if n}
            batches = {str(b): n for b, n in sorted(self.batch_sizes.items())}
            errors = self.engine_errors
        times = os.times()
        return {
            "cameras": cameras,
            "latency": self.percentiles(),
            "engine_ms_by_batch": engine,
            "batch_sizes": batches,
            "engine_errors": errors,
            "inference": pipeline.inference_state(now),
            "queue_depth": pipeline.queue.depth(),
            "engine": {"bundle_id": pipeline.serving.bundle.bundle_id, "worker_restarts": _restarts(pipeline)},
            "drift": pipeline.serving.drift.snapshot(),
            "decision": pipeline.decision_summary(),
            "process": {"cpu_s": round(times.user + times.system, 2), "rss_mib": round(_rss_mib(), 1)},
            **({"jetson": {**self.jetson.snapshot(), "power_mode": self.power_mode}} if self.jetson else {}),
        }

    def collector(self, pipeline: Pipeline) -> _Collector:
        return _Collector(self, pipeline)

    def serve(self, pipeline: Pipeline, port: int) -> CollectorRegistry:
        registry = CollectorRegistry()
        registry.register(self.collector(pipeline))
        ProcessCollector(registry=registry)
        start_http_server(port, addr="127.0.0.1", registry=registry)
        return registry


def jetson_families(stats: dict[str, Any], mode: str | None) -> list[Any]:
    """tegrastats' latest figures (and the nvpmodel mode) as Prometheus metrics."""
    families: list[Any] = []
    for key, name, help_text in (
        ("gpu_load_pct", "edgevit_jetson_gpu_load_percent", "GPU (GR3D) load"),
        ("emc_load_pct", "edgevit_jetson_emc_load_percent", "Memory controller load"),
        ("ram_used_mib", "edgevit_jetson_ram_used_mib", "RAM in use, CPU and GPU (unified memory)"),
        ("ram_total_mib", "edgevit_jetson_ram_total_mib", "RAM available to applications"),
    ):
        if key in stats:
            families.append(GaugeMetricFamily(name, help_text, value=stats[key]))
    temperature = GaugeMetricFamily("edgevit_jetson_temperature_celsius", "Thermal sensors", labels=["sensor"])
    for sensor, value in stats.get("temperature_c", {}).items():
        temperature.add_metric([sensor], value)
    power = GaugeMetricFamily("edgevit_jetson_power_milliwatts", "Power rails, instantaneous", labels=["rail"])
    for rail, value in stats.get("power_mw", {}).items():
        power.add_metric([rail], value)
    families += [temperature, power]
    if mode:
        info = GaugeMetricFamily("edgevit_jetson_power_mode", "nvpmodel power mode", labels=["mode"])
        info.add_metric([mode], 1.0)
        families.append(info)
    return families


def _restarts(pipeline: Pipeline) -> int:
    return getattr(pipeline.serving.engine, "restarts", 0)


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class _Collector:
    def __init__(self, metrics: Metrics, pipeline: Pipeline) -> None:
        self._metrics, self._pipeline = metrics, pipeline

    def collect(self) -> Iterator[Metric]:
        frames = CounterMetricFamily("edgevit_frames", "Frames per camera by fate", labels=["camera", "kind"])
        reconnects = CounterMetricFamily("edgevit_camera_reconnects", "Camera reconnects", labels=["camera"])
        decode = CounterMetricFamily(
            "edgevit_camera_decode_cpu_seconds",
            "CPU time of the camera's decoder process (reading, FFmpeg's decoder threads), preprocessing excluded",
            labels=["camera"],
        )
        preprocess = CounterMetricFamily(
            "edgevit_camera_preprocess_seconds",
            "Time spent cropping, resizing and converting frames",
            labels=["camera"],
        )
        restarts = CounterMetricFamily(
            "edgevit_camera_restarts",
            "Camera decoders restarted (stuck in an open or a read, or exited)",
            labels=["camera"],
        )
        connected = GaugeMetricFamily(
            "edgevit_camera_connected", "1 when the camera delivers frames", labels=["camera", "state"]
        )
        for name, state in self._pipeline.camera_states().items():
            for kind, value in state["counts"].items():
                frames.add_metric([name, kind], value)
            reconnects.add_metric([name], state["reconnects"])
            restarts.add_metric([name], state["restarts"])
            decode.add_metric([name], state["cost"]["decode_cpu_s"])
            preprocess.add_metric([name], state["cost"]["preprocess_s"])
            connected.add_metric([name, state["state"]], 1.0 if state["state"] == "connected" else 0.0)
        yield from (frames, reconnects, restarts, decode, preprocess, connected)
        inference = self._pipeline.inference_state(time.monotonic())
        yield GaugeMetricFamily(
            "edgevit_inference_alive", "1 while the inference thread runs", value=inference["alive"]
        )
        yield CounterMetricFamily(
            "edgevit_inference_failures", "Inference steps that failed unexpectedly", value=inference["failures"]
        )
        m = self._metrics
        with m._lock:
            cumulative = np.cumsum(m.latency_buckets).tolist()
            buckets = [(str(b), c) for b, c in zip(LATENCY_BUCKETS, cumulative, strict=False)]
            buckets.append(("+Inf", cumulative[-1]))
            latency_sum = m.latency_sum
            batch_sizes = dict(m.batch_sizes)
            engine = {b: tuple(v) for b, v in m.engine_seconds.items()}
            errors = m.engine_errors
        yield HistogramMetricFamily(
            "edgevit_frame_latency_seconds", "Frame capture to result", buckets=buckets, sum_value=latency_sum
        )
        sizes = CounterMetricFamily("edgevit_batches", "Batches run, by size", labels=["size"])
        seconds = CounterMetricFamily("edgevit_engine_seconds", "Engine time, by batch size", labels=["size"])
        for b in sorted(batch_sizes):
            sizes.add_metric([str(b)], batch_sizes[b])
            seconds.add_metric([str(b)], engine[b][0])
        yield from (sizes, seconds)
        yield CounterMetricFamily("edgevit_engine_errors", "Batches the engine failed", value=errors)
        yield GaugeMetricFamily(
            "edgevit_queue_depth", "Frames waiting for the engine", value=self._pipeline.queue.depth()
        )
        serving = self._pipeline.serving
        info = GaugeMetricFamily("edgevit_engine_info", "The engine in service", labels=["bundle_id"])
        info.add_metric([serving.bundle.bundle_id], 1.0)
        yield info
        drift = serving.drift.snapshot()
        for key, help_text in DRIFT_GAUGES.items():
            if key in drift:
                yield GaugeMetricFamily(f"edgevit_{key}", help_text, value=drift[key])
        if self._metrics.jetson is not None:
            yield from jetson_families(self._metrics.jetson.latest, self._metrics.power_mode)
