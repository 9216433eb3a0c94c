"""``edgevit-fleet dashboard``: a read-only web page of the live fleet, for operators.

The page is one self-contained HTML file (:data:`PAGE`, no script, style or font from
anywhere else: operators' sites and devices are often offline) that polls this server's
JSON API every two seconds:

``GET /api/fleet?page=N&per_page=M&select=site=a``
    a summary (devices, online, by engine, by label), one page of devices (labels,
    online state, active/previous/canary engine, fps, p99, drift, last canary verdict,
    fps and p99 over the last hour from the metrics topic), and the latest rollout wave
    by wave with each device's outcome (read from the controller's state folder).

The server only reads: it sends no command. Everything a device wrote is data, never
markup: the page builds its elements with ``textContent``.

It binds 127.0.0.1 by default and answers only requests whose ``Host`` is an IP address,
``localhost`` or a name given with ``--allow-host``: a web page the operator opens elsewhere
cannot rebind its own name to this address and read the fleet (DNS rebinding). Responses
forbid sniffing and framing, and the page's one script and one style are pinned by their
hashes in the Content-Security-Policy. It has no login of its own: to reach it from other
machines, put an authenticating reverse proxy in front (docs/fleet-dashboard.md).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import ipaddress
import json
import logging
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fleet.link import Device, FleetLink
from fleet.records import number
from fleet.rollout import TargetState, latest_rollout, parse_selector, selects

HISTORY_S = 3600.0
SAMPLE_EVERY_S = 5.0  # at most one point per device per this: 720 points an hour
MAX_PER_PAGE = 500
WAVE_DEVICES = 100


class MetricsHistory:
    """Per device, (time, fps, p99 ms) over the last hour, from the ``metrics`` topic."""

    def __init__(self, horizon_s: float = HISTORY_S, every_s: float = SAMPLE_EVERY_S) -> None:
        self.horizon_s, self.every_s = horizon_s, every_s
        self._series: dict[str, collections.deque[tuple[float, float, float | None]]] = {}
        self._lock = threading.Lock()

    def record(self, device: str, payload: dict[str, Any], now: float | None = None) -> None:
        """One metrics message; what is not a number is left out rather than trusted."""
        now = time.time() if now is None else now
        cameras = payload.get("cameras")
        latency = payload.get("latency")
        if not isinstance(cameras, dict):
            return
        rates = [number(c.get("processed_fps")) for c in cameras.values() if isinstance(c, dict)]
        if not any(r is not None for r in rates):
            return
        fps = sum(r for r in rates if r is not None)
        p99 = number(latency.get("p99_ms")) if isinstance(latency, dict) else None
        with self._lock:
            series = self._series.setdefault(device, collections.deque(maxlen=int(self.horizon_s / self.every_s) + 1))
            if series and now - series[-1][0] < self.every_s:
                return
            series.append((now, round(fps, 2), p99))
            while series and now - series[0][0] > self.horizon_s:
                series.popleft()

    def series(self, device: str) -> dict[str, list[Any]]:
        with self._lock:
            points = list(self._series.get(device, ()))
        return {"t": [round(p[0], 1) for p in points], "fps": [p[1] for p in points], "p99": [p[2] for p in points]}


def summary(devices: list[Device]) -> dict[str, Any]:
    """Counts a fleet of thousands reads at a glance: online, by engine, by label."""
    engines: collections.Counter[str] = collections.Counter()
    labels: collections.Counter[str] = collections.Counter()
    online = 0
    for d in devices:
        online += d.online
        engines[d.engine.active or "-"] += 1
        for key, value in d.labels.items():
            labels[f"{key}={value}"] += 1
    return {
        "devices": len(devices),
        "online": online,
        "by_engine": dict(engines.most_common(20)),
        "by_label": dict(labels.most_common(20)),
    }


def rollout_view(state_dir: Path) -> dict[str, Any] | None:
    """The latest rollout, wave by wave: each wave's counts by outcome and its devices, failures first, and
    each failed device's reason.

    A wave lists at most :data:`WAVE_DEVICES` devices (a 25 % wave of a large fleet is thousands);
    devices the rollout did not select are only counted.
    """
    r = latest_rollout(state_dir)
    if r is None:
        return None
    waves: dict[int, list[Any]] = collections.defaultdict(list)
    for t in r.targets:
        if t.wave >= 0:
            waves[t.wave].append(t)
    order = {TargetState.FAILED: 0, TargetState.ROLLED_BACK: 1, TargetState.SENT: 2}
    view = []
    for w in sorted(waves):
        targets = sorted(waves[w], key=lambda t: (order.get(t.state, 3), t.device))
        view.append({
            "wave": w,
            "counts": dict(collections.Counter(t.state for t in targets)),
            "devices": [{"device": t.device, "state": t.state, "detail": t.detail} for t in targets[:WAVE_DEVICES]],
        })  # fmt: skip
    failed = sorted(
        (t for t in r.targets if t.state in (TargetState.FAILED, TargetState.ROLLED_BACK) and t.detail),
        key=lambda t: t.device,
    )
    return {
        "id": r.id,
        "bundle_id": r.bundle_id,
        "state": r.state,
        "wave": r.wave,
        "counts": r.counts(),
        "not_selected": sum(1 for t in r.targets if t.wave < 0),
        "waves": view,
        # why devices failed, in the devices' own words where they gave them (shown as text, never markup)
        "failures": [{"device": t.device, "state": t.state, "detail": t.detail} for t in failed[:WAVE_DEVICES]],
    }


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's ``Host`` names this server: an IP address, localhost, or an allowed name."""
    if header is None:  # HTTP/1.0 without Host: no browser sends that, so no rebinding either
        return True
    host = header.strip().lower()
    host = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    if host == "localhost" or host in allowed:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def content_policy(page: str) -> str:
    """The page's CSP: its inline script and style by hash, nothing else, no framing."""

    def hashes(tag: str) -> str:
        bodies = re.findall(f"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class Dashboard:
    """The page and its API over HTTP, from a connected :class:`FleetLink` and the controller's state folder."""

    def __init__(
        self,
        link: FleetLink,
        history: MetricsHistory,
        state_dir: Path,
        bind: str,
        port: int,
        allowed_hosts: tuple[str, ...] = (),
    ) -> None:
        self.link, self.history, self.state_dir = link, history, state_dir
        allowed = frozenset(h.lower() for h in allowed_hosts)
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if not host_allowed(self.headers.get("Host"), allowed):
                    self._send(403, b"this Host is not served here (edgevit-fleet dashboard --allow-host NAME)",
                               "text/plain")  # fmt: skip
                    return
                url = urlsplit(self.path)
                try:
                    if url.path == "/":
                        self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                    elif url.path == "/api/fleet":
                        body = dashboard.fleet(parse_qs(url.query))
                        self._send(200, json.dumps(body).encode(), "application/json")
                    else:
                        self._send(404, b"not found", "text/plain")
                except ValueError as exc:  # a bad page number or selector
                    self._send(400, str(exc).encode(errors="replace"), "text/plain")
                except Exception:  # a bug costs this request an answer, never the server
                    log.exception("dashboard request %r failed", self.path[:200])
                    self._send(500, b"internal error", "text/plain")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Security-Policy", POLICY)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Frame-Options", "DENY")
                self.send_header("Referrer-Policy", "no-referrer")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((bind, port), Handler)
        self.url = f"http://{bind}:{self._server.server_address[1]}/"

    def fleet(self, query: dict[str, list[str]]) -> dict[str, Any]:
        selector = parse_selector(query.get("select", [""])[0])
        page = int(query.get("page", ["1"])[0])
        per_page = min(int(query.get("per_page", ["50"])[0]), MAX_PER_PAGE)
        if page < 1 or per_page < 1:
            raise ValueError("page and per_page start at 1")
        devices = [d for _, d in sorted(self.link.snapshot().items()) if selects(selector, d)]
        shown = devices[(page - 1) * per_page : page * per_page]
        rows = [{**d.row(), "history": self.history.series(d.name)} for d in shown]
        return {
            "generated": time.time(),
            "summary": summary(devices),
            "page": page,
            "pages": max(1, math.ceil(len(devices) / per_page)),
            "devices": rows,
            "rollout": rollout_view(self.state_dir),
        }

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def close(self) -> None:
        self._server.server_close()


PAGE = (Path(__file__).with_name("dashboard.html")).read_text()
POLICY = content_policy(PAGE)
log = logging.getLogger(__name__)
