"""``edgevit-fleet serve``: bundle archives over HTTP(S) with Range, so device downloads resume.

For small fleets; any HTTP store (an object store with presigned URLs) serves devices
the same way. Only regular files directly inside the folder are served.
"""

from __future__ import annotations

import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHUNK = 1 << 16


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The (first, last) bytes a ``Range`` header asks for of a ``size``-byte file; the whole file without
    one; None when it is malformed or cannot be satisfied (answered 416, never dropped).

    One range: ``bytes=A-B``, ``bytes=A-`` (what a resumed download sends) or ``bytes=-N`` (the last N).
    """
    if not header:
        return 0, size - 1
    match = re.fullmatch(r"bytes=(\d{0,15})-(\d{0,15})", header.strip())
    if not match or not (match.group(1) or match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # a suffix: the last N bytes
        count = int(last)
        return (max(size - count, 0), size - 1) if count and size else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    return (start, end) if start < size and start <= end else None


class BundleServer:
    """Serves ``root``; ``drop_first_after`` (tests) cuts the first transfer after that many bytes."""

    def __init__(
        self,
        root: Path,
        bind: str = "127.0.0.1",
        port: int = 0,
        tls: tuple[Path, Path] | None = None,
        drop_first_after: int | None = None,
    ) -> None:
        self.root, self.drop_first_after = root.resolve(), drop_first_after
        self.requests: list[str] = []  # each request's Range header ("" when none)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                self.do_GET(body=False)

            def do_GET(self, body: bool = True) -> None:  # noqa: N802 (http.server's naming)
                path = (server.root / self.path.lstrip("/").split("?")[0]).resolve()
                if path.parent != server.root or not path.is_file():
                    self.send_error(404)
                    return
                size = path.stat().st_size
                header = self.headers.get("Range", "")
                server.requests.append(header)
                span = byte_range(header, size)
                if span is None:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = span
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                limit = server.drop_first_after if len(server.requests) == 1 else None
                with open(path, "rb") as fh:
                    fh.seek(start)
                    left, sent = end - start + 1, 0
                    while left and (chunk := fh.read(min(CHUNK, left))):
                        if limit is not None and sent + len(chunk) > limit:
                            self.wfile.write(chunk[: limit - sent])
                            self.close_connection = True
                            return
                        self.wfile.write(chunk)
                        sent, left = sent + len(chunk), left - len(chunk)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((bind, port), Handler)
        scheme = "http"
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://{bind}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> BundleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve_forever(self) -> None:
        self._server.serve_forever()
