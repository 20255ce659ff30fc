"""What QEMU says about SPICE sessions, parsed once: ``query-spice`` and ``SPICE_*`` events.

Both migration paths read the same facts (which connection ids are there, with which
channels, each on TLS or not) from the same QMP shapes -- the QEMU path directly, the
libvirt path through the monitor passthrough -- so the parsing, the one signed-to-unsigned
connection-id fix and the one channel naming live here and nowhere else.

Channel names are ``"<type name>:<id>"`` (``"display:0"``); a type without a name keeps its
number (``"12:0"``). The JSON report has always used this form; it is a contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

#: a SPICE channel as QEMU names it: (channel-type, channel-id)
Channel = tuple[int, int]

#: QEMU's SPICE channel-type numbers (spice-protocol enums.h) and the names clients use.
CHANNEL_TYPE_NAMES: dict[int, str] = {
    1: "main",
    2: "display",
    3: "inputs",
    4: "cursor",
    5: "playback",
    6: "record",
    7: "tunnel",
    8: "smartcard",
    9: "usbredir",
    10: "port",
    11: "webdav",
}
CHANNEL_TYPE_NUMBERS: dict[str, int] = {v: k for k, v in CHANNEL_TYPE_NAMES.items()}

MAIN: Channel = (1, 0)


def channel_name(channel_type: int, channel_id: int) -> str:
    """``(2, 0)`` -> ``"display:0"``; unknown types keep their number (``"12:0"``)."""
    return f"{CHANNEL_TYPE_NAMES.get(channel_type, str(channel_type))}:{channel_id}"


def parse_channel_name(name: str) -> Channel:
    """Inverse of :func:`channel_name` (``"port:1"`` -> ``(10, 1)``)."""
    kind, _, ident = name.partition(":")
    ctype = CHANNEL_TYPE_NUMBERS.get(kind)
    if ctype is None:
        ctype = int(kind.removeprefix("type"))
    return ctype, int(ident or 0)


def channel_names(channels: Iterable[Channel]) -> list[str]:
    """Names in protocol order (main first, then by type and id): one order in every report."""
    return [channel_name(t, i) for t, i in sorted(set(channels))]


def unsigned_connection_id(value: Any) -> int:
    """QEMU prints spice-server's u32 connection id as a signed int32 (negative ids are
    seen); clients know it as the u32 ``session_id`` of MAIN_INIT. This is the one place
    that converts."""
    return int(value) & 0xFFFFFFFF


@dataclasses.dataclass
class SpiceSession:
    """One client session as QEMU shows it: its channels, each with its TLS state."""

    connection_id: int
    #: channel -> on TLS (None: QEMU did not say)
    channels: dict[Channel, bool | None] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return channel_names(self.channels)

    @property
    def all_tls(self) -> bool | None:
        """Every channel on TLS (None: no channel or unknown)."""
        known = [tls for tls in self.channels.values() if tls is not None]
        if not known:
            return None
        return all(known)

    def tls_names(self, value: bool) -> list[str]:
        """The channels whose TLS state is ``value``."""
        return channel_names(c for c, tls in self.channels.items() if tls is value)

    def add(self, channel: Channel, tls: bool | None) -> None:
        if tls is None and channel in self.channels:
            return  # an event without "tls" must not erase what query-spice said
        self.channels[channel] = tls


#: connection id -> session
Sessions = dict[int, SpiceSession]


def parse_channel(entry: Mapping[str, Any]) -> tuple[int, Channel, bool | None] | None:
    """(connection id, channel, tls) of a ``query-spice`` channel entry or of a
    ``SPICE_INITIALIZED`` event's data (whose fields sit under ``client``); None if it
    names no channel (``SPICE_CONNECTED`` before the link)."""
    client = entry.get("client", entry)
    try:
        cid = unsigned_connection_id(client["connection-id"])
        channel = (int(client["channel-type"]), int(client["channel-id"]))
    except (KeyError, TypeError, ValueError):
        return None
    tls = client.get("tls")
    return cid, channel, (bool(tls) if tls is not None else None)


def absorb(sessions: Sessions, entry: Mapping[str, Any]) -> int | None:
    """Add one channel entry or event to ``sessions``; the connection id, or None."""
    got = parse_channel(entry)
    if got is None:
        return None
    cid, channel, tls = got
    sessions.setdefault(cid, SpiceSession(cid)).add(channel, tls)
    return cid


def sessions_from_query_spice(reply: Mapping[str, Any] | None) -> Sessions:
    """Every session of a ``query-spice`` answer (the bare return value, or a passthrough
    reply ``{"return": {...}}`` as libvirt hands it back)."""
    sessions: Sessions = {}
    if not reply:
        return sessions
    body = reply.get("return", reply)
    for entry in (body or {}).get("channels", []) or []:
        absorb(sessions, entry)
    return sessions


def merge(into: Sessions, other: Sessions) -> Sessions:
    """``into`` with every channel of ``other`` added (in place; returned for chaining)."""
    for cid, session in other.items():
        target = into.setdefault(cid, SpiceSession(cid))
        for channel, tls in session.channels.items():
            target.add(channel, tls)
    return into


__all__ = [
    "CHANNEL_TYPE_NAMES",
    "CHANNEL_TYPE_NUMBERS",
    "MAIN",
    "Channel",
    "Sessions",
    "SpiceSession",
    "absorb",
    "channel_name",
    "channel_names",
    "merge",
    "parse_channel",
    "parse_channel_name",
    "sessions_from_query_spice",
    "unsigned_connection_id",
]
