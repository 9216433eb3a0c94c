"""The SQLite outbox: bounded, drops oldest results only, survives reopening."""

from __future__ import annotations

from pathlib import Path

from agent.control.outbox import Outbox


def test_full_outbox_drops_oldest_results_never_events(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_results=5)
    box.put("event", [("e", b"deploy")])
    box.put("result", [("r", str(i).encode()) for i in range(8)])
    box.put("event", [("e", b"revert")])
    messages = box.next_batch(0, 100)
    assert [m.payload for m in messages] == [b"deploy", b"3", b"4", b"5", b"6", b"7", b"revert"]
    assert box.dropped_results() == 3 and box.depth() == 7


def test_ack_and_cursor(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_results=100)
    box.put("result", [("r", b"a"), ("r", b"b"), ("r", b"c")])
    first = box.next_batch(0, 2)
    assert [m.payload for m in first] == [b"a", b"b"]
    assert [m.payload for m in box.next_batch(first[-1].id, 10)] == [b"c"]
    box.ack(first[0].id)
    assert [m.payload for m in box.next_batch(0, 10)] == [b"b", b"c"]


def test_survives_reopening(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_results=2)
    box.put("result", [("r", b"1"), ("r", b"2"), ("r", b"3")])
    box.close()
    again = Outbox(tmp_path / "o.sqlite", max_results=2)
    assert [m.payload for m in again.next_batch(0, 10)] == [b"2", b"3"] and again.dropped_results() == 1
