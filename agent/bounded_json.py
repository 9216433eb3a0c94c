"""JSON from outside the process, parsed with limits before anything else looks at it.

``json.loads`` on hostile bytes can raise far more than ``JSONDecodeError``: nesting a few
thousand deep raises ``RecursionError``, an integer of more than 4,300 digits ``ValueError``,
and ``1e999`` quietly becomes ``inf``. Raised inside paho's network thread, any of these ends
the MQTT link for good; raised while reading a bundle, the engine store's state or a rollout
journal, it escapes the error that names the file. :func:`loads` refuses such documents with
:class:`JSONLimitError` (a ``ValueError``), and never raises anything else for any input;
:func:`load` reads a file no further than its limit. Every layer of the agent and the fleet
tool read outside JSON through this module, so it sits below the agent's layers.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# A JSON string token (escapes included) and the structural characters outside strings.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
# An exponent of three digits or more: the only way a number within the length limit can overflow a float.
_BIG_EXPONENT = re.compile(r"[eE][+-]?[0-9]{3,}")


class JSONLimitError(ValueError):
    """The document is not JSON, or exceeds a limit; the message says which."""


@dataclass(frozen=True)
class JSONLimits:
    """What a document may hold; the defaults suit fleet commands of a few KiB."""

    max_bytes: int = 16 * 1024
    max_depth: int = 16
    max_string_chars: int = 4096
    max_number_chars: int = 40
    # NaN, Infinity and numbers past a float's range: refused in messages; kept where the writer is Python's json,
    # whose dumps writes them (a passport's unmeasured figure), and the reader judges each figure itself
    non_finite: bool = False


COMMAND_LIMITS = JSONLimits()
# A document file inside a bundle (manifest, passport, labels, input spec) or the engine store's state: the
# largest a builder writes is a label list of tens of thousands of classes, far below these.
FILE_LIMITS = JSONLimits(max_bytes=16 * 1024 * 1024, max_depth=32, max_string_chars=64 * 1024, non_finite=True)


def _check_depth(text: str, limits: JSONLimits) -> None:
    depth = 0
    for match in _BRACKETS.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > limits.max_depth:
            raise JSONLimitError(f"JSON nested deeper than {limits.max_depth} levels")


@functools.lru_cache(maxsize=8)
def _long_run(max_chars: int) -> re.Pattern[str]:
    """A run of number characters longer than ``max_chars``: where a number token over the limit could be."""
    return re.compile(rf"[0-9.eE+-]{{{max_chars + 1},}}")


def loads(payload: bytes | str, limits: JSONLimits = COMMAND_LIMITS) -> Any:
    """The parsed document, or :class:`JSONLimitError` naming the limit or the syntax error.

    Each check first asks a question answered at C speed whether its limit can be reached at all
    (no more brackets than the depth allows, no string that could be too long, no run of number
    characters too long and no three-digit exponent); only a document that might break one pays for
    the exact check. Everyday statuses and commands take the plain ``json.loads``: a fleet controller
    reads six of them per device and rollout.
    """
    try:
        if len(payload) > limits.max_bytes:
            raise JSONLimitError(f"document is {len(payload)} bytes, the limit is {limits.max_bytes}")
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        if text.count("[") + text.count("{") > limits.max_depth:
            _check_depth(text, limits)
        if len(text) > limits.max_string_chars + 2:
            for match in _STRING.finditer(text):
                if len(match.group()) - 2 > limits.max_string_chars:
                    raise JSONLimitError(f"a JSON string is longer than {limits.max_string_chars} characters")

        def number(kind: type) -> Any:
            def parse(token: str) -> Any:
                if len(token) > limits.max_number_chars:
                    raise JSONLimitError(f"a JSON number is longer than {limits.max_number_chars} characters")
                value = kind(token)
                if isinstance(value, float) and not math.isfinite(value) and not limits.non_finite:
                    raise JSONLimitError(f"JSON number {token} is out of range")
                return value

            return parse

        def constant(token: str) -> Any:
            if limits.non_finite:
                return float(token)
            raise JSONLimitError(f"{token} is not a JSON value")

        if not _long_run(limits.max_number_chars).search(text) and (
            limits.non_finite or not _BIG_EXPONENT.search(text)
        ):
            return json.loads(text, parse_constant=constant)
        return json.loads(text, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except JSONLimitError:
        raise
    except UnicodeDecodeError as exc:
        raise JSONLimitError(f"document is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise JSONLimitError(f"not valid JSON: {exc}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # what the checks above should already stop
        raise JSONLimitError(f"JSON refused: {type(exc).__name__}") from None


def read_bytes(source: Path | BinaryIO, limits: JSONLimits) -> bytes:
    """The bytes of a file (a path, or one already open) that should hold a document within ``limits``, read no
    further than the limit: a file of gigabytes costs no more than one at the limit.

    Raises :class:`JSONLimitError` for a larger file and ``OSError`` for one that cannot be read.
    """
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            data = fh.read(limits.max_bytes + 1)
    else:
        data = source.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise JSONLimitError(f"document is over the limit of {limits.max_bytes} bytes")
    return data


def load(source: Path | BinaryIO, limits: JSONLimits = FILE_LIMITS) -> Any:
    """The document in a file, parsed as :func:`loads` parses; ``OSError`` where it cannot be read."""
    return loads(read_bytes(source, limits), limits)
