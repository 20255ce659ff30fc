"""The message base classes, DstInfo, and the messages every channel shares (sans-IO).

Each message is a frozen dataclass with a ``TYPE`` number, ``encode_body()`` and
``decode_body()``. Pointer fields (``DstInfo``'s host and cert subject, the port name) use
the u32-offset encoding of spice-common's generated marshallers: the offset counts from the
start of the body and the pointed bytes follow the fixed part, in field order.

Decoding is strict about what it reads (every length, count and offset is checked against
the body, so a hostile peer gets :class:`~spice_libvirt.errors.RemoteProtocolError` and never
an allocation past the body) and lenient about trailing bytes, as spice-gtk's demarshaller
is: a newer server may append fields.

Messages a client does not interpret (display drawing, audio, ...) decode as
:class:`UnknownMessage` with their raw body, which is enough to count, acknowledge and forward
them.
"""

from __future__ import annotations

import dataclasses
import struct
import types
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self, TypeVar

from spice_libvirt.errors import LocalProtocolError, RemoteProtocolError

U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")

#: DstInfo ports of 0 or 0xFFFF mean "no such port" (spice-server truncates -1 to 0xFFFF).
ABSENT_PORTS = (0, 0xFFFF)

_C = TypeVar("_C", bound=type)


def fast_init(cls: _C) -> _C:
    """Give a ``@dataclass(frozen=True, slots=True)`` class an ``__init__`` that is ~3x faster.

    Why: the client builds two such objects per message it receives (the message and the
    :class:`~spice_libvirt.spice.connection.MessageReceived` event), and the ``__init__``
    that ``dataclasses`` generates for a frozen class sets every field through
    ``object.__setattr__`` (a global lookup, an attribute lookup and a call each): it was a
    third of the receive path (``benchmarks/RESULTS.md``). This one stores every field
    through its slot's descriptor directly. Everything else stays ``dataclasses``' own:
    the same parameters and defaults (so ``dataclasses.replace`` works), ``__eq__``,
    ``__hash__``, ``__repr__``, ``fields()``, and assignment still raises
    ``FrozenInstanceError``. Apply it above ``@dataclass``.
    """
    env: dict[str, Any] = {}
    params: list[str] = []
    lines: list[str] = []
    for f in fields(cls):
        if not f.init or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"fast_init: {cls.__name__}.{f.name} needs dataclasses' own __init__")
        slot = next(
            (
                k.__dict__[f.name]
                for k in cls.__mro__
                if isinstance(k.__dict__.get(f.name), types.MemberDescriptorType)
            ),
            None,
        )
        if slot is None:
            raise TypeError(f"fast_init: {cls.__name__}.{f.name} is not a slot")
        env[f"_set_{f.name}"] = slot.__set__
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            env[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        lines.append(f"    _set_{f.name}(self, {f.name})")
    if hasattr(cls, "__post_init__"):
        lines.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(lines or ["    pass"])
    namespace: dict[str, Any] = {}
    exec(source, env, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    setattr(cls, "__init__", init)  # noqa: B010 - mypy refuses a direct assignment
    return cls


class Message:
    """Base of every typed message. Subclasses are frozen dataclasses."""

    TYPE: ClassVar[int]
    #: spice-protocol's name without prefixes, for reports and logs.
    NAME: ClassVar[str]

    def encode_body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        raise NotImplementedError


class FixedMessage(Message):
    """A message that is exactly one ``struct`` layout, fields in declaration order."""

    LAYOUT: ClassVar[struct.Struct]

    def encode_body(self) -> bytes:
        values = [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]
        try:
            return self.LAYOUT.pack(*values)
        except struct.error as exc:
            raise LocalProtocolError(f"{self.NAME}: {exc}") from exc

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if len(body) < cls.LAYOUT.size:
            raise RemoteProtocolError(f"{cls.NAME} needs {cls.LAYOUT.size} bytes, got {len(body)}")
        return cls(*cls.LAYOUT.unpack_from(body))


class RawMessage(Message):
    """A message whose whole body is opaque bytes (``Data`` in spice.proto)."""

    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        return cls(bytes(body))  # type: ignore[call-arg]


class EmptyMessage(Message):
    def encode_body(self) -> bytes:
        return b""

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        return cls()


@fast_init
@dataclass(frozen=True, slots=True)
class UnknownMessage(Message):
    """A message this codec does not model; kept whole so it can be counted or forwarded."""

    msg_type: int
    data: bytes
    NAME: ClassVar[str] = "UNKNOWN"

    @property
    def type(self) -> int:
        return self.msg_type

    def encode_body(self) -> bytes:
        return self.data


def _read_string(body: bytes, offset: int, size: int, what: str, *, nonnull: bool) -> str | None:
    """A zero-terminated string behind a u32 offset, checked against the body."""
    if offset == 0:
        if nonnull and size:
            raise RemoteProtocolError(f"{what}: required pointer is NULL")
        return None
    end = offset + size
    if size == 0 or end > len(body):
        raise RemoteProtocolError(f"{what}: {size} bytes at offset {offset} exceed {len(body)}")
    raw = body[offset:end]
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what} is not UTF-8") from exc


def _zstring(text: str | None) -> bytes:
    return b"" if text is None else text.encode("utf-8") + b"\0"


# ---------------------------------------------------------------------------------------
# DstInfo: MIGRATE_BEGIN, MIGRATE_SWITCH_HOST, MIGRATE_BEGIN_SEAMLESS

DST_INFO = struct.Struct("<HHIIII")


@fast_init
@dataclass(frozen=True, slots=True)
class DstInfo:
    """Where the client should go: host, plain port, TLS port, expected cert subject."""

    host: str | None
    port: int | None
    tls_port: int | None
    cert_subject: str | None = None

    def encode(self, tail: bytes = b"", *, nonnull: bool = True) -> bytes:
        """Fixed part (+ ``tail`` fixed fields) then the pointed strings."""
        host = _zstring(self.host)
        if nonnull and not host:
            raise LocalProtocolError("DstInfo needs a host")
        subject = _zstring(self.cert_subject)
        fixed = DST_INFO.size + len(tail)
        host_off = fixed if host else 0
        subject_off = fixed + len(host) if subject else 0
        head = DST_INFO.pack(
            0xFFFF if self.port is None else self.port,
            0xFFFF if self.tls_port is None else self.tls_port,
            len(host),
            host_off,
            len(subject),
            subject_off,
        )
        return head + tail + host + subject

    @classmethod
    def decode(cls, body: bytes, what: str, *, nonnull: bool = True) -> DstInfo:
        if len(body) < DST_INFO.size:
            raise RemoteProtocolError(f"{what} needs {DST_INFO.size} bytes, got {len(body)}")
        port, sport, host_size, host_off, subj_size, subj_off = DST_INFO.unpack_from(body)
        host = _read_string(body, host_off, host_size, f"{what} host", nonnull=nonnull)
        subject = (
            _read_string(body, subj_off, subj_size, f"{what} cert subject", nonnull=False)
            if subj_size
            else None
        )
        return cls(
            host=host,
            port=None if port in ABSENT_PORTS else port,
            tls_port=None if sport in ABSENT_PORTS else sport,
            cert_subject=subject or None,
        )


# ---------------------------------------------------------------------------------------
# Common server messages (every channel)


@fast_init
@dataclass(frozen=True, slots=True)
class Migrate(FixedMessage):
    flags: int
    TYPE: ClassVar[int] = 1
    NAME: ClassVar[str] = "MIGRATE"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
@dataclass(frozen=True, slots=True)
class MigrateData(RawMessage):
    data: bytes
    TYPE: ClassVar[int] = 2
    NAME: ClassVar[str] = "MIGRATE_DATA"


@fast_init
@dataclass(frozen=True, slots=True)
class SetAck(FixedMessage):
    generation: int
    window: int
    TYPE: ClassVar[int] = 3
    NAME: ClassVar[str] = "SET_ACK"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")


PING_FIXED = struct.Struct("<IQ")
_unpack_ping = PING_FIXED.unpack_from


@fast_init
@dataclass(frozen=True, slots=True)
class Ping(Message):
    id: int
    timestamp: int
    data: bytes = b""
    TYPE: ClassVar[int] = 4
    NAME: ClassVar[str] = "PING"

    def encode_body(self) -> bytes:
        return PING_FIXED.pack(self.id, self.timestamp) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if len(body) < 12:  # PING_FIXED.size, spelled out: this runs for every PING
            raise RemoteProtocolError(f"PING needs 12 bytes, got {len(body)}")
        ping_id, stamp = _unpack_ping(body)
        return cls(ping_id, stamp, bytes(body[12:]))


WAIT_ENTRY = struct.Struct("<BBQ")


@fast_init
@dataclass(frozen=True, slots=True)
class WaitForChannels(Message):
    waits: tuple[tuple[int, int, int], ...]
    TYPE: ClassVar[int] = 5
    NAME: ClassVar[str] = "WAIT_FOR_CHANNELS"

    def encode_body(self) -> bytes:
        if len(self.waits) > 255:
            raise LocalProtocolError("WAIT_FOR_CHANNELS holds at most 255 entries")
        return U8.pack(len(self.waits)) + b"".join(WAIT_ENTRY.pack(*w) for w in self.waits)

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if not body:
            raise RemoteProtocolError("WAIT_FOR_CHANNELS is empty")
        count = body[0]
        if 1 + count * WAIT_ENTRY.size > len(body):
            raise RemoteProtocolError(
                f"WAIT_FOR_CHANNELS announces {count} entries, body too short"
            )
        return cls(
            tuple(WAIT_ENTRY.unpack_from(body, 1 + i * WAIT_ENTRY.size) for i in range(count))
        )


@fast_init
@dataclass(frozen=True, slots=True)
class Disconnecting(FixedMessage):
    time_stamp: int
    reason: int
    TYPE: ClassVar[int] = 6
    NAME: ClassVar[str] = "DISCONNECTING"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QI")


NOTIFY_FIXED = struct.Struct("<QIIII")


@fast_init
@dataclass(frozen=True, slots=True)
class Notify(Message):
    time_stamp: int
    severity: int
    visibility: int
    what: int
    message: str
    TYPE: ClassVar[int] = 7
    NAME: ClassVar[str] = "NOTIFY"

    def encode_body(self) -> bytes:
        text = self.message.encode("utf-8") + b"\0"
        return (
            NOTIFY_FIXED.pack(self.time_stamp, self.severity, self.visibility, self.what, len(text))
            + text
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if len(body) < NOTIFY_FIXED.size:
            raise RemoteProtocolError(f"NOTIFY needs 24 bytes, got {len(body)}")
        stamp, severity, visibility, what, length = NOTIFY_FIXED.unpack_from(body)
        end = NOTIFY_FIXED.size + length
        if end > len(body):
            raise RemoteProtocolError(f"NOTIFY text of {length} bytes exceeds the body")
        text = body[NOTIFY_FIXED.size : end].split(b"\0", 1)[0]
        return cls(stamp, severity, visibility, what, text.decode("utf-8", "replace"))


# ---------------------------------------------------------------------------------------
# Common client messages


@fast_init
@dataclass(frozen=True, slots=True)
class AckSync(FixedMessage):
    generation: int
    TYPE: ClassVar[int] = 1
    NAME: ClassVar[str] = "ACK_SYNC"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
@dataclass(frozen=True, slots=True)
class Ack(EmptyMessage):
    TYPE: ClassVar[int] = 2
    NAME: ClassVar[str] = "ACK"


@fast_init
@dataclass(frozen=True, slots=True)
class Pong(FixedMessage):
    id: int
    timestamp: int
    TYPE: ClassVar[int] = 3
    NAME: ClassVar[str] = "PONG"
    LAYOUT: ClassVar[struct.Struct] = PING_FIXED


@fast_init
@dataclass(frozen=True, slots=True)
class MigrateFlushMark(EmptyMessage):
    TYPE: ClassVar[int] = 4
    NAME: ClassVar[str] = "MIGRATE_FLUSH_MARK"


@fast_init
@dataclass(frozen=True, slots=True)
class ClientMigrateData(RawMessage):
    data: bytes
    TYPE: ClassVar[int] = 5
    NAME: ClassVar[str] = "MIGRATE_DATA"


@fast_init
@dataclass(frozen=True, slots=True)
class ClientDisconnecting(FixedMessage):
    time_stamp: int
    reason: int
    TYPE: ClassVar[int] = 6
    NAME: ClassVar[str] = "DISCONNECTING"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QI")
