"""``edgevit-agent``: the on-device daemon.

Start-up refuses, with a message naming the cause, a bad config, a bundle that fails
verification or is incompatible with this device, and an engine that does not
reproduce its golden set. Then: READY=1 to systemd, WATCHDOG=1 only while the
pipeline is not stalled, SIGHUP or a change to the config file reloads what can
change without a restart (batching, cameras, results, printing), SIGTERM drains the
batch in flight and flushes the outputs. Without an ``mqtt`` section the agent runs
standalone, printing live throughput and latency.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.bundle import Bundle, BundleError, verify_bundle
from agent.commands import CommandHandler
from agent.config import AgentConfig, ConfigError, load_config
from agent.device import DeviceInfo
from agent.golden import check_golden
from agent.metrics import Metrics
from agent.mqtt import MqttLink
from agent.outbox import Outbox
from agent.pipeline import Pipeline
from agent.results import JsonlSink, ResultSink
from agent.runtimes import Engine, EngineError, open_engine
from agent.signing import SignatureError, load_public_key
from agent.systemd import notify, watchdog_period

log = logging.getLogger("edgevit.agent")
EXIT_BAD_START = 2
RESTART_ONLY = ("device", "state_dir", "engine", "mqtt")  # sections a reload cannot change


class StartupError(Exception):
    """The agent cannot start; the message says why."""


def load_engine(config: AgentConfig) -> tuple[Bundle, Engine]:
    """Verify the configured bundle for this device, open its engine, check its golden set."""
    try:
        keys = [load_public_key(p) for p in config.engine.trusted_keys] if config.engine.require_signature else None
        bundle = verify_bundle(config.engine.bundle, keys, DeviceInfo.probe())
        target = "tensorrt-ep" if config.engine.onnxruntime_tensorrt and bundle.target == "cuda" else bundle.target
        engine = open_engine(bundle.backend, target, bundle.engine_path, bundle.batch_range[1], config.engine.threads)
    except (BundleError, SignatureError, EngineError) as exc:
        raise StartupError(str(exc)) from exc
    golden = check_golden(engine, bundle.golden_path, bundle.batch_range[1])
    if not golden.passed:
        engine.close()
        raise StartupError(f"engine {bundle.bundle_id} does not reproduce its golden set here: {golden.summary()}")
    log.info("engine %s loaded (%s)", bundle.bundle_id, golden.summary())
    return bundle, engine


class ConfigWatcher(FileSystemEventHandler):
    """Sets ``changed`` when the config file is written or replaced (editors often rename)."""

    def __init__(self, path: Path, changed: threading.Event) -> None:
        self._path, self._changed = path.resolve(), changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = {Path(str(event.src_path)).resolve(), Path(str(getattr(event, "dest_path", "") or "")).resolve()}
        if self._path in paths and event.event_type in ("modified", "created", "moved", "closed"):
            self._changed.set()


class Agent:
    def __init__(self, config_path: Path, config: AgentConfig) -> None:
        self.config_path, self.config = config_path, config
        self.bundle, self.engine = load_engine(config)
        self.link = None
        if config.mqtt:
            try:
                outbox = Outbox(config.state_dir / "outbox.sqlite", config.mqtt.outbox_max_results)
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(f"cannot open the outbox in state_dir {config.state_dir}: {exc}") from exc
            self.link = MqttLink(config.mqtt, config.device, outbox)
        sinks: list[ResultSink] = [JsonlSink(config.results.jsonl)] if config.results.jsonl else []
        if self.link:
            sinks.append(self.link)
        self.pipeline = Pipeline(config, self.bundle, self.engine, sinks, self.event)
        self.metrics: Metrics = self.pipeline.metrics
        self.stop = threading.Event()
        self.reload = threading.Event()
        self._config_lock = threading.Lock()
        if self.link:
            self.link.on_command = CommandHandler(
                lambda: self.config, self.apply_config, self.status, self.installed
            ).handle

    def apply_config(self, new: AgentConfig) -> None:
        """The one way settings change at run time (reload or command)."""
        with self._config_lock:
            self.pipeline.apply(new)
            self.config = new

    def status(self) -> dict[str, Any]:
        config, states = self.config, self.pipeline.camera_states()
        return {
            "engine": self.bundle.bundle_id,
            "batching": config.batching.model_dump(mode="json"),
            "cameras": {c.name: {"paused": c.paused, **states[c.name]} for c in config.cameras if c.name in states},
            "latency": self.metrics.percentiles(),
        }

    def installed(self) -> list[dict[str, Any]]:
        accuracy = self.bundle.passport["accuracy"]
        return [
            {
                "bundle_id": self.bundle.bundle_id,
                "active": True,
                "top1": accuracy["engine_top1"],
                "agreement": accuracy["top1_agreement"],
            }
        ]

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        log.info("%s event: %s", kind, detail)
        if self.link:
            self.link.event({"event": kind, "at": time.time(), **detail})

    def apply_reload(self) -> None:
        self.reload.clear()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.event("config", {"reloaded": False, "error": str(exc)})
            return
        needs_restart = [s for s in RESTART_ONLY if getattr(new, s) != getattr(self.config, s)]
        if new.metrics.prometheus_port != self.config.metrics.prometheus_port:
            needs_restart.append("metrics.prometheus_port")
        if needs_restart:
            log.warning("changes to %s take effect after a restart", ", ".join(needs_restart))
        self.apply_config(new)
        self.event("config", {"reloaded": True, "restart_needed_for": needs_restart})

    def live_line(self, snapshot: dict[str, Any]) -> str:
        cams = snapshot["cameras"]
        processed = sum(c["processed_fps"] for c in cams.values())
        lat = snapshot["latency"]
        states = " ".join(f"{n}={c['state']}" for n, c in cams.items())
        skipped = sum(c["skipped"] for c in cams.values())
        shed = sum(c["shed"] for c in cams.values())
        return (
            f"{processed:7.1f} frames/s | latency p50 {lat['p50_ms']} ms p99 {lat['p99_ms']} ms "
            f"| batch {snapshot['decision']['batch']} | skipped {skipped} shed {shed} | {states}"
        )

    def run(self, duration: float | None) -> None:
        port = self.config.metrics.prometheus_port
        if port:
            self.metrics.serve(self.pipeline, port)
        self.pipeline.start()
        notify(f"READY=1\nSTATUS=serving {self.bundle.bundle_id}")
        observer = Observer()
        observer.schedule(ConfigWatcher(self.config_path, self.reload), str(self.config_path.parent.resolve()))
        observer.start()
        period = watchdog_period()
        started = last_pet = last_publish = last_print = time.monotonic()
        try:
            while not self.stop.wait(0.1):
                now = time.monotonic()
                if self.reload.is_set():
                    self.apply_reload()
                stall_after = max(1.0, 10 * self.config.batching.latency_budget_ms / 1e3)
                if period and now - last_pet >= period and self.pipeline.healthy(now, stall_after):
                    notify("WATCHDOG=1")
                    last_pet = now
                metrics_cfg = self.config.metrics
                if self.link and now - last_publish >= metrics_cfg.publish_every_s:
                    outbox = {"depth": self.link.outbox.depth(), "dropped_results": self.link.outbox.dropped_results()}
                    self.link.publish_metrics({**self.metrics.snapshot(self.pipeline), "outbox": outbox})
                    last_publish = now
                if metrics_cfg.print_every_s and now - last_print >= metrics_cfg.print_every_s:
                    print(self.live_line(self.metrics.snapshot(self.pipeline)), flush=True)
                    last_print = now
                if self.config.exit_when_sources_end and self.pipeline.sources_ended():
                    break
                if duration and now - started >= duration:
                    break
        finally:
            notify("STOPPING=1")
            observer.stop()
            observer.join()
            self.pipeline.stop(drain=True)
            self.engine.close()
            summary = self.metrics.snapshot(self.pipeline)
            print(json.dumps({"summary": summary}), flush=True)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="edgevit-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    root.add_argument("--config", type=Path, required=True)
    root.add_argument("--check", action="store_true", help="validate config, bundle and engine, then exit")
    root.add_argument("--duration", type=float, help="stop after this many seconds (benchmarks, tests)")
    root.add_argument("--log-level", default="INFO")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        agent = Agent(args.config, config)
    except (ConfigError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_START
    if args.check:
        print(f"ok: config valid, {agent.bundle.bundle_id} verified and golden set reproduced")
        agent.engine.close()
        return 0
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: agent.reload.set())
    agent.run(args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
