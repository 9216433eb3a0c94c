"""The dashboard's and the bundle server's HTTP: rebinding, headers, malformed requests, a proxy in front.

Real servers on loopback, real sockets: the dashboard against a real Mosquitto, an
authenticating reverse proxy (a small real HTTP proxy here, standing in for nginx or Caddy)
in front of it, and raw requests no browser would send.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fleet.dashboard import PAGE, Dashboard, MetricsHistory
from fleet.link import Broker, FleetLink
from fleet.serve import BundleServer


@pytest.fixture
def dashboard(mosquitto: int, tmp_path: Path) -> Iterator[tuple[str, int]]:
    link = FleetLink(Broker("127.0.0.1", mosquitto)).connect(settle_s=0.2)
    page = Dashboard(link, MetricsHistory(), tmp_path, "127.0.0.1", 0, ("fleet.example.lan",))
    threading.Thread(target=page.serve_forever, daemon=True).start()
    yield "127.0.0.1", page._server.server_address[1]
    page.close()
    link.close()


def get(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    response.read()
    return response


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_rebound_name_is_refused_and_addresses_are_served(dashboard: tuple[str, int]) -> None:
    host, port = dashboard
    assert get(host, port, "/api/fleet", {"Host": "attacker.example:8080"}).status == 403
    for allowed in (f"127.0.0.1:{port}", "localhost", "[::1]:8080", "fleet.example.lan", "FLEET.example.lan:1"):
        assert get(host, port, "/api/fleet", {"Host": allowed}).status == 200, allowed


def test_the_page_is_pinned_unframed_and_unsniffed(dashboard: tuple[str, int]) -> None:
    response = get(*dashboard, "/")
    assert response.status == 200 and response.getheader("X-Content-Type-Options") == "nosniff"
    assert response.getheader("X-Frame-Options") == "DENY"
    policy = response.getheader("Content-Security-Policy")
    assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    script = re.search(r"<script>(.*?)</script>", PAGE, re.S).group(1)  # type: ignore[union-attr]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy, "the page's own script is the only one allowed"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /api/fleet?page=x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", b"400"),
        (b"GET /api/fleet?select=%FF%FE HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", b"501"),
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", b"404"),
    ],
)
def test_every_malformed_request_gets_an_answer(dashboard: tuple[str, int], request_bytes: bytes, status: bytes):
    answer = raw(dashboard[1], request_bytes)
    head = answer.split(b"\r\n", 1)[0]  # a request without a version is answered the HTTP/0.9 way: a body
    assert (head.startswith(b"HTTP/") and head.split(b" ")[1] == status) or b"Error code: " + status in answer, answer


class AuthProxy(ThreadingHTTPServer):
    """A reverse proxy that asks for a password and forwards to the dashboard, as nginx's proxy_pass does
    by default (the upstream's address as Host)."""

    def __init__(self, upstream: int, password: str) -> None:
        expected = "Basic " + base64.b64encode(f"operator:{password}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="fleet"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                connection = http.client.HTTPConnection("127.0.0.1", upstream, timeout=10)
                connection.request("GET", self.path, headers={"Host": f"127.0.0.1:{upstream}"})
                response = connection.getresponse()
                body = response.read()
                self.send_response(response.status)
                for name in ("Content-Type", "Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options"):
                    if response.getheader(name):
                        self.send_header(name, response.getheader(name))  # type: ignore[arg-type]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_it_works_behind_an_authenticating_reverse_proxy(dashboard: tuple[str, int]) -> None:
    proxy = AuthProxy(dashboard[1], "s3cret")
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    port = proxy.server_address[1]
    try:
        assert get("127.0.0.1", port, "/api/fleet").status == 401
        token = base64.b64encode(b"operator:s3cret").decode()
        response = get(
            "127.0.0.1", port, "/api/fleet", {"Host": "fleet.public.example", "Authorization": f"Basic {token}"}
        )
        assert response.status == 200 and response.getheader("Content-Type") == "application/json"
        assert get("127.0.0.1", port, "/", {"Authorization": f"Basic {token}"}).getheader("X-Frame-Options") == "DENY"
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.parametrize(
    "header", ["bytes=abc-", "bytes=5-2", "items=0-", "bytes=-", "bytes=99999999999-", "bytes=1-2,4-5"]
)
def test_the_bundle_server_answers_a_malformed_range(tmp_path: Path, header: str) -> None:
    (tmp_path / "b.tar.gz").write_bytes(b"x" * 100)
    with BundleServer(tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        response = get("127.0.0.1", port, "/b.tar.gz", {"Range": header})
        assert response.status == 416 and response.getheader("Content-Range") == "bytes */100"


@pytest.mark.parametrize(
    "header, first, last", [("bytes=40-", 40, 99), ("bytes=0-9", 0, 9), ("bytes=-5", 95, 99), ("bytes=90-200", 90, 99)]
)
def test_the_bundle_server_serves_the_range_asked_for(tmp_path: Path, header: str, first: int, last: int) -> None:
    content = bytes(range(100))
    (tmp_path / "b.tar.gz").write_bytes(content)
    with BundleServer(tmp_path) as server:
        port = int(server.url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/b.tar.gz", headers={"Range": header})
        response = connection.getresponse()
        assert response.status == 206 and response.read() == content[first : last + 1]
        assert response.getheader("Content-Range") == f"bytes {first}-{last}/100"
        head = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        head.request("HEAD", "/b.tar.gz")
        answer = head.getresponse()
        assert answer.status == 200 and answer.getheader("Content-Length") == "100" and answer.read() == b""
