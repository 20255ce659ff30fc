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


def oversized(msg_type: int, size: int, max_body: int) -> RemoteProtocolError:
    """The error for a header that announces more than ``max_body`` bytes."""
    return RemoteProtocolError(
        f"message type {msg_type} announces {size} bytes, more than the {max_body} allowed"
    )


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
    """Cuts a byte stream into frames: :meth:`next_frame` (a :class:`Frame`) or, on the
    client's receive path, :meth:`next_raw` (a plain tuple, no object to build).

    ``max_body`` bounds what a hostile size field can make us buffer: the header is rejected
    before a single body byte is stored.

    Why not :class:`ReceiveBuffer`: the receive path is per message, and every copy and
    call there counts (``benchmarks/bench_codec.py``). The bytes are kept as the ``bytes``
    object the socket returned plus a read position, so a header is unpacked in place and a
    body is one slice (one copy; none when the body is the whole read). Only a frame that
    spans reads is gathered, in a ``bytearray`` that grows until the frame is complete
    (linear however many reads a large frame takes), then turned into ``bytes`` once.
    """

    __slots__ = ("_data", "_header", "_need", "_pending", "_pos", "_serial", "max_body", "mini")

    def __init__(self, *, mini: bool, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.mini = mini
        self.max_body = max_body
        self._header = MINI_HEADER if mini else FULL_HEADER
        #: the bytes being parsed, and where parsing stands in them
        self._data = b""
        self._pos = 0
        #: a frame that spans reads, gathered until it is complete (then ``_data`` is empty)
        self._pending: bytearray | None = None
        self._serial = 0

    def feed(self, data: bytes) -> None:
        pending = self._pending
        if pending is not None:
            pending += data
            if len(pending) >= self._needed(pending, 0):
                self._data = bytes(pending)
                self._pos = 0
                self._pending = None
            return
        rest = len(self._data) - self._pos
        if not rest:
            self._data = bytes(data)  # no copy for bytes, which is what sockets return
            self._pos = 0
        elif rest + len(data) >= self._needed(self._data, self._pos):
            self._data = self._data[self._pos :] + data
            self._pos = 0
        else:
            gathered = bytearray(self._data[self._pos :])
            gathered += data
            self._pending = gathered
            self._data = b""
            self._pos = 0

    def _needed(self, buf: bytes | bytearray, pos: int) -> int:
        """Bytes from ``pos`` the frame starting there needs before it can be cut (or its
        header judged): the header alone until it is complete; 0 for an oversized one, so
        that it is judged at once."""
        header = self._header
        if len(buf) - pos < header.size:
            return header.size
        size = header.unpack_from(buf, pos)[1 if self.mini else 2]
        if size > self.max_body:
            return 0
        return int(header.size + size)

    @property
    def buffered(self) -> int:
        if self._pending is not None:
            return len(self._pending)
        return len(self._data) - self._pos

    def next_raw(self) -> tuple[int, int, bytes] | None:
        """``(serial, msg_type, body)`` of the next complete frame, or None for "feed more".

        Raises :class:`RemoteProtocolError` for a header announcing more than ``max_body``,
        as soon as the header is there (the frame is not consumed).
        """
        data = self._data
        pos = self._pos
        header = self._header
        start = pos + header.size
        if start > len(data):
            return None
        if self.mini:
            msg_type, size = MINI_HEADER.unpack_from(data, pos)
            serial = self._serial + 1
        else:
            serial, msg_type, size, _sub_list = FULL_HEADER.unpack_from(data, pos)
        if size > self.max_body:
            raise oversized(msg_type, size, self.max_body)
        end = start + size
        if end > len(data):
            return None
        self._pos = end
        self._serial = serial
        return serial, msg_type, data[start:end]

    def next_frame(self) -> Frame | None:
        raw = self.next_raw()
        if raw is None:
            return None
        return Frame(*raw)
