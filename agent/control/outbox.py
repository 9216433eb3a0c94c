"""The on-disk outbox between the agent and its broker: nothing is lost to an outage or a restart.

Results and events are written to SQLite before they are published and deleted only
when the broker acknowledges them (QoS 1 PUBACK). paho-mqtt's own queue lives in
memory and dies with the process; this one survives ``kill -9`` and power loss
(WAL journal, synchronous commits per batch). It is bounded: when full, the oldest
*results* are dropped and counted; events are never dropped.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,          -- 'result' may be dropped when full; anything else never
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Message:
    id: int
    topic: str
    payload: bytes


class Outbox:
    def __init__(self, path: Path, max_results: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self.max_results = max_results

    def put(self, kind: str, messages: list[tuple[str, bytes]]) -> None:
        """Store messages (one transaction); trim the oldest results beyond ``max_results``."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO outbox (kind, topic, payload) VALUES (?, ?, ?)",
                [(kind, topic, payload) for topic, payload in messages],
            )
            excess = self._count("result") - self.max_results
            if excess > 0:
                self._db.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE kind = 'result' ORDER BY id LIMIT ?)",
                    (excess,),
                )
                self._db.execute(
                    "INSERT INTO counters VALUES ('dropped_results', ?) ON CONFLICT(name) "
                    "DO UPDATE SET value = value + excluded.value",
                    (excess,),
                )
            self._db.execute("COMMIT")

    def _count(self, kind: str) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE kind = ?", (kind,)).fetchone()[0])

    def next_batch(self, after_id: int, limit: int) -> list[Message]:
        """Oldest messages with id > ``after_id`` (the publisher's cursor)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [Message(*row) for row in rows]

    def ack(self, message_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (message_id,))

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def dropped_results(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped_results'").fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
