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
import faulthandler
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

from agent.command_line import new_parser
from agent.config import AgentConfig, ConfigError, load_config
from agent.control.command_auth import CommandVerifier
from agent.control.commands import CommandError, CommandHandler
from agent.control.mqtt import MqttLink
from agent.control.outbox import Outbox
from agent.control.status import StatusReport
from agent.engine.bundle import Bundle
from agent.engine.jetson import TegraStats, power_mode
from agent.engine.signing import SignatureError, load_public_key
from agent.engine.worker import remove_stale_buffers
from agent.lifecycle.fetch import BundleRef
from agent.lifecycle.inbox import Inbox
from agent.lifecycle.lifecycle import Lifecycle, LifecycleError
from agent.lifecycle.store import StoreError
from agent.stream.camera import unusable_sources
from agent.stream.metrics import Metrics
from agent.stream.pipeline import Pipeline
from agent.stream.results import JsonlSink, ResultSink
from agent.systemd import notify, watchdog_period

log = logging.getLogger("edgevit.agent")
EXIT_BAD_START = 2
RESTART_ONLY = ("device", "state_dir", "engine", "mqtt", "swap", "canary")  # a reload cannot change these
LIVE_LINE_COLUMNS = 79  # a terminal of 80 wraps a line that fills it
INBOX_RESCAN_S = 1.0  # inbox items wait to settle, so the inbox is rescanned, not only watched


class StartupError(Exception):
    """The agent cannot start; the message says why."""


class FolderWatcher(FileSystemEventHandler):
    """Sets ``changed`` on a change to one of ``paths`` or to anything directly in one of ``folders``."""

    def __init__(self, changed: threading.Event, paths: tuple[Path, ...] = (), folders: tuple[Path, ...] = ()) -> None:
        self._paths = {p.resolve() for p in paths}
        self._folders = {f.resolve() for f in folders}
        self._changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = Path(str(raw)).resolve() if raw else None
            if path and (path in self._paths or path.parent in self._folders):
                self._changed.set()


class Agent:
    def __init__(self, config_path: Path, config: AgentConfig) -> None:
        self.config_path, self.config = config_path, config
        self.link: MqttLink | None = None
        self.report: StatusReport | None = None
        remove_stale_buffers()
        if problems := unusable_sources(config.cameras):
            raise StartupError("; ".join(problems))
        try:
            if config.mqtt:
                outbox = Outbox(config.state_dir / "outbox.sqlite", config.mqtt.outbox_max_results)
                self.link = MqttLink(config.mqtt, config.device, outbox, config.labels)
            self.lifecycle = Lifecycle(config, self.event)
            if self.link:
                self.report = StatusReport(self.link, lambda: self.lifecycle.state, time.time)
            serving = self.lifecycle.boot()
            auth = config.mqtt.signed_commands if config.mqtt else None
            verifier = auth and CommandVerifier(
                [load_public_key(k) for k in auth.keys], auth.max_age_s, config.state_dir / "nonces.sqlite"
            )
            self._commands = CommandHandler(self, verifier or None, config.state_dir / "commands.sqlite")
        except (OSError, sqlite3.Error) as exc:
            raise StartupError(f"cannot use state_dir {config.state_dir}: {exc}") from exc
        except (LifecycleError, StoreError, SignatureError) as exc:
            raise StartupError(str(exc)) from exc
        sinks: list[ResultSink] = [JsonlSink(config.results.jsonl)] if config.results.jsonl else []
        if self.link:
            sinks.append(self.link)
        self.pipeline = Pipeline(config, serving, sinks, self.event)
        self.metrics: Metrics = self.pipeline.metrics
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.inbox_changed = threading.Event()
        self._config_lock = threading.Lock()

    @property
    def bundle(self) -> Bundle:
        return self.pipeline.bundle

    def apply_config(self, new: AgentConfig) -> None:
        """The one way settings change at run time (reload or command)."""
        with self._config_lock:
            self.pipeline.apply(new)
            self.config = new

    def deploy(self, ref: BundleRef, force: bool, command_id: str) -> dict[str, Any]:
        try:
            self.lifecycle.request_deploy(ref, force, command_id)
        except LifecycleError as exc:
            raise CommandError(str(exc)) from None
        return {"accepted": True, "bundle": ref.describe()}

    def rollback(self, bundle_id: str | None, force: bool, command_id: str) -> dict[str, Any]:
        try:
            target = self.lifecycle.request_rollback(bundle_id, force, command_id)
        except LifecycleError as exc:
            raise CommandError(str(exc)) from None
        return {"accepted": True, "to": target}

    def status(self) -> dict[str, Any]:
        config, states = self.config, self.pipeline.camera_states()
        return {
            "engine": self.bundle.bundle_id,
            "lifecycle": self.lifecycle.describe(),
            "batching": config.batching.model_dump(mode="json"),
            "cameras": {c.name: {"paused": c.paused, **states[c.name]} for c in config.cameras if c.name in states},
            "inference": self.pipeline.inference_state(time.monotonic()),
            "latency": self.metrics.percentiles(),
        }

    def installed(self) -> list[dict[str, Any]]:
        return self.lifecycle.installed()

    def event(self, kind: str, detail: dict[str, Any]) -> None:
        log.info("%s event: %s", kind, detail)
        if self.link:
            payload = {"event": kind, "at": time.time(), **detail}
            self.link.event(payload)
            if self.report:  # (boot's events come before the report exists)
                self.report.event(kind, payload)

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

    def close_engines(self) -> None:
        self.pipeline.serving.engine.close()
        if self.lifecycle.previous:
            self.lifecycle.previous.engine.close()

    def run(self, duration: float | None) -> None:
        port = self.config.metrics.prometheus_port
        if port:
            self.metrics.serve(self.pipeline, port)
        if TegraStats.available():  # a Jetson: GPU load, memory, temperatures, power in the metrics and status
            self.metrics.jetson, self.metrics.power_mode = TegraStats().start(), power_mode()
        self.pipeline.start()
        self.lifecycle.attach(self.pipeline)
        if self.link and self.report:
            self.report.publish()
            self.link.start(self._commands.handle)
        notify(f"READY=1\nSTATUS=serving {self.bundle.bundle_id}")
        observer = Observer()
        observer.schedule(FolderWatcher(self.reload, paths=(self.config_path,)), str(self.config_path.parent.resolve()))
        inbox = Inbox(self.config.engine.inbox, self.lifecycle) if self.config.engine.inbox else None
        if inbox:
            inbox.folder.mkdir(parents=True, exist_ok=True)
            observer.schedule(FolderWatcher(self.inbox_changed, folders=(inbox.folder,)), str(inbox.folder.resolve()))
        observer.start()
        period = watchdog_period()
        started = last_pet = last_publish = last_print = last_inbox = time.monotonic()
        try:
            while not self.stop.wait(0.1):
                try:
                    now = time.monotonic()
                    self.pipeline.supervise(now)
                    if self.reload.is_set():
                        self.apply_reload()
                    if inbox and (self.inbox_changed.is_set() or now - last_inbox >= INBOX_RESCAN_S):
                        self.inbox_changed.clear()
                        inbox.poll()
                        last_inbox = now
                    stall_after = max(1.0, 10 * self.config.batching.latency_budget_ms / 1e3)
                    if period and now - last_pet >= period and self.pipeline.healthy(now, stall_after):
                        notify("WATCHDOG=1")
                        last_pet = now
                    metrics_cfg = self.config.metrics
                    if self.link and self.report and now - last_publish >= metrics_cfg.publish_every_s:
                        outbox = {
                            "depth": self.link.outbox.depth(),
                            "dropped_results": self.link.outbox.dropped_results(),
                        }
                        snapshot = self.metrics.snapshot(self.pipeline)
                        self.link.publish_metrics({**snapshot, "outbox": outbox})
                        self.report.metrics(snapshot)
                        last_publish = now
                    if metrics_cfg.print_every_s and now - last_print >= metrics_cfg.print_every_s:
                        print(live_line(self.metrics.snapshot(self.pipeline)), flush=True)
                        last_print = now
                    if self.config.exit_when_sources_end and self.pipeline.sources_ended():
                        break
                    if duration and now - started >= duration:
                        break
                except Exception:  # a bug in one periodic task must not end the agent; the watchdog decides
                    log.exception("main loop iteration failed")
                    self.stop.wait(1.0)
        finally:
            notify("STOPPING=1")
            observer.stop()
            observer.join()
            if self.metrics.jetson:
                self.metrics.jetson.stop()
            self.lifecycle.stop()
            self.pipeline.stop(drain=True)
            self.close_engines()
            summary = self.metrics.snapshot(self.pipeline, whole_run=True)
            # indented for a person at a terminal; one line for whatever reads a pipe or a journal
            print(json.dumps({"summary": summary}, indent=2 if sys.stdout.isatty() else None), flush=True)


def live_line(snapshot: dict[str, Any]) -> str:
    """Frames/s, latency p50/p99, batch, frames skipped (a camera delivered a newer frame before the engine
    took the last one) and shed (dropped to hold the latency budget), each camera's state: under 80
    columns: the cameras are counted when naming each would not fit."""
    cams = snapshot["cameras"]
    processed = sum(c["processed_fps"] for c in cams.values())
    lat = snapshot["latency"]
    skipped = sum(c["skipped"] for c in cams.values())
    shed = sum(c["shed"] for c in cams.values())
    latency = f"p50 {_ms(lat['p50_ms'])} p99 {_ms(lat['p99_ms'])} ms"
    head = f"{processed:6.1f} fps | {latency} | batch {snapshot['decision']['batch']} | skip {skipped} shed {shed} | "
    states = " ".join(f"{n}={c['state']}" for n, c in cams.items())
    if len(head) + len(states) > LIVE_LINE_COLUMNS:
        connected = sum(c["state"] == "connected" for c in cams.values())
        states = f"{connected}/{len(cams)} connected"
    return head + states


def _ms(value: float | None) -> str:
    """Milliseconds as the live line shows them: tenths only where they matter."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def parser() -> argparse.ArgumentParser:
    root = new_parser("edgevit-agent", __doc__)
    root.add_argument("--config", type=Path, required=True, help="the agent's YAML (see configs/agent.yaml)")
    root.add_argument("--check", action="store_true", help="validate config, bundle and engine, then exit")
    root.add_argument("--duration", type=float, help="stop after this many seconds (benchmarks, tests)")
    root.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log verbosity",
    )
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
        agent.close_engines()
        return 0
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints every thread's stack: what a stuck agent waits on
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    signal.signal(signal.SIGHUP, lambda *_: agent.reload.set())
    agent.run(args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
