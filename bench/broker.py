"""A throwaway Mosquitto on a free loopback port, for the benchmarks that need a broker."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def start_broker(folder: Path, settings: str = "") -> tuple[subprocess.Popen[bytes], int]:
    """(process, port); ``settings`` are extra mosquitto.conf lines."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest none\n{settings}")
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"mosquitto did not start on port {port}")
