"""Main-channel messages, both directions (see :mod:`spice_libvirt.spice.messages`)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from spice_libvirt.errors import LocalProtocolError, RemoteProtocolError
from spice_libvirt.spice.constants import MAX_CHANNELS, MIGRATION_PROTOCOL_VERSION
from spice_libvirt.spice.msg_base import (
    DST_INFO,
    U16,
    U32,
    DstInfo,
    EmptyMessage,
    FixedMessage,
    Message,
    RawMessage,
    fast_init,
)

# ---------------------------------------------------------------------------------------
# Main channel, server side


@fast_init
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


@fast_init
@dataclass(frozen=True, slots=True)
class MainMigrateCancel(EmptyMessage):
    TYPE: ClassVar[int] = 102
    NAME: ClassVar[str] = "MIGRATE_CANCEL"


@fast_init
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


@fast_init
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
        # de-duplicated while reading, and bounded: only distinct pairs are ever held
        raw = body[4 : 4 + 2 * count]
        unique: dict[tuple[int, int], None] = {}
        for pair in zip(raw[0::2], raw[1::2], strict=True):
            unique[pair] = None
            if len(unique) > MAX_CHANNELS:
                raise RemoteProtocolError(
                    f"CHANNELS_LIST names more than {MAX_CHANNELS} distinct channels"
                )
        return cls(tuple(unique))


@fast_init
@dataclass(frozen=True, slots=True)
class MainMouseMode(FixedMessage):
    supported_modes: int
    current_mode: int
    TYPE: ClassVar[int] = 105
    NAME: ClassVar[str] = "MOUSE_MODE"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<HH")


@fast_init
@dataclass(frozen=True, slots=True)
class MainMultiMediaTime(FixedMessage):
    time: int
    TYPE: ClassVar[int] = 106
    NAME: ClassVar[str] = "MULTI_MEDIA_TIME"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
@dataclass(frozen=True, slots=True)
class MainAgentConnected(EmptyMessage):
    TYPE: ClassVar[int] = 107
    NAME: ClassVar[str] = "AGENT_CONNECTED"


@fast_init
@dataclass(frozen=True, slots=True)
class MainAgentDisconnected(FixedMessage):
    error_code: int
    TYPE: ClassVar[int] = 108
    NAME: ClassVar[str] = "AGENT_DISCONNECTED"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
@dataclass(frozen=True, slots=True)
class MainAgentData(RawMessage):
    data: bytes
    TYPE: ClassVar[int] = 109
    NAME: ClassVar[str] = "AGENT_DATA"


@fast_init
@dataclass(frozen=True, slots=True)
class MainAgentToken(FixedMessage):
    num_tokens: int
    TYPE: ClassVar[int] = 110
    NAME: ClassVar[str] = "AGENT_TOKEN"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
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


@fast_init
@dataclass(frozen=True, slots=True)
class MainMigrateEnd(EmptyMessage):
    TYPE: ClassVar[int] = 112
    NAME: ClassVar[str] = "MIGRATE_END"


@fast_init
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


@fast_init
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


@fast_init
@dataclass(frozen=True, slots=True)
class MainAgentConnectedTokens(FixedMessage):
    num_tokens: int
    TYPE: ClassVar[int] = 115
    NAME: ClassVar[str] = "AGENT_CONNECTED_TOKENS"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
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


@fast_init
@dataclass(frozen=True, slots=True)
class MainMigrateDstSeamlessAck(EmptyMessage):
    TYPE: ClassVar[int] = 117
    NAME: ClassVar[str] = "MIGRATE_DST_SEAMLESS_ACK"


@fast_init
@dataclass(frozen=True, slots=True)
class MainMigrateDstSeamlessNack(EmptyMessage):
    TYPE: ClassVar[int] = 118
    NAME: ClassVar[str] = "MIGRATE_DST_SEAMLESS_NACK"


# ---------------------------------------------------------------------------------------
# Main channel, client side


@fast_init
@dataclass(frozen=True, slots=True)
class MainClientInfo(FixedMessage):
    cache_size: int
    TYPE: ClassVar[int] = 101
    NAME: ClassVar[str] = "CLIENT_INFO"
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")


@fast_init
@dataclass(frozen=True, slots=True)
class MainMigrateConnected(EmptyMessage):
    TYPE: ClassVar[int] = 102
    NAME: ClassVar[str] = "MIGRATE_CONNECTED"


@fast_init
@dataclass(frozen=True, slots=True)
class MainMigrateConnectError(EmptyMessage):
    TYPE: ClassVar[int] = 103
    NAME: ClassVar[str] = "MIGRATE_CONNECT_ERROR"


@fast_init
@dataclass(frozen=True, slots=True)
class MainAttachChannels(EmptyMessage):
    TYPE: ClassVar[int] = 104
    NAME: ClassVar[str] = "ATTACH_CHANNELS"


@fast_init
@dataclass(frozen=True, slots=True)
class MainMouseModeRequest(FixedMessage):
    mode: int
    TYPE: ClassVar[int] = 105
    NAME: ClassVar[str] = "MOUSE_MODE_REQUEST"
    LAYOUT: ClassVar[struct.Struct] = U16


@fast_init
@dataclass(frozen=True, slots=True)
class MainAgentStart(FixedMessage):
    num_tokens: int
    TYPE: ClassVar[int] = 106
    NAME: ClassVar[str] = "AGENT_START"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
@dataclass(frozen=True, slots=True)
class MainClientAgentData(RawMessage):
    data: bytes
    TYPE: ClassVar[int] = 107
    NAME: ClassVar[str] = "AGENT_DATA"


@fast_init
@dataclass(frozen=True, slots=True)
class MainClientAgentToken(FixedMessage):
    num_tokens: int
    TYPE: ClassVar[int] = 108
    NAME: ClassVar[str] = "AGENT_TOKEN"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
@dataclass(frozen=True, slots=True)
class MainClientMigrateEnd(EmptyMessage):
    TYPE: ClassVar[int] = 109
    NAME: ClassVar[str] = "MIGRATE_END"


@fast_init
@dataclass(frozen=True, slots=True)
class MainMigrateDstDoSeamless(FixedMessage):
    src_version: int
    TYPE: ClassVar[int] = 110
    NAME: ClassVar[str] = "MIGRATE_DST_DO_SEAMLESS"
    LAYOUT: ClassVar[struct.Struct] = U32


@fast_init
@dataclass(frozen=True, slots=True)
class MainMigrateConnectedSeamless(EmptyMessage):
    TYPE: ClassVar[int] = 111
    NAME: ClassVar[str] = "MIGRATE_CONNECTED_SEAMLESS"
