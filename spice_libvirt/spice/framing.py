"""Data-message framing: the full and mini headers, and a bounded receive buffer.

After the link, every message is ``header + body``. The header is the 6-byte mini header
when the *peer* advertised MINI_HEADER, else the 18-byte full header with an explicit serial.
With the mini header the serial is implicit: both sides count messages from 1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from spice_libvirt.errors import LocalProtocolError, RemoteProtocolError

MINI_HEADER = struct.Struct("<HI")
FULL_HEADER = struct.Struct("<QHII")

#: Largest body accepted by default. spice-server's biggest messages are display images
#: and migration data (a few MiB); anything larger is treated as hostile.
DEFAULT_MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    serial: int
    msg_type: int
    body: bytes


def encode_frame(msg_type: int, body: bytes, *, mini: bool, serial: int = 0) -> bytes:
    """Header + body. ``serial`` is only written with the full header."""
    if not 0 <= msg_type <= 0xFFFF:
        raise LocalProtocolError(f"message type {msg_type} does not fit in u16")
    if len(body) > 0xFFFFFFFF:
        raise LocalProtocolError("message body does not fit in u32")
    if mini:
        return MINI_HEADER.pack(msg_type, len(body)) + body
    return FULL_HEADER.pack(serial, msg_type, len(body), 0) + body


class ReceiveBuffer:
    """Bytes received but not yet parsed. Compacts lazily so that many small messages in one
    read cost one copy, not one per message."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def feed(self, data: bytes) -> None:
        if self._start and self._start > len(self._data) // 2:
            del self._data[: self._start]
            self._start = 0
        self._data += data

    def peek(self, size: int) -> bytes | None:
        if len(self) < size:
            return None
        return bytes(self._data[self._start : self._start + size])

    def take(self, size: int) -> bytes | None:
        if len(self) < size:
            return None
        chunk = bytes(self._data[self._start : self._start + size])
        self._start += size
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        return chunk

    def take_all(self) -> bytes:
        chunk = bytes(self._data[self._start :])
        self._data.clear()
        self._start = 0
        return chunk


class FrameDecoder:
    """Cuts a byte stream into :class:`Frame` objects.

    ``max_body`` bounds what a hostile size field can make us buffer: the header is rejected
    before a single body byte is stored.
    """

    def __init__(self, *, mini: bool, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.mini = mini
        self.max_body = max_body
        self._buffer = ReceiveBuffer()
        self._serial = 0
        self._header = MINI_HEADER if mini else FULL_HEADER

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> Frame | None:
        head = self._buffer.peek(self._header.size)
        if head is None:
            return None
        if self.mini:
            msg_type, size = MINI_HEADER.unpack(head)
            serial = self._serial + 1
        else:
            serial, msg_type, size, _sub_list = FULL_HEADER.unpack(head)
        if size > self.max_body:
            raise RemoteProtocolError(
                f"message type {msg_type} announces {size} bytes, more than the {self.max_body} allowed"
            )
        if len(self._buffer) < self._header.size + size:
            return None
        self._buffer.take(self._header.size)
        body = self._buffer.take(size)
        assert body is not None
        self._serial = serial
        return Frame(serial, msg_type, body)
