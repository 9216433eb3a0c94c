"""Fleet commands on ``<prefix>/<device>/cmd``: parsed, validated, answered, idempotent.

A command is a JSON object ``{"id": "...", "cmd": "...", ...}`` of at most
``MAX_COMMAND_BYTES``. Every message gets a reply ``{"id", "ok", "result" | "error"}``
(``id`` is null when the message had none): malformed, unknown, oversized or invalid
commands are refused with a message naming what is wrong and change nothing.
Replies are remembered by id with the command's sha256, so a command delivered twice
(QoS 1 allows it) is applied once and answered the same way twice, while other bytes
under a used id are refused. The memory is SQLite under the state directory: it holds
for :data:`REPLY_WINDOW_S` (7 days) and the newest :data:`REMEMBERED_REPLIES` ids,
across restarts of the agent.

Commands: ``ping``, ``status``, ``list`` (installed engines), ``set`` (batching, or
one camera's settings; validated by the same models as the config file), ``pause``
and ``resume`` a camera, ``deploy`` (``bundle``: ``{"path"}`` or ``{"url", "sha256",
"size"}``, optional ``force``) and ``rollback`` (optional ``bundle`` id, ``force``).
``deploy`` and ``rollback`` answer once the job is accepted; its outcome follows as
events. Settings changed by ``set`` last until the next restart or config reload.
With ``mqtt.signed_commands``, every command must carry a valid signature
(:mod:`agent.control.command_auth`) before anything else is looked at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from agent import bounded_json
from agent.config import AgentConfig, BatchingConfig, CameraConfig
from agent.control.command_auth import CommandAuthError, CommandVerifier
from agent.lifecycle.fetch import BundleRef

MAX_COMMAND_BYTES = bounded_json.COMMAND_LIMITS.max_bytes
REMEMBERED_REPLIES = 100_000
REPLY_WINDOW_S = 7 * 86400.0
# What a fleet command may change on a camera. Never its source or backend: a remote source would let
# whoever can publish on the cmd topic open any file, device or GStreamer pipeline on the device.
SETTABLE_CAMERA_FIELDS = frozenset({"fps", "stride", "region", "stall_timeout_s", "reconnect", "paused", "loop"})
log = logging.getLogger("edgevit.commands")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CommandError(ValueError):
    """The command is refused; the message says why."""


def _validation_message(exc: ValidationError, prefix: str) -> str:
    return "; ".join(f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


class Control(Protocol):
    """What commands act on (the agent)."""

    config: AgentConfig

    def apply_config(self, new: AgentConfig) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def installed(self) -> list[dict[str, Any]]: ...

    def deploy(self, ref: BundleRef, force: bool, command_id: str) -> dict[str, Any]: ...

    def rollback(self, bundle_id: str | None, force: bool, command_id: str) -> dict[str, Any]: ...


class ReplyMemory:
    """Replies by command id, with the sha256 of the command's bytes, in SQLite (or memory: ``path`` None)."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path or ":memory:", check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, digest BLOB NOT NULL, reply TEXT NOT NULL, "
            "at REAL NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS replies_at ON replies (at)")
        self._puts = 0

    def get(self, command_id: str) -> tuple[bytes, dict[str, Any]] | None:
        row = self._db.execute(
            "SELECT digest, reply FROM replies WHERE id = ? AND at >= ?", (command_id, time.time() - REPLY_WINDOW_S)
        ).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def put(self, command_id: str, digest: bytes, reply: dict[str, Any]) -> None:
        now = time.time()
        self._db.execute(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)", (command_id, digest, json.dumps(reply), now)
        )
        self._puts += 1
        if self._puts % 1000 == 0:  # prune now and then: by age, then down to the newest ids
            self._db.execute("DELETE FROM replies WHERE at < ?", (now - REPLY_WINDOW_S,))
            self._db.execute(
                "DELETE FROM replies WHERE id NOT IN (SELECT id FROM replies ORDER BY at DESC LIMIT ?)",
                (REMEMBERED_REPLIES,),
            )


class CommandHandler:
    """Turns command payloads into replies, acting on valid ones through ``control``."""

    def __init__(self, control: Control, auth: CommandVerifier | None = None, replies: Path | None = None) -> None:
        """``replies``: the SQLite file that remembers replies across restarts (None: this run only)."""
        self._control, self._auth = control, auth
        self._replies = ReplyMemory(replies)
        self._lock = threading.Lock()

    def handle(self, payload: bytes) -> dict[str, Any]:
        command_id = None
        digest = hashlib.sha256(payload).digest()
        try:
            command = self._parse(payload)
            command_id = command["id"]
            if not _is_text(command_id):  # valid JSON ("\ud800"), but no store or log line can hold it
                return {"id": command_id, "ok": False, "error": "'id' must be Unicode text: it holds a lone surrogate"}
            if not isinstance(command.get("cmd"), str):
                raise CommandError("'cmd' must be a string")
            with self._lock:
                remembered = self._replies.get(command_id)
            if remembered is not None:  # the same bytes again is a redelivery; other bytes reuse the id
                if remembered[0] == digest:
                    return {**remembered[1], "duplicate": True}
                return {
                    "id": command_id,
                    "ok": False,
                    "error": f"id {command_id!r} was already used by another command",
                }
            if self._auth:
                try:
                    self._auth.check(command)
                except CommandAuthError as exc:
                    return {"id": command_id, "ok": False, "error": f"unauthorised: {exc}"}
            with self._lock:
                reply = {"id": command_id, "ok": True, "result": self._run(command)}
        except CommandError as exc:
            reply = {"id": command_id, "ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must cost one command, never the link that carries them
            log.exception("command %r failed", command_id)
            reply = {"id": command_id, "ok": False, "error": f"internal error: {type(exc).__name__}"}
        if command_id is not None:
            with self._lock:
                self._replies.put(command_id, digest, reply)
        return reply

    @staticmethod
    def _parse(payload: bytes) -> dict[str, Any]:
        try:
            command = bounded_json.loads(payload)
        except bounded_json.JSONLimitError as exc:
            raise CommandError(f"command refused: {exc}") from None
        if not isinstance(command, dict):
            raise CommandError("command must be a JSON object")
        command_id = command.get("id")
        if not isinstance(command_id, str) or not 1 <= len(command_id) <= 64:
            raise CommandError("'id' must be a string of 1 to 64 characters")
        return command

    def _run(self, command: dict[str, Any]) -> dict[str, Any]:
        handlers = {
            "ping": self._ping,
            "status": self._status_cmd,
            "list": self._list,
            "set": self._set,
            "pause": self._pause,
            "resume": self._resume,
            "deploy": self._deploy,
            "rollback": self._rollback,
        }
        handler = handlers.get(command["cmd"])
        if handler is None:
            raise CommandError(f"unknown command {command['cmd'][:40]!r} (known: {', '.join(handlers)})")
        return handler(command)

    def _ping(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"pong": time.time()}

    def _status_cmd(self, command: dict[str, Any]) -> dict[str, Any]:
        return self._control.status()

    def _list(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"bundles": self._control.installed()}

    @staticmethod
    def _force(command: dict[str, Any]) -> bool:
        force = command.get("force", False)
        if not isinstance(force, bool):
            raise CommandError("'force' must be true or false")
        return force

    def _deploy(self, command: dict[str, Any]) -> dict[str, Any]:
        max_bytes = int(self._control.config.engine.max_bundle_mib * 2**20)
        try:
            ref = BundleRef.parse(command.get("bundle"), max_bytes)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return self._control.deploy(ref, self._force(command), command["id"])

    def _rollback(self, command: dict[str, Any]) -> dict[str, Any]:
        bundle_id = command.get("bundle")
        if bundle_id is not None and (not isinstance(bundle_id, str) or not 1 <= len(bundle_id) <= 200):
            raise CommandError("'bundle' must be an installed bundle id (see 'list'), or absent for the previous")
        return self._control.rollback(bundle_id, self._force(command), command["id"])

    def _camera(self, command: dict[str, Any]) -> tuple[AgentConfig, int]:
        config, name = self._control.config, command.get("camera")
        names = [c.name for c in config.cameras]
        if name not in names:
            raise CommandError(f"'camera' must name one of {', '.join(names)}, got {str(name)[:40]!r}")
        return config, names.index(name)

    def _set_camera(self, config: AgentConfig, index: int, changes: dict[str, Any]) -> dict[str, Any]:
        current = config.cameras[index]
        fixed = sorted(set(changes) - SETTABLE_CAMERA_FIELDS)
        if fixed:
            raise CommandError(
                f"cameras.{current.name}: {', '.join(map(str, fixed))[:200]} cannot be set remotely "
                f"(settable: {', '.join(sorted(SETTABLE_CAMERA_FIELDS))}); sources come from the config file only"
            )
        try:
            camera = CameraConfig.model_validate({**current.model_dump(), **changes, "name": current.name})
        except ValidationError as exc:
            raise CommandError(_validation_message(exc, f"cameras.{current.name}.")) from None
        cameras = [*config.cameras[:index], camera, *config.cameras[index + 1 :]]
        self._control.apply_config(config.model_copy(update={"cameras": cameras}))
        return {"camera": camera.public()}

    def _set(self, command: dict[str, Any]) -> dict[str, Any]:
        if "batching" in command:
            batching = command["batching"]
            if not isinstance(batching, dict):
                raise CommandError("'batching' must be an object")
            config = self._control.config
            try:
                new = BatchingConfig.model_validate({**config.batching.model_dump(), **batching})
            except ValidationError as exc:
                raise CommandError(_validation_message(exc, "batching.")) from None
            self._control.apply_config(config.model_copy(update={"batching": new}))
            return {"batching": new.model_dump(mode="json")}
        if "camera" in command:
            settings = command.get("settings")
            if not isinstance(settings, dict):
                raise CommandError("'settings' must be an object of camera settings")
            return self._set_camera(*self._camera(command), settings)
        raise CommandError("'set' needs 'batching' or 'camera' with 'settings'")

    def _pause(self, command: dict[str, Any]) -> dict[str, Any]:
        return self._set_camera(*self._camera(command), {"paused": True})

    def _resume(self, command: dict[str, Any]) -> dict[str, Any]:
        return self._set_camera(*self._camera(command), {"paused": False})
