"""The per-connection send buffer: bounded, conflating per (channel, series), never stale."""

from __future__ import annotations

import pytest

from defiwatch.gateway.outbox import Outbox, PushResult


def drain(outbox: Outbox) -> list[bytes]:
    return [outbox.popleft() for _ in range(len(outbox))]


def test_queues_in_order_until_full() -> None:
    outbox = Outbox(3)
    assert [outbox.push(f, k) for f, k in [(b"a1", "a"), (b"b1", "b"), (b"a2", "a")]] == [
        PushResult.QUEUED] * 3
    assert drain(outbox) == [b"a1", b"b1", b"a2"]


def test_full_outbox_keeps_the_newest_frame_of_each_key_in_its_place() -> None:
    outbox = Outbox(4)
    for frame, key in [(b"a1", "a"), (b"ack", None), (b"b1", "b"), (b"a2", "a")]:
        outbox.push(frame, key)
    assert outbox.push(b"b2", "b") is PushResult.CONFLATED
    assert outbox.conflated == 2
    assert drain(outbox) == [b"ack", b"a2", b"b2"]


def test_frames_without_a_key_are_never_dropped() -> None:
    outbox = Outbox(2)
    outbox.push(b"x", None)
    outbox.push(b"y", None)
    assert outbox.push(b"z", None) is PushResult.OVERFLOW
    assert drain(outbox) == [b"x", b"y"]


def test_overflow_when_conflation_cannot_make_room() -> None:
    outbox = Outbox(3)
    for i, key in enumerate("abc"):
        outbox.push(bytes([i]), key)
    assert outbox.push(b"d", "d") is PushResult.OVERFLOW
    assert len(outbox) == 3 and outbox.conflated == 0


def test_clear() -> None:
    outbox = Outbox(5)
    outbox.push(b"a", "a")
    outbox.push(b"b", None)
    assert outbox.clear() == 2 and len(outbox) == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Outbox(0)
