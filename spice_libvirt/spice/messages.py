"""Typed SPICE data messages and their body codec (sans-IO, no framing).

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

import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Self

from spice_libvirt.errors import LocalProtocolError, RemoteProtocolError
from spice_libvirt.spice.constants import MIGRATION_PROTOCOL_VERSION, ChannelType

U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")

#: DstInfo ports of 0 or 0xFFFF mean "no such port" (spice-server truncates -1 to 0xFFFF).
ABSENT_PORTS = (0, 0xFFFF)


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


@dataclass(frozen=True, slots=True)
class Migrate(FixedMessage):
    flags: int
    TYPE: ClassVar[int] = 1
    NAME: ClassVar[str] = "MIGRATE"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class MigrateData(RawMessage):
    data: bytes
    TYPE: ClassVar[int] = 2
    NAME: ClassVar[str] = "MIGRATE_DATA"


@dataclass(frozen=True, slots=True)
class SetAck(FixedMessage):
    generation: int
    window: int
    TYPE: ClassVar[int] = 3
    NAME: ClassVar[str] = "SET_ACK"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")


PING_FIXED = struct.Struct("<IQ")


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
        if len(body) < PING_FIXED.size:
            raise RemoteProtocolError(f"PING needs 12 bytes, got {len(body)}")
        ping_id, stamp = PING_FIXED.unpack_from(body)
        return cls(ping_id, stamp, bytes(body[PING_FIXED.size :]))


WAIT_ENTRY = struct.Struct("<BBQ")


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


@dataclass(frozen=True, slots=True)
class Disconnecting(FixedMessage):
    time_stamp: int
    reason: int
    TYPE: ClassVar[int] = 6
    NAME: ClassVar[str] = "DISCONNECTING"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QI")


NOTIFY_FIXED = struct.Struct("<QIIII")


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


@dataclass(frozen=True, slots=True)
class AckSync(FixedMessage):
    generation: int
    TYPE: ClassVar[int] = 1
    NAME: ClassVar[str] = "ACK_SYNC"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class Ack(EmptyMessage):
    TYPE: ClassVar[int] = 2
    NAME: ClassVar[str] = "ACK"


@dataclass(frozen=True, slots=True)
class Pong(FixedMessage):
    id: int
    timestamp: int
    TYPE: ClassVar[int] = 3
    NAME: ClassVar[str] = "PONG"
    LAYOUT: ClassVar[struct.Struct] = PING_FIXED


@dataclass(frozen=True, slots=True)
class MigrateFlushMark(EmptyMessage):
    TYPE: ClassVar[int] = 4
    NAME: ClassVar[str] = "MIGRATE_FLUSH_MARK"


@dataclass(frozen=True, slots=True)
class ClientMigrateData(RawMessage):
    data: bytes
    TYPE: ClassVar[int] = 5
    NAME: ClassVar[str] = "MIGRATE_DATA"


@dataclass(frozen=True, slots=True)
class ClientDisconnecting(FixedMessage):
    time_stamp: int
    reason: int
    TYPE: ClassVar[int] = 6
    NAME: ClassVar[str] = "DISCONNECTING"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QI")


# ---------------------------------------------------------------------------------------
# Main channel, server side


@dataclass(frozen=True, slots=True)
class MainMigrateBegin(Message):
    dst: DstInfo
    TYPE: ClassVar[int] = 101
    NAME: ClassVar[str] = "MIGRATE_BEGIN"

    def encode_body(self) -> bytes:
        return self.dst.encode()

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        return cls(DstInfo.decode(body, cls.NAME))


@dataclass(frozen=True, slots=True)
class MainMigrateCancel(EmptyMessage):
    TYPE: ClassVar[int] = 102
    NAME: ClassVar[str] = "MIGRATE_CANCEL"


@dataclass(frozen=True, slots=True)
class MainInit(FixedMessage):
    session_id: int
    display_channels_hint: int
    supported_mouse_modes: int
    current_mouse_mode: int
    agent_connected: int
    agent_tokens: int
    multi_media_time: int
    ram_hint: int
    TYPE: ClassVar[int] = 103
    NAME: ClassVar[str] = "INIT"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<8I")


@dataclass(frozen=True, slots=True)
class MainChannelsList(Message):
    channels: tuple[tuple[int, int], ...]
    TYPE: ClassVar[int] = 104
    NAME: ClassVar[str] = "CHANNELS_LIST"

    def encode_body(self) -> bytes:
        return U32.pack(len(self.channels)) + b"".join(bytes(c) for c in self.channels)

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if len(body) < 4:
            raise RemoteProtocolError("CHANNELS_LIST needs 4 bytes")
        (count,) = U32.unpack_from(body)
        if 4 + 2 * count > len(body):
            raise RemoteProtocolError(f"CHANNELS_LIST announces {count} channels, body too short")
        return cls(tuple((body[4 + 2 * i], body[5 + 2 * i]) for i in range(count)))


@dataclass(frozen=True, slots=True)
class MainMouseMode(FixedMessage):
    supported_modes: int
    current_mode: int
    TYPE: ClassVar[int] = 105
    NAME: ClassVar[str] = "MOUSE_MODE"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<HH")


@dataclass(frozen=True, slots=True)
class MainMultiMediaTime(FixedMessage):
    time: int
    TYPE: ClassVar[int] = 106
    NAME: ClassVar[str] = "MULTI_MEDIA_TIME"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class MainAgentConnected(EmptyMessage):
    TYPE: ClassVar[int] = 107
    NAME: ClassVar[str] = "AGENT_CONNECTED"


@dataclass(frozen=True, slots=True)
class MainAgentDisconnected(FixedMessage):
    error_code: int
    TYPE: ClassVar[int] = 108
    NAME: ClassVar[str] = "AGENT_DISCONNECTED"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class MainAgentData(RawMessage):
    data: bytes
    TYPE: ClassVar[int] = 109
    NAME: ClassVar[str] = "AGENT_DATA"


@dataclass(frozen=True, slots=True)
class MainAgentToken(FixedMessage):
    num_tokens: int
    TYPE: ClassVar[int] = 110
    NAME: ClassVar[str] = "AGENT_TOKEN"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class MainMigrateSwitchHost(Message):
    dst: DstInfo
    TYPE: ClassVar[int] = 111
    NAME: ClassVar[str] = "MIGRATE_SWITCH_HOST"

    def encode_body(self) -> bytes:
        return self.dst.encode(nonnull=False)

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        return cls(DstInfo.decode(body, cls.NAME, nonnull=False))


@dataclass(frozen=True, slots=True)
class MainMigrateEnd(EmptyMessage):
    TYPE: ClassVar[int] = 112
    NAME: ClassVar[str] = "MIGRATE_END"


@dataclass(frozen=True, slots=True)
class MainName(Message):
    name: str
    TYPE: ClassVar[int] = 113
    NAME: ClassVar[str] = "NAME"

    def encode_body(self) -> bytes:
        text = self.name.encode("utf-8") + b"\0"
        return U32.pack(len(text)) + text

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if len(body) < 4:
            raise RemoteProtocolError("NAME needs 4 bytes")
        (length,) = U32.unpack_from(body)
        if 4 + length > len(body):
            raise RemoteProtocolError(f"NAME of {length} bytes exceeds the body")
        return cls(body[4 : 4 + length].split(b"\0", 1)[0].decode("utf-8", "replace"))


@dataclass(frozen=True, slots=True)
class MainUuid(Message):
    uuid: bytes
    TYPE: ClassVar[int] = 114
    NAME: ClassVar[str] = "UUID"

    def encode_body(self) -> bytes:
        if len(self.uuid) != 16:
            raise LocalProtocolError("UUID is 16 bytes")
        return self.uuid

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if len(body) < 16:
            raise RemoteProtocolError(f"UUID needs 16 bytes, got {len(body)}")
        return cls(bytes(body[:16]))


@dataclass(frozen=True, slots=True)
class MainAgentConnectedTokens(FixedMessage):
    num_tokens: int
    TYPE: ClassVar[int] = 115
    NAME: ClassVar[str] = "AGENT_CONNECTED_TOKENS"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class MainMigrateBeginSeamless(Message):
    dst: DstInfo
    src_mig_version: int = MIGRATION_PROTOCOL_VERSION
    TYPE: ClassVar[int] = 116
    NAME: ClassVar[str] = "MIGRATE_BEGIN_SEAMLESS"

    def encode_body(self) -> bytes:
        return self.dst.encode(U32.pack(self.src_mig_version))

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if len(body) < DST_INFO.size + 4:
            raise RemoteProtocolError(f"{cls.NAME} needs 24 bytes, got {len(body)}")
        (version,) = U32.unpack_from(body, DST_INFO.size)
        return cls(DstInfo.decode(body, cls.NAME), version)


@dataclass(frozen=True, slots=True)
class MainMigrateDstSeamlessAck(EmptyMessage):
    TYPE: ClassVar[int] = 117
    NAME: ClassVar[str] = "MIGRATE_DST_SEAMLESS_ACK"


@dataclass(frozen=True, slots=True)
class MainMigrateDstSeamlessNack(EmptyMessage):
    TYPE: ClassVar[int] = 118
    NAME: ClassVar[str] = "MIGRATE_DST_SEAMLESS_NACK"


# ---------------------------------------------------------------------------------------
# Main channel, client side


@dataclass(frozen=True, slots=True)
class MainClientInfo(FixedMessage):
    cache_size: int
    TYPE: ClassVar[int] = 101
    NAME: ClassVar[str] = "CLIENT_INFO"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class MainMigrateConnected(EmptyMessage):
    TYPE: ClassVar[int] = 102
    NAME: ClassVar[str] = "MIGRATE_CONNECTED"


@dataclass(frozen=True, slots=True)
class MainMigrateConnectError(EmptyMessage):
    TYPE: ClassVar[int] = 103
    NAME: ClassVar[str] = "MIGRATE_CONNECT_ERROR"


@dataclass(frozen=True, slots=True)
class MainAttachChannels(EmptyMessage):
    TYPE: ClassVar[int] = 104
    NAME: ClassVar[str] = "ATTACH_CHANNELS"


@dataclass(frozen=True, slots=True)
class MainMouseModeRequest(FixedMessage):
    mode: int
    TYPE: ClassVar[int] = 105
    NAME: ClassVar[str] = "MOUSE_MODE_REQUEST"
    LAYOUT: ClassVar[struct.Struct] = U16


@dataclass(frozen=True, slots=True)
class MainAgentStart(FixedMessage):
    num_tokens: int
    TYPE: ClassVar[int] = 106
    NAME: ClassVar[str] = "AGENT_START"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class MainClientAgentData(RawMessage):
    data: bytes
    TYPE: ClassVar[int] = 107
    NAME: ClassVar[str] = "AGENT_DATA"


@dataclass(frozen=True, slots=True)
class MainClientAgentToken(FixedMessage):
    num_tokens: int
    TYPE: ClassVar[int] = 108
    NAME: ClassVar[str] = "AGENT_TOKEN"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class MainClientMigrateEnd(EmptyMessage):
    TYPE: ClassVar[int] = 109
    NAME: ClassVar[str] = "MIGRATE_END"


@dataclass(frozen=True, slots=True)
class MainMigrateDstDoSeamless(FixedMessage):
    src_version: int
    TYPE: ClassVar[int] = 110
    NAME: ClassVar[str] = "MIGRATE_DST_DO_SEAMLESS"
    LAYOUT: ClassVar[struct.Struct] = U32


@dataclass(frozen=True, slots=True)
class MainMigrateConnectedSeamless(EmptyMessage):
    TYPE: ClassVar[int] = 111
    NAME: ClassVar[str] = "MIGRATE_CONNECTED_SEAMLESS"


# ---------------------------------------------------------------------------------------
# Display, inputs, spicevmc and port channels: what a passive client needs


@dataclass(frozen=True, slots=True)
class DisplayInit(FixedMessage):
    """Client's cache announcement; spice-server starts drawing only after it."""

    pixmap_cache_id: int
    pixmap_cache_size: int
    glz_dictionary_id: int
    glz_dictionary_window_size: int
    TYPE: ClassVar[int] = 101
    NAME: ClassVar[str] = "DISPLAY_INIT"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<BqBi")


@dataclass(frozen=True, slots=True)
class InputsInit(FixedMessage):
    keyboard_modifiers: int
    TYPE: ClassVar[int] = 101
    NAME: ClassVar[str] = "INPUTS_INIT"
    LAYOUT: ClassVar[struct.Struct] = U16


@dataclass(frozen=True, slots=True)
class InputsKeyModifiers(FixedMessage):
    modifiers: int
    TYPE: ClassVar[int] = 102
    NAME: ClassVar[str] = "KEY_MODIFIERS"
    LAYOUT: ClassVar[struct.Struct] = U16


@dataclass(frozen=True, slots=True)
class VmcData(RawMessage):
    """spicevmc payload (usbredir, port, webdav); the same number in both directions."""

    data: bytes
    TYPE: ClassVar[int] = 101
    NAME: ClassVar[str] = "SPICEVMC_DATA"


PORT_INIT_FIXED = struct.Struct("<IIB")


@dataclass(frozen=True, slots=True)
class PortInit(Message):
    name: str
    opened: bool
    TYPE: ClassVar[int] = 201
    NAME: ClassVar[str] = "PORT_INIT"

    def encode_body(self) -> bytes:
        text = self.name.encode("utf-8") + b"\0"
        return PORT_INIT_FIXED.pack(len(text), PORT_INIT_FIXED.size, int(self.opened)) + text

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        if len(body) < PORT_INIT_FIXED.size:
            raise RemoteProtocolError(f"PORT_INIT needs 9 bytes, got {len(body)}")
        size, offset, opened = PORT_INIT_FIXED.unpack_from(body)
        name = _read_string(body, offset, size, "PORT_INIT name", nonnull=True)
        return cls(name or "", bool(opened))


@dataclass(frozen=True, slots=True)
class PortEventMessage(FixedMessage):
    event: int
    TYPE: ClassVar[int] = 202
    NAME: ClassVar[str] = "PORT_EVENT"
    LAYOUT: ClassVar[struct.Struct] = U8


@dataclass(frozen=True, slots=True)
class ClientPortEvent(FixedMessage):
    event: int
    TYPE: ClassVar[int] = 201
    NAME: ClassVar[str] = "PORT_EVENT"
    LAYOUT: ClassVar[struct.Struct] = U8


# ---------------------------------------------------------------------------------------
# Registries: (direction, channel type) -> message type -> class

MessageClass = type[Message]

_SERVER_COMMON: tuple[MessageClass, ...] = (
    Migrate,
    MigrateData,
    SetAck,
    Ping,
    WaitForChannels,
    Disconnecting,
    Notify,
)
_CLIENT_COMMON: tuple[MessageClass, ...] = (
    AckSync,
    Ack,
    Pong,
    MigrateFlushMark,
    ClientMigrateData,
    ClientDisconnecting,
)
_SERVER_MAIN: tuple[MessageClass, ...] = (
    MainMigrateBegin,
    MainMigrateCancel,
    MainInit,
    MainChannelsList,
    MainMouseMode,
    MainMultiMediaTime,
    MainAgentConnected,
    MainAgentDisconnected,
    MainAgentData,
    MainAgentToken,
    MainMigrateSwitchHost,
    MainMigrateEnd,
    MainName,
    MainUuid,
    MainAgentConnectedTokens,
    MainMigrateBeginSeamless,
    MainMigrateDstSeamlessAck,
    MainMigrateDstSeamlessNack,
)
_CLIENT_MAIN: tuple[MessageClass, ...] = (
    MainClientInfo,
    MainMigrateConnected,
    MainMigrateConnectError,
    MainAttachChannels,
    MainMouseModeRequest,
    MainAgentStart,
    MainClientAgentData,
    MainClientAgentToken,
    MainClientMigrateEnd,
    MainMigrateDstDoSeamless,
    MainMigrateConnectedSeamless,
)


def _table(*groups: tuple[MessageClass, ...]) -> dict[int, MessageClass]:
    table: dict[int, MessageClass] = {}
    for group in groups:
        for cls in group:
            if cls.TYPE in table:
                raise AssertionError(f"duplicate message type {cls.TYPE}")
            table[cls.TYPE] = cls
    return table


_VMC = (VmcData,)
SERVER_MESSAGES: dict[int, dict[int, MessageClass]] = {
    ChannelType.MAIN: _table(_SERVER_COMMON, _SERVER_MAIN),
    ChannelType.INPUTS: _table(_SERVER_COMMON, (InputsInit, InputsKeyModifiers)),
    ChannelType.USBREDIR: _table(_SERVER_COMMON, _VMC),
    ChannelType.PORT: _table(_SERVER_COMMON, _VMC, (PortInit, PortEventMessage)),
    ChannelType.WEBDAV: _table(_SERVER_COMMON, _VMC, (PortInit, PortEventMessage)),
}
CLIENT_MESSAGES: dict[int, dict[int, MessageClass]] = {
    ChannelType.MAIN: _table(_CLIENT_COMMON, _CLIENT_MAIN),
    ChannelType.DISPLAY: _table(_CLIENT_COMMON, (DisplayInit,)),
    ChannelType.USBREDIR: _table(_CLIENT_COMMON, _VMC),
    ChannelType.PORT: _table(_CLIENT_COMMON, _VMC, (ClientPortEvent,)),
    ChannelType.WEBDAV: _table(_CLIENT_COMMON, _VMC, (ClientPortEvent,)),
}
_SERVER_DEFAULT = _table(_SERVER_COMMON)
_CLIENT_DEFAULT = _table(_CLIENT_COMMON)


def _decode(table: dict[int, MessageClass], msg_type: int, body: bytes) -> Message:
    cls = table.get(msg_type)
    if cls is None:
        return UnknownMessage(msg_type, bytes(body))
    try:
        return cls.decode_body(body)
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, RemoteProtocolError):
            raise
        raise RemoteProtocolError(f"malformed {cls.NAME}: {exc}") from exc


def decode_server_message(channel_type: int, msg_type: int, body: bytes) -> Message:
    """Decode a server→client body on a channel of ``channel_type``."""
    return _decode(SERVER_MESSAGES.get(channel_type, _SERVER_DEFAULT), msg_type, body)


def decode_client_message(channel_type: int, msg_type: int, body: bytes) -> Message:
    """Decode a client→server body (test servers and round-trip tests use this)."""
    return _decode(CLIENT_MESSAGES.get(channel_type, _CLIENT_DEFAULT), msg_type, body)


def message_type(message: Message) -> int:
    return message.msg_type if isinstance(message, UnknownMessage) else message.TYPE


def message_name(message: Message) -> str:
    if isinstance(message, UnknownMessage):
        return f"MSG_{message.msg_type}"
    return message.NAME


def all_message_classes() -> list[tuple[str, int, MessageClass]]:
    """(direction, channel type, class) for every modelled message; used by tests."""
    out: list[tuple[str, int, MessageClass]] = []
    for direction, tables in (("server", SERVER_MESSAGES), ("client", CLIENT_MESSAGES)):
        for channel, table in tables.items():
            out.extend((direction, channel, cls) for cls in table.values())
    return out
