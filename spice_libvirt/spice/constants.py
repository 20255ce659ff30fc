"""Numbers of the SPICE wire protocol (spice-protocol 0.14, SPICE 2.2).

Only what a client needs to link, keep channels alive and follow migrations. Names follow
spice-protocol's ``enums.h`` without the ``SPICE_`` prefixes so that a reader can grep both.
"""

from __future__ import annotations

import enum

#: "REDQ" read as a little-endian u32.
LINK_MAGIC = b"REDQ"
VERSION_MAJOR = 2
VERSION_MINOR = 2

#: spice-server refuses link messages outside [18, 4096]; we hold its replies to the same bound.
LINK_MESSAGE_MAX = 4096
#: ``RSA_size`` of the per-link RSA-1024 key: every encrypted ticket is this long.
TICKET_CIPHERTEXT_SIZE = 128
#: SPICE_MAX_PASSWORD_LENGTH: spice-gtk refuses longer passwords before sending.
MAX_PASSWORD_LENGTH = 60
#: DER SubjectPublicKeyInfo of an RSA-1024 key, as the server puts it into SpiceLinkReply.
PUB_KEY_SIZE = 162


class LinkErr(enum.IntEnum):
    OK = 0
    ERROR = 1
    INVALID_MAGIC = 2
    INVALID_DATA = 3
    VERSION_MISMATCH = 4
    NEED_SECURED = 5
    NEED_UNSECURED = 6
    PERMISSION_DENIED = 7
    BAD_CONNECTION_ID = 8
    CHANNEL_NOT_AVAILABLE = 9


class ChannelType(enum.IntEnum):
    MAIN = 1
    DISPLAY = 2
    INPUTS = 3
    CURSOR = 4
    PLAYBACK = 5
    RECORD = 6
    TUNNEL = 7
    SMARTCARD = 8
    USBREDIR = 9
    PORT = 10
    WEBDAV = 11

    @property
    def label(self) -> str:
        """The lower-case name used in reports and JSON (``main``, ``display``, ...)."""
        return self.name.lower()


def channel_label(channel_type: int, channel_id: int) -> str:
    """``"display:0"``-style name of a channel; unknown types stay numeric."""
    try:
        name = ChannelType(channel_type).label
    except ValueError:
        name = f"type{channel_type}"
    return f"{name}:{channel_id}"


#: spicevmc-based channels share the data messages and the migration data layout.
SPICEVMC_CHANNELS = frozenset({ChannelType.USBREDIR, ChannelType.PORT, ChannelType.WEBDAV})


class CommonCap(enum.IntEnum):
    PROTOCOL_AUTH_SELECTION = 0
    AUTH_SPICE = 1
    AUTH_SASL = 2
    MINI_HEADER = 3


class MainCap(enum.IntEnum):
    SEMI_SEAMLESS_MIGRATE = 0
    NAME_AND_UUID = 1
    AGENT_CONNECTED_TOKENS = 2
    SEAMLESS_MIGRATE = 3


class MigrateFlags(enum.IntFlag):
    NEED_FLUSH = 1
    NEED_DATA_TRANSFER = 2


class MouseMode(enum.IntFlag):
    SERVER = 1
    CLIENT = 2


class NotifySeverity(enum.IntEnum):
    INFO = 0
    WARN = 1
    ERROR = 2


class PortEvent(enum.IntEnum):
    OPENED = 0
    CLOSED = 1
    BREAK = 2


#: Channels whose SPICE_MSG_MIGRATE carries flags 0 in spice-server: no flush mark, no data.
NO_MIGRATE_DATA_CHANNELS = frozenset({ChannelType.CURSOR, ChannelType.PLAYBACK, ChannelType.RECORD})

#: Most distinct (type, id) channels a client accepts from one CHANNELS_LIST. spice-server
#: lists a handful (a VM with every device: ~12); a hostile list must not make us link, or
#: even hold, thousands (4 million entries grew a probe to 3.6 GB).
MAX_CHANNELS = 256

#: Largest main-channel message body accepted. Main messages are small (agent data is
#: chunked at 2 KiB; main MIGRATE_DATA is the agent's state, tens of KiB at most): a bigger
#: size field is hostile and is refused at the header, before any body byte is buffered.
MAIN_MAX_BODY = 256 * 1024

#: spice-server's migration protocol version (SPICE_MIGRATION_PROTOCOL_VERSION).
MIGRATION_PROTOCOL_VERSION = 1


def caps_to_words(bits: frozenset[int] | set[int]) -> list[int]:
    """Pack capability bit numbers into u32 words (word0 bit N = capability N)."""
    if not bits:
        return []
    words = [0] * (max(bits) // 32 + 1)
    for bit in bits:
        if bit < 0:
            raise ValueError(f"negative capability bit {bit}")
        words[bit // 32] |= 1 << (bit % 32)
    return words


def words_to_caps(words: list[int] | tuple[int, ...]) -> frozenset[int]:
    """Unpack u32 capability words into the set of bit numbers that are set."""
    return frozenset(
        index * 32 + bit for index, word in enumerate(words) for bit in range(32) if word >> bit & 1
    )
