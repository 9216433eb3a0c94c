"""Hostile MQTT input for a real agent: what an attacker or a careless operator sends, and the checks after it.

Shared by ``tests/test_hostile_input.py`` (a bounded count, in CI) and ``bench/hostile_bench.py`` (10,000 and
more). Payloads are structurally nasty JSON (deep nesting, huge numbers, floats at the limits, odd Unicode,
wrong types), raw bytes, and well-formed ``set`` commands with extreme settings, some of which pass
validation (a region outside the frame, the slowest fps, a huge budget) and must then be honoured or
reported, never end a thread.
"""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import strategies as st

CAMERAS = ("door", "yard")
EXTREME_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1e-6, 0.009, 0.01, 1e300, 1.7976931348623157e308, -1.0, 1e6]
EXTREME_INTS = [0, -1, 1, 2**31, 2**63, 10**30, -(2**63)]
ODD_TEXT = st.sampled_from(["\u0000", "\ud800", "\u202e", "\u200b", "🎥" * 50, "A" * 5000, "..", "/etc/passwd"])


def _deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@st.composite
def structural(draw: st.DrawFn) -> bytes:
    """JSON that breaks parsers: nesting, numbers, constants, Unicode, wrong types, raw bytes."""
    kind = draw(st.sampled_from(["deep", "bignum", "float", "constant", "unicode", "types", "bytes", "keys"]))
    command_id = f"h-{draw(st.integers(0, 10**9))}"
    if kind == "deep":
        inner = _deep(draw(st.integers(17, 7000)), draw(st.sampled_from(["list", "dict"])))
        return f'{{"id":"{command_id}","cmd":"ping","x":{inner}}}'.encode()
    if kind == "bignum":
        digits = "9" * draw(st.integers(41, 15000))
        return f'{{"id":"{command_id}","cmd":"ping","n":{digits}}}'.encode()
    if kind == "float":
        token = draw(st.sampled_from(["1e999", "-1e999", "1e-999", "4.9e-324", "1.7976931348623157e308", "0e0"]))
        return f'{{"id":"{command_id}","cmd":"set","batching":{{"latency_budget_ms":{token}}}}}'.encode()
    if kind == "constant":
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return f'{{"id":"{command_id}","cmd":"set","camera":"door","settings":{{"fps":{token}}}}}'.encode()
    if kind == "unicode":
        text = draw(ODD_TEXT)
        return json.dumps({"id": command_id, "cmd": text, "camera": text}, ensure_ascii=draw(st.booleans())).encode(
            "utf-8", "surrogatepass"
        )
    if kind == "types":
        wrong = draw(st.sampled_from([None, 1, [], {}, True, 1.5, "x" * 100]))
        field = draw(st.sampled_from(["id", "cmd", "camera", "settings", "batching", "bundle", "force"]))
        return json.dumps({"id": command_id, "cmd": "set", field: wrong}).encode()
    if kind == "keys":
        keys = draw(st.lists(ODD_TEXT, min_size=1, max_size=5))
        return json.dumps({"id": command_id, "cmd": "status", **{k: 1 for k in keys}}).encode("utf-8", "surrogatepass")
    return draw(st.binary(max_size=400))


@st.composite
def extreme_setting(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed ``set`` with values at and past every bound."""
    command_id = f"x-{draw(st.integers(0, 10**9))}"
    if draw(st.booleans()):
        batching = {
            draw(st.sampled_from(["latency_budget_ms", "fixed_batch", "max_batch"])): draw(
                st.sampled_from(EXTREME_FLOATS + EXTREME_INTS)
            ),
            "mode": draw(st.sampled_from(["adaptive", "fixed"])),
        }
        return {"id": command_id, "cmd": "set", "batching": batching}
    key = draw(st.sampled_from(["fps", "stride", "stall_timeout_s", "region", "reconnect", "paused", "loop"]))
    value: Any = draw(st.sampled_from(EXTREME_FLOATS + EXTREME_INTS))
    if key == "region":
        value = draw(
            st.sampled_from([[0, 0, 10**6, 10], [600, 400, 40, 40], [0, 0, 16, 16], [-1, 0, 5, 5], [0, 0, 0, 0]])
        )
    if key == "reconnect":
        value = {"initial_s": draw(st.sampled_from(EXTREME_FLOATS)), "max_s": draw(st.sampled_from(EXTREME_FLOATS))}
    return {"id": command_id, "cmd": "set", "camera": draw(st.sampled_from(CAMERAS)), "settings": {key: value}}


def restore(operator: Any, cameras: dict[str, dict[str, Any]]) -> None:
    """Put the cameras' and batching settings back as they were, so the checks see a working device."""
    for name, settings in cameras.items():
        reply = operator.send(
            {"id": f"restore-{name}-{time.monotonic_ns()}", "cmd": "set", "camera": name, "settings": settings}
        )
        assert reply["ok"], reply
    reply = operator.send(
        {
            "id": f"restore-b-{time.monotonic_ns()}",
            "cmd": "set",
            "batching": {"latency_budget_ms": 100, "mode": "adaptive", "max_batch": None},
        }
    )
    assert reply["ok"], reply


def check_alive_and_truthful(operator: Any, results_count: Any) -> dict[str, Any]:
    """The agent answers, serves every camera it says is connected, its inference thread lives, results flow."""
    assert operator.send({"id": f"ping-{time.monotonic_ns()}", "cmd": "ping"})["ok"]
    before = operator.send({"id": f"st-{time.monotonic_ns()}", "cmd": "status"})["result"]
    results_before = results_count()
    deadline = time.monotonic() + 20
    while True:
        time.sleep(0.5)
        after = operator.send({"id": f"st-{time.monotonic_ns()}", "cmd": "status"})["result"]
        progressed = {
            name: after["cameras"][name]["counts"]["processed"] > before["cameras"][name]["counts"]["processed"]
            for name in CAMERAS
        }
        connected = [n for n in CAMERAS if after["cameras"][n]["state"] == "connected"]
        if all(progressed[n] for n in connected) and connected and results_count() > results_before:
            break
        assert time.monotonic() < deadline, f"stopped serving or untruthful status: {after}"
    assert after["inference"]["alive"], after["inference"]
    for name in CAMERAS:  # a failed camera says why
        state = after["cameras"][name]
        assert state["state"] != "failed" or state["error"], state
    return after
