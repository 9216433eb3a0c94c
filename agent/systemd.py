"""The sd_notify protocol (Type=notify units), without libsystemd.

A datagram to the socket named in ``$NOTIFY_SOCKET`` (``@`` = abstract namespace).
Outside systemd the variable is unset and every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.send(message.encode(), socket.MSG_DONTWAIT)  # a busy or gone manager must never stall the agent
        except OSError:
            return False
    return True


def watchdog_period() -> float | None:
    """How often to send WATCHDOG=1 (half of WatchdogSec), or None when no watchdog is armed for us."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
