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
#: (compressed by default; an uncompressed one of 2560x1600 at 32 bits is 15.6 MiB) and
#: migration data (KiB); anything larger is treated as hostile. A session's channels
#: together hold at most ``options.RECEIVE_BUDGET`` of unfinished messages.
DEFAULT_MAX_BODY = 16 * 1024 * 1024


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
    spans reads is gathered: the reads are kept as they came, in a list, and its body is
    joined from them once, when the frame is complete (:meth:`_complete`) -- what a partial
    frame costs is the bytes received, and a large one is copied once, not three times (a
    grown buffer, its bytes, the body's slice): with a hostile server sending the largest
    messages allowed, that is the difference between 2 and 4 times ``max_body`` resident.
    """

    __slots__ = (
        "_data",
        "_got",
        "_header",
        "_need",
        "_pending",
        "_pos",
        "_ready",
        "_serial",
        "max_body",
        "mini",
    )

    def __init__(self, *, mini: bool, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.mini = mini
        self.max_body = max_body
        self._header = MINI_HEADER if mini else FULL_HEADER
        #: the bytes being parsed, and where parsing stands in them
        self._data = b""
        self._pos = 0
        #: a frame that spans reads: the reads so far, their length, and the length it
        #: needs before it can be cut (0 while its header is incomplete)
        self._pending: list[bytes] | None = None
        self._got = 0
        self._need = 0
        #: a gathered frame, complete: (serial from a full header or 0, type, body)
        self._ready: tuple[int, int, bytes] | None = None
        self._serial = 0

    def feed(self, data: bytes) -> None:
        pending = self._pending
        if pending is not None:
            pending.append(data)
            self._got += len(data)
            if not self._need and self._got >= self._header.size:
                self._need = self._needed(b"".join(pending), 0)
            if self._need and self._got >= self._need:
                self._complete(pending)
            return
        rest = len(self._data) - self._pos
        if not rest:
            self._data = bytes(data)  # no copy for bytes, which is what sockets return
            self._pos = 0
        elif rest + len(data) >= self._needed(self._data, self._pos):
            self._data = self._data[self._pos :] + data
            self._pos = 0
        else:
            head = self._data[self._pos :]
            self._pending = [head, bytes(data)]
            self._got = rest + len(data)
            self._need = self._needed(head, 0) if rest >= self._header.size else 0
            self._data = b""
            self._pos = 0

    def _complete(self, chunks: list[bytes]) -> None:
        """The gathered frame is complete: its body joined straight from the reads; what
        follows it in the last read is parsed as usual."""
        self._pending = None
        self._pos = 0
        header = self._header
        while len(chunks[0]) < header.size:  # a header split across reads (rare, small)
            chunks[0:2] = [chunks[0] + chunks[1]]
        fields = header.unpack_from(chunks[0])
        if self.mini:
            serial, (msg_type, size) = 0, fields
        else:
            serial, msg_type, size, _sub_list = fields
        if size > self.max_body:  # judged by next_raw, at the header
            self._data = b"".join(chunks)
            return
        parts: list[bytes] = []
        left = size
        for index, chunk in enumerate(chunks):
            piece = chunk[header.size :] if index == 0 else chunk
            if len(piece) >= left:
                parts.append(piece[:left])
                self._data = piece[left:]
                break
            parts.append(piece)
            left -= len(piece)
        self._ready = (serial, msg_type, b"".join(parts))

    def _needed(self, buf: bytes | bytearray, pos: int) -> int:
        """Bytes from ``pos`` the frame starting there needs before it can be cut (or its
        header judged): the header alone until it is complete; 1 for an oversized one, so
        that it is judged at once."""
        header = self._header
        if len(buf) - pos < header.size:
            return header.size
        size = header.unpack_from(buf, pos)[1 if self.mini else 2]
        if size > self.max_body:
            return 1
        return int(header.size + size)

    @property
    def buffered(self) -> int:
        if self._pending is not None:
            return self._got
        ready = self._header.size + len(self._ready[2]) if self._ready is not None else 0
        return ready + len(self._data) - self._pos

    @property
    def ready(self) -> bool:
        """A gathered frame waits to be handed out (before anything in ``_data``)."""
        return self._ready is not None

    def next_raw(self) -> tuple[int, int, bytes] | None:
        """``(serial, msg_type, body)`` of the next complete frame, or None for "feed more".

        Raises :class:`RemoteProtocolError` for a header announcing more than ``max_body``,
        as soon as the header is there (the frame is not consumed).
        """
        ready = self._ready
        if ready is not None:
            self._ready = None
            serial = ready[0] if not self.mini else self._serial + 1
            self._serial = serial
            return serial, ready[1], ready[2]
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


class ReceiveBudget:
    """What every connection of one session holds of unfinished messages, bounded together.

    Each connection reports what it holds whenever it is about to read (and after it fed
    what it read); the sum over the session may not pass ``limit``. A per-connection bound
    alone lets a server that opens many channels multiply it: this is the session's.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[int, int] = {}
        self.total = 0
        #: the largest total seen (figures for benchmarks)
        self.peak = 0

    def report(self, owner: object, held: int) -> None:
        """``owner`` now holds ``held`` bytes; over the limit is the peer's protocol error."""
        key = id(owner)
        self.total += held - self._held.get(key, 0)
        self._held[key] = held
        self.peak = max(self.peak, self.total)
        if self.total > self.limit:
            raise RemoteProtocolError(
                f"the server keeps {self.total} bytes of unfinished messages on "
                f"{sum(1 for v in self._held.values() if v)} channels, more than the "
                f"session's {self.limit}"
            )

    def forget(self, owner: object) -> None:
        self.total -= self._held.pop(id(owner), 0)
