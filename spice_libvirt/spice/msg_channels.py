"""Display, inputs, spicevmc and port messages: what a passive client needs."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from spice_libvirt.errors import RemoteProtocolError
from spice_libvirt.spice.msg_base import (
    U8,
    U16,
    FixedMessage,
    Message,
    RawMessage,
    _read_string,
    fast_init,
)

# ---------------------------------------------------------------------------------------
# Display, inputs, spicevmc and port channels: what a passive client needs


@fast_init
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


@fast_init
@dataclass(frozen=True, slots=True)
class InputsInit(FixedMessage):
    keyboard_modifiers: int
    TYPE: ClassVar[int] = 101
    NAME: ClassVar[str] = "INPUTS_INIT"
    LAYOUT: ClassVar[struct.Struct] = U16


@fast_init
@dataclass(frozen=True, slots=True)
class InputsKeyModifiers(FixedMessage):
    modifiers: int
    TYPE: ClassVar[int] = 102
    NAME: ClassVar[str] = "KEY_MODIFIERS"
    LAYOUT: ClassVar[struct.Struct] = U16


@fast_init
@dataclass(frozen=True, slots=True)
class VmcData(RawMessage):
    """spicevmc payload (usbredir, port, webdav); the same number in both directions."""

    data: bytes
    TYPE: ClassVar[int] = 101
    NAME: ClassVar[str] = "SPICEVMC_DATA"


PORT_INIT_FIXED = struct.Struct("<IIB")
#: longest port name accepted (spice names are like ``org.spice-space.webdav.0``); the name
#: is kept as long as the channel lives, so a longer one is refused, not stored
PORT_NAME_MAX = 1024


@fast_init
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
        if size > PORT_NAME_MAX:
            raise RemoteProtocolError(f"PORT_INIT name of {size} bytes (at most {PORT_NAME_MAX})")
        name = _read_string(body, offset, size, "PORT_INIT name", nonnull=True)
        return cls(name or "", bool(opened))


@fast_init
@dataclass(frozen=True, slots=True)
class PortEventMessage(FixedMessage):
    event: int
    TYPE: ClassVar[int] = 202
    NAME: ClassVar[str] = "PORT_EVENT"
    LAYOUT: ClassVar[struct.Struct] = U8


@fast_init
@dataclass(frozen=True, slots=True)
class ClientPortEvent(FixedMessage):
    event: int
    TYPE: ClassVar[int] = 201
    NAME: ClassVar[str] = "PORT_EVENT"
    LAYOUT: ClassVar[struct.Struct] = U8
