"""Websocket frames as a server writes them on the wire, for senders that bypass aiohttp.

aiohttp's `send_frame` costs about as much per frame as a Python client's receive, so
a sender meant to be faster than the recorder (the replay's sender, and the fake's
market-load publisher and the benchmark's blast server, which import it from here)
builds the RFC 6455 frames itself and hands the
transport one buffer per batch. Server frames are unmasked; every one here is final.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

_TEXT = 0x81  # FIN + text opcode


def frame_header(length: int) -> bytes:
    """RFC 6455 frame header of a final text frame carrying `length` payload bytes."""
    if length < 126:
        return struct.pack("!BB", _TEXT, length)
    if length < 1 << 16:
        return struct.pack("!BBH", _TEXT, 126, length)
    return struct.pack("!BBQ", _TEXT, 127, length)


def websocket_wire(frames: Iterable[bytes]) -> bytes:
    """The payloads as consecutive text frames on the wire, ready for one write."""
    parts: list[bytes] = []
    for frame in frames:
        parts.append(frame_header(len(frame)))
        parts.append(frame)
    return b"".join(parts)
