"""A real HTTP server for bundle downloads: honours Range, and can drop the first transfer halfway."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class RangeServer:
    def __init__(self, root: Path, drop_first_after: int | None = None) -> None:
        self.root, self.drop_first_after = root, drop_first_after
        self.requests: list[str] = []  # the Range header of each request ("" when none)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                header = self.headers.get("Range", "")
                server.requests.append(header)
                start = int(header[6:].split("-")[0]) if header.startswith("bytes=") else 0
                body = data[start:]
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drop_first_after is not None and len(server.requests) == 1:
                    self.wfile.write(body[: server.drop_first_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
