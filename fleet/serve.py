"""``edgevit-fleet serve``: bundle archives over HTTP(S) with Range, so device downloads resume.

For small fleets; any HTTP store (an object store with presigned URLs) serves devices
the same way. Only regular files directly inside the folder are served.
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHUNK = 1 << 16


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
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = (server.root / self.path.lstrip("/").split("?")[0]).resolve()
                if path.parent != server.root or not path.is_file():
                    self.send_error(404)
                    return
                size = path.stat().st_size
                header = self.headers.get("Range", "")
                server.requests.append(header)
                start = int(header[6:].split("-")[0]) if header.startswith("bytes=") else 0
                if start >= size and size:
                    self.send_error(416)
                    return
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                self.send_header("Content-Length", str(size - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                limit = server.drop_first_after if len(server.requests) == 1 else None
                with open(path, "rb") as fh:
                    fh.seek(start)
                    sent = 0
                    while chunk := fh.read(CHUNK):
                        if limit is not None and sent + len(chunk) > limit:
                            self.wfile.write(chunk[: limit - sent])
                            self.close_connection = True
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)

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
