"""JSON from outside, parsed with limits: nothing but JSONLimitError ever escapes, and valid documents round-trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bounded_json import FILE_LIMITS, JSONLimitError, JSONLimits, load, loads


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"[" * 5000 + b"]" * 5000, "nested deeper than 16 levels"),
        (b'{"a":' * 17 + b"1" + b"}" * 17, "nested deeper than 16 levels"),
        (b'{"n": ' + b"9" * 5000 + b"}", "number is longer than 40"),
        (b'{"n": 1e999}', "out of range"),
        (b'{"n": -1e400}', "out of range"),
        (b'{"n": NaN}', "NaN is not a JSON value"),
        (b'{"n": Infinity}', "Infinity is not a JSON value"),
        (b'{"s": "' + b"x" * 5000 + b'"}', "string is longer than 4096"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"a": 1', "not valid JSON"),
        (b"x" * 20000, "bytes, the limit is 16384"),
    ],
)
def test_hostile_documents_are_refused_by_name(payload: bytes, message: str) -> None:
    with pytest.raises(JSONLimitError, match=message):
        loads(payload)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    text = json.dumps({"name": "[" * 100 + '\\"{' * 50, "deep": [[[1]]]})
    assert loads(text)["deep"] == [[[1]]]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_documents_within_the_limits_round_trip(value: object) -> None:
    assert loads(json.dumps(value).encode(), JSONLimits(max_depth=64)) == value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | st.text(alphabet='[]{}"\\:,0123456789.eE-+ntrufalsNIy ', max_size=300))
def test_nothing_but_jsonlimiterror_escapes(payload: bytes | str) -> None:
    try:
        loads(payload)
    except JSONLimitError:
        pass


@pytest.mark.parametrize(
    "payload, message",
    [
        (b'{"n": 1E+309}', "out of range"),
        (b'{"n": 1e0309}', "out of range"),
        (b'{"n": -' + b"1" * 41 + b"}", "number is longer than 40"),
        (b'{"n": 1.' + b"0" * 39 + b"}", "number is longer than 40"),
        (b'{"a": {"b": [' * 6 + b"1" + b"]}}" * 6, "nested deeper than 16 levels"),
    ],
)
def test_the_quick_screens_send_every_suspect_to_the_exact_checks(payload: bytes, message: str) -> None:
    """A short document with a long number, a big exponent or deep nesting is not waved through."""
    with pytest.raises(JSONLimitError, match=message):
        loads(payload)


def test_what_only_looks_suspect_still_parses() -> None:
    """Brackets and digit runs inside strings, and small exponents, are screened but not refused."""
    text = json.dumps({"s": "[" * 40 + "1" * 60, "e": 1.5e-300, "f": 2.5e99, "g": [1e10, -3]})
    assert loads(text) == json.loads(text)


def test_a_file_is_read_no_further_than_its_limit(tmp_path: Path) -> None:
    """A sparse file of 64 GiB costs what one at the limit costs; an open file (a tar member) reads the same."""
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as fh:
        fh.truncate(64 << 30)
    with pytest.raises(JSONLimitError, match="over the limit of 16777216 bytes"):
        load(huge)
    small = tmp_path / "small.json"
    small.write_text('{"a": [1, 2.5, "x"]}')
    with open(small, "rb") as fh:
        assert load(small) == load(fh, FILE_LIMITS) == {"a": [1, 2.5, "x"]}


def test_files_written_by_pythons_json_keep_their_non_finite_figures() -> None:
    """A passport's unmeasured figure is written as NaN by ``json.dumps``; its reader judges it, as before."""
    text = json.dumps({"p99_ms": float("nan"), "ratio": float("inf"), "low": -1e999})
    found = loads(text, FILE_LIMITS)
    assert math.isnan(found["p99_ms"]) and found["ratio"] == math.inf and found["low"] == -math.inf
    assert loads('{"n": 1e999}', FILE_LIMITS)["n"] == math.inf
    with pytest.raises(JSONLimitError, match="NaN is not a JSON value"):
        loads(text)
