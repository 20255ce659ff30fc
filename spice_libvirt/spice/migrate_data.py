"""Checks on SPICE_MSG_MIGRATE_DATA bodies that a client may make without interpreting them.

The client must forward these bytes unchanged to the destination (they are the servers'
private state); what it can verify is the envelope: the magic belongs to the channel type,
the version is one the destination accepts, and the body is at least as long as the fixed
part spice-server writes. A failure is the *source server's* fault, so it is a
:class:`RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from spice_libvirt.errors import RemoteProtocolError
from spice_libvirt.spice.constants import MIGRATION_PROTOCOL_VERSION, ChannelType

HEADER = struct.Struct("<4sI")

#: channel type -> (magic, minimum body size including the 8-byte header)
EXPECTED: dict[int, tuple[bytes, int]] = {
    ChannelType.MAIN: (b"MNMD", 65),
    ChannelType.DISPLAY: (b"DCMD", 8 + 8),
    ChannelType.INPUTS: (b"ICMD", 10),
    ChannelType.SMARTCARD: (b"SCMD", 42),
    ChannelType.USBREDIR: (b"SVMD", 33),
    ChannelType.PORT: (b"SVMD", 33),
    ChannelType.WEBDAV: (b"SVMD", 33),
}


@dataclass(frozen=True, slots=True)
class MigrateDataHeader:
    magic: bytes
    version: int
    size: int

    def describe(self) -> str:
        return f"{self.magic.decode('ascii', 'replace')} v{self.version}, {self.size} bytes"


def check_migrate_data(channel_type: int, data: bytes) -> MigrateDataHeader:
    """Validate the envelope of a MIGRATE_DATA body for ``channel_type``.

    :raise RemoteProtocolError: wrong magic for the channel, too new a version, too short
    """
    if len(data) < HEADER.size:
        raise RemoteProtocolError(f"MIGRATE_DATA of {len(data)} bytes has no header")
    magic, version = HEADER.unpack_from(data)
    expected = EXPECTED.get(channel_type)
    if expected is None:
        raise RemoteProtocolError(f"channel type {channel_type} carries no migration data")
    want_magic, min_size = expected
    if magic != want_magic:
        raise RemoteProtocolError(f"MIGRATE_DATA magic {magic!r} is not {want_magic!r}")
    if version > MIGRATION_PROTOCOL_VERSION or version == 0:
        raise RemoteProtocolError(f"MIGRATE_DATA version {version} is not supported (max 1)")
    if len(data) < min_size:
        raise RemoteProtocolError(
            f"{want_magic.decode()} MIGRATE_DATA of {len(data)} bytes is shorter than {min_size}"
        )
    return MigrateDataHeader(magic, version, len(data))
