"""The prepared wire bytes of a fanned-out frame equal what websockets itself would send."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from defiwatch.gateway.server import _text_frame, _WireFrames


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 70_000])
def test_a_prepared_text_frame_is_websockets_own_serialization(size: int) -> None:
    payload = b"x" * size
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert _text_frame(payload) == expected


def test_the_wire_bytes_follow_the_payload_object() -> None:
    wire = _WireFrames()
    first, second = b'{"type":"event","n":1}', b'{"type":"event","n":2}'
    assert wire.text(first) == _text_frame(first)
    assert wire.text(first) is wire.text(first)  # built once for the shared payload
    assert wire.text(second) == _text_frame(second)
    assert wire.text(first) == _text_frame(first)  # and rebuilt for another one
