"""Signed commands: Ed25519 over the command, a timestamp and a nonce, against forgery and replay.

A signed command carries ``ts`` (Unix seconds), ``nonce`` (8 to 64 characters) and
``sig``: the same signature document as a bundle's ``manifest.sig`` (see
:mod:`agent.engine.signing`), over the command's canonical JSON without ``sig`` (sorted keys,
no spaces). The agent accepts it when a trusted key signed it, ``ts`` is within
``max_age_s`` of its clock, and the nonce was not seen in that time. Seen nonces are
kept in SQLite under the state directory, so a restart does not reopen the window.
"""

from __future__ import annotations

import json
import math
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.engine.signing import SignatureError, sign, verify


class CommandAuthError(ValueError):
    """The command is not authorised; the message says why."""


def canonical(command: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in command.items() if k != "sig"}, sort_keys=True, separators=(",", ":")).encode()


def sign_command(command: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``command`` with ``ts``, ``nonce`` (unless given) and ``sig`` added: what an operator tool sends."""
    stamped = {"ts": time.time(), "nonce": secrets.token_hex(12), **command}
    return {**stamped, "sig": json.loads(sign(canonical(stamped), key))}


class CommandVerifier:
    def __init__(self, keys: list[Ed25519PublicKey], max_age_s: float, nonces_db: Path) -> None:
        self.keys, self.max_age_s = keys, max_age_s
        nonces_db.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(nonces_db, check_same_thread=False, isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, ts REAL NOT NULL)")
        self._lock = threading.Lock()

    def check(self, command: dict[str, Any]) -> str:
        """Return the signer's key id, or raise :class:`CommandAuthError`."""
        ts, nonce, sig = command.get("ts"), command.get("nonce"), command.get("sig")
        if not isinstance(sig, dict):
            raise CommandAuthError("unsigned: this agent requires 'sig', 'ts' and 'nonce' on every command")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
            raise CommandAuthError("'ts' must be the signing time in Unix seconds")
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64:
            raise CommandAuthError("'nonce' must be a string of 8 to 64 characters")
        now = time.time()
        if abs(now - ts) > self.max_age_s:
            raise CommandAuthError(f"'ts' is {now - ts:+.0f} s from this device's clock, over {self.max_age_s:g} s")
        try:
            signer = verify(canonical(command), json.dumps(sig).encode(), self.keys, "the command")
        except SignatureError as exc:
            raise CommandAuthError(f"signature rejected: {exc}") from None
        with self._lock:
            self._db.execute("DELETE FROM nonces WHERE ts < ?", (now - 2 * self.max_age_s,))
            try:
                self._db.execute("INSERT INTO nonces VALUES (?, ?)", (nonce, ts))
            except sqlite3.IntegrityError:
                raise CommandAuthError(f"nonce {nonce!r} was already used: a replayed command") from None
        return signer
