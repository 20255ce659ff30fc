"""Typed SPICE data messages and their body codec (sans-IO, no framing).

The classes live by channel in :mod:`~spice_libvirt.spice.msg_base` (base classes, DstInfo,
messages of every channel), :mod:`~spice_libvirt.spice.msg_main` and
:mod:`~spice_libvirt.spice.msg_channels`; this module gathers them into the per-channel
registries and decoders and re-exports every name, so importing from here keeps working.

How a message is encoded and decoded, and how strictly: see
:mod:`~spice_libvirt.spice.msg_base`.
"""

from __future__ import annotations

import struct

from spice_libvirt.errors import RemoteProtocolError
from spice_libvirt.spice.constants import ChannelType
from spice_libvirt.spice.msg_base import (
    ABSENT_PORTS,
    DST_INFO,
    NOTIFY_FIXED,
    PING_FIXED,
    U8,
    U16,
    U32,
    WAIT_ENTRY,
    Ack,
    AckSync,
    ClientDisconnecting,
    ClientMigrateData,
    Disconnecting,
    DstInfo,
    EmptyMessage,
    FixedMessage,
    Message,
    Migrate,
    MigrateData,
    MigrateFlushMark,
    Notify,
    Ping,
    Pong,
    RawMessage,
    SetAck,
    UnknownMessage,
    WaitForChannels,
    fast_init,
)
from spice_libvirt.spice.msg_channels import (
    PORT_INIT_FIXED,
    ClientPortEvent,
    DisplayInit,
    InputsInit,
    InputsKeyModifiers,
    PortEventMessage,
    PortInit,
    VmcData,
)
from spice_libvirt.spice.msg_main import (
    MainAgentConnected,
    MainAgentConnectedTokens,
    MainAgentData,
    MainAgentDisconnected,
    MainAgentStart,
    MainAgentToken,
    MainAttachChannels,
    MainChannelsList,
    MainClientAgentData,
    MainClientAgentToken,
    MainClientInfo,
    MainClientMigrateEnd,
    MainInit,
    MainMigrateBegin,
    MainMigrateBeginSeamless,
    MainMigrateCancel,
    MainMigrateConnected,
    MainMigrateConnectedSeamless,
    MainMigrateConnectError,
    MainMigrateDstDoSeamless,
    MainMigrateDstSeamlessAck,
    MainMigrateDstSeamlessNack,
    MainMigrateEnd,
    MainMigrateSwitchHost,
    MainMouseMode,
    MainMouseModeRequest,
    MainMultiMediaTime,
    MainName,
    MainUuid,
)

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


def server_table(channel_type: int) -> dict[int, MessageClass]:
    """Message type -> class of what a server sends on a channel of ``channel_type``."""
    return SERVER_MESSAGES.get(channel_type, _SERVER_DEFAULT)


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


__all__ = [
    "ABSENT_PORTS",
    "CLIENT_MESSAGES",
    "DST_INFO",
    "NOTIFY_FIXED",
    "PING_FIXED",
    "PORT_INIT_FIXED",
    "SERVER_MESSAGES",
    "U8",
    "U16",
    "U32",
    "WAIT_ENTRY",
    "Ack",
    "AckSync",
    "ClientDisconnecting",
    "ClientMigrateData",
    "ClientPortEvent",
    "Disconnecting",
    "DisplayInit",
    "DstInfo",
    "EmptyMessage",
    "FixedMessage",
    "InputsInit",
    "InputsKeyModifiers",
    "MainAgentConnected",
    "MainAgentConnectedTokens",
    "MainAgentData",
    "MainAgentDisconnected",
    "MainAgentStart",
    "MainAgentToken",
    "MainAttachChannels",
    "MainChannelsList",
    "MainClientAgentData",
    "MainClientAgentToken",
    "MainClientInfo",
    "MainClientMigrateEnd",
    "MainInit",
    "MainMigrateBegin",
    "MainMigrateBeginSeamless",
    "MainMigrateCancel",
    "MainMigrateConnectError",
    "MainMigrateConnected",
    "MainMigrateConnectedSeamless",
    "MainMigrateDstDoSeamless",
    "MainMigrateDstSeamlessAck",
    "MainMigrateDstSeamlessNack",
    "MainMigrateEnd",
    "MainMigrateSwitchHost",
    "MainMouseMode",
    "MainMouseModeRequest",
    "MainMultiMediaTime",
    "MainName",
    "MainUuid",
    "Message",
    "MessageClass",
    "Migrate",
    "MigrateData",
    "MigrateFlushMark",
    "Notify",
    "Ping",
    "Pong",
    "PortEventMessage",
    "PortInit",
    "RawMessage",
    "SetAck",
    "UnknownMessage",
    "VmcData",
    "WaitForChannels",
    "all_message_classes",
    "decode_client_message",
    "decode_server_message",
    "fast_init",
    "message_name",
    "message_type",
    "server_table",
]
