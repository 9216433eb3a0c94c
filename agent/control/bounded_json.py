"""JSON from outside the device, parsed with limits before anything else looks at it.

``json.loads`` on hostile bytes can raise far more than ``JSONDecodeError``: nesting a few
thousand deep raises ``RecursionError``, an integer of more than 4,300 digits ``ValueError``,
and ``1e999`` quietly becomes ``inf``. Raised inside paho's network thread, any of these ends
the MQTT link for good. :func:`loads` refuses such documents with :class:`JSONLimitError`
(a ``ValueError``), and never raises anything else for any input.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

# A JSON string token (escapes included) and the structural characters outside strings.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class JSONLimitError(ValueError):
    """The document is not JSON, or exceeds a limit; the message says which."""


@dataclass(frozen=True)
class JSONLimits:
    """What a document may hold; the defaults suit fleet commands of a few KiB."""

    max_bytes: int = 16 * 1024
    max_depth: int = 16
    max_string_chars: int = 4096
    max_number_chars: int = 40


COMMAND_LIMITS = JSONLimits()


def _check_depth(text: str, limits: JSONLimits) -> None:
    depth = 0
    for match in _BRACKETS.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > limits.max_depth:
            raise JSONLimitError(f"JSON nested deeper than {limits.max_depth} levels")


def loads(payload: bytes | str, limits: JSONLimits = COMMAND_LIMITS) -> Any:
    """The parsed document, or :class:`JSONLimitError` naming the limit or the syntax error."""
    try:
        if len(payload) > limits.max_bytes:
            raise JSONLimitError(f"document is {len(payload)} bytes, the limit is {limits.max_bytes}")
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        _check_depth(text, limits)
        for match in _STRING.finditer(text):
            if len(match.group()) - 2 > limits.max_string_chars:
                raise JSONLimitError(f"a JSON string is longer than {limits.max_string_chars} characters")

        def number(kind: type) -> Any:
            def parse(token: str) -> Any:
                if len(token) > limits.max_number_chars:
                    raise JSONLimitError(f"a JSON number is longer than {limits.max_number_chars} characters")
                value = kind(token)
                if isinstance(value, float) and not math.isfinite(value):
                    raise JSONLimitError(f"JSON number {token} is out of range")
                return value

            return parse

        def constant(token: str) -> Any:
            raise JSONLimitError(f"{token} is not a JSON value")

        return json.loads(text, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except JSONLimitError:
        raise
    except UnicodeDecodeError as exc:
        raise JSONLimitError(f"document is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise JSONLimitError(f"not valid JSON: {exc}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # what the checks above should already stop
        raise JSONLimitError(f"JSON refused: {type(exc).__name__}") from None
