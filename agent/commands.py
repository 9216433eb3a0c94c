"""Fleet commands on ``<prefix>/<device>/cmd``: parsed, validated, answered, idempotent.

A command is a JSON object ``{"id": "...", "cmd": "...", ...}`` of at most
``MAX_COMMAND_BYTES``. Every message gets a reply ``{"id", "ok", "result" | "error"}``
(``id`` is null when the message had none): malformed, unknown, oversized or invalid
commands are refused with a message naming what is wrong and change nothing.
Replies are remembered by id, so a command delivered twice (QoS 1 allows it) is
applied once and answered the same way twice.

Commands here: ``ping``, ``status``, ``list``, ``set`` (batching, or one camera's
settings; validated by the same models as the config file), ``pause`` and ``resume``
a camera. Settings changed by command last until the next restart or config reload.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from agent.config import AgentConfig, BatchingConfig, CameraConfig

MAX_COMMAND_BYTES = 16 * 1024
REMEMBERED_REPLIES = 1000


class CommandError(ValueError):
    """The command is refused; the message says why."""


def _validation_message(exc: ValidationError, prefix: str) -> str:
    return "; ".join(f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


class CommandHandler:
    """Turns command payloads into replies, applying valid ones through ``apply``."""

    def __init__(
        self,
        get_config: Callable[[], AgentConfig],
        apply: Callable[[AgentConfig], None],
        status: Callable[[], dict[str, Any]],
        installed: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self._get_config, self._apply, self._status, self._installed = get_config, apply, status, installed
        self._replies: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def handle(self, payload: bytes) -> dict[str, Any]:
        command_id = None
        try:
            command = self._parse(payload)
            command_id = command["id"]
            with self._lock:
                if command_id in self._replies:
                    return {**self._replies[command_id], "duplicate": True}
                reply = {"id": command_id, "ok": True, "result": self._run(command)}
        except CommandError as exc:
            reply = {"id": command_id, "ok": False, "error": str(exc)}
        if command_id is not None:
            with self._lock:
                self._replies[command_id] = reply
                while len(self._replies) > REMEMBERED_REPLIES:
                    self._replies.popitem(last=False)
        return reply

    @staticmethod
    def _parse(payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_COMMAND_BYTES:
            raise CommandError(f"command is {len(payload)} bytes, the limit is {MAX_COMMAND_BYTES}")
        try:
            command = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CommandError(f"command is not valid JSON: {exc}") from None
        if not isinstance(command, dict):
            raise CommandError("command must be a JSON object")
        command_id = command.get("id")
        if not isinstance(command_id, str) or not 1 <= len(command_id) <= 64:
            raise CommandError("'id' must be a string of 1 to 64 characters")
        if not isinstance(command.get("cmd"), str):
            raise CommandError("'cmd' must be a string")
        return command

    def _run(self, command: dict[str, Any]) -> dict[str, Any]:
        handlers = {
            "ping": self._ping,
            "status": self._status_cmd,
            "list": self._list,
            "set": self._set,
            "pause": self._pause,
            "resume": self._resume,
        }
        handler = handlers.get(command["cmd"])
        if handler is None:
            raise CommandError(f"unknown command {command['cmd'][:40]!r} (known: {', '.join(handlers)})")
        return handler(command)

    def _ping(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"pong": time.time()}

    def _status_cmd(self, command: dict[str, Any]) -> dict[str, Any]:
        return self._status()

    def _list(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"bundles": self._installed()}

    def _camera(self, command: dict[str, Any]) -> tuple[AgentConfig, int]:
        config, name = self._get_config(), command.get("camera")
        names = [c.name for c in config.cameras]
        if name not in names:
            raise CommandError(f"'camera' must name one of {', '.join(names)}, got {str(name)[:40]!r}")
        return config, names.index(name)

    def _set_camera(self, config: AgentConfig, index: int, changes: dict[str, Any]) -> dict[str, Any]:
        current = config.cameras[index]
        try:
            camera = CameraConfig.model_validate({**current.model_dump(), **changes, "name": current.name})
        except ValidationError as exc:
            raise CommandError(_validation_message(exc, f"cameras.{current.name}.")) from None
        cameras = [*config.cameras[:index], camera, *config.cameras[index + 1 :]]
        self._apply(config.model_copy(update={"cameras": cameras}))
        return {"camera": camera.model_dump(mode="json")}

    def _set(self, command: dict[str, Any]) -> dict[str, Any]:
        if "batching" in command:
            batching = command["batching"]
            if not isinstance(batching, dict):
                raise CommandError("'batching' must be an object")
            config = self._get_config()
            try:
                new = BatchingConfig.model_validate({**config.batching.model_dump(), **batching})
            except ValidationError as exc:
                raise CommandError(_validation_message(exc, "batching.")) from None
            self._apply(config.model_copy(update={"batching": new}))
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
