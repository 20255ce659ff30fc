"""What the migration machine asks its driver to do (see :mod:`spice_libvirt.spice.session`).

Each action is one I/O step the driver executes in order; the three whose docstrings carry a
real-server lesson (:class:`LeaveSource`, :class:`LetPrelinksFinish`,
:class:`DropDestinationLinks` with ``drain``) are why the paths look the way they do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spice_libvirt.spice.messages import Message
from spice_libvirt.spice.record import ClientMigrationRecord

ChannelKey = tuple[int, int]


@dataclass(frozen=True, slots=True)
class LinkTarget:
    """Where to link. ``port`` is None when TLS is required: then only ``tls_port`` is tried,
    never the plain port (TLS, once configured or in use, is never downgraded)."""

    host: str
    port: int | None
    tls_port: int | None
    subject: str | None


@dataclass(frozen=True, slots=True)
class StartPrelinks:
    """Link destination MAIN (our connection id) in a task of its own: the source MAIN's
    reader must keep reading, so a SWITCH_HOST or CANCEL racing the pre-link is seen at once
    (spice-gtk does not read it then). Report with ``on_dst_linked``/``on_prelink_failed``."""

    number: int
    connection_id: int
    target: LinkTarget


@dataclass(frozen=True, slots=True)
class LinkToDestination:
    """Link these channels to the destination, concurrently, with our connection id."""

    number: int
    keys: tuple[ChannelKey, ...]
    connection_id: int
    target: LinkTarget


@dataclass(frozen=True, slots=True)
class AwaitSeamlessAnswer:
    """Read destination MAIN until ACK/NACK (``on_dst_message`` for anything before it)."""

    number: int


@dataclass(frozen=True, slots=True)
class SendToSource:
    key: ChannelKey
    message: Message


@dataclass(frozen=True, slots=True)
class SendToDestination:
    number: int
    key: ChannelKey
    message: Message


@dataclass(frozen=True, slots=True)
class ReadMigrateData:
    """Read this source channel's next message, MIGRATE_DATA, right now (before anything
    else, not through the keep-alive): report it with ``on_migrate_data``."""

    key: ChannelKey


@dataclass(frozen=True, slots=True)
class SwapChannel:
    """Move the channel to its destination link and KEEP the source socket open (see
    :class:`LeaveSource`). ``restart_reader``: the swap is done from outside the channel's
    reader; ``channel_up``: send what a fresh channel sends (DISPLAY_INIT). Report with
    ``on_swapped``."""

    number: int
    key: ChannelKey
    restart_reader: bool = False
    channel_up: bool = False


@dataclass(frozen=True, slots=True)
class LeaveSource:
    """Close the source sockets kept since the swaps. Only after the LAST channel swapped:
    closing a channel's source socket right after its own swap (MAIN swaps first) made
    spice-server drop the whole client, and slower channels lost their MIGRATE_DATA (~1 in
    15 migrations). spice-gtk, too, closes the old session only at the end."""

    number: int


@dataclass(frozen=True, slots=True)
class StopPrelinks:
    """Cancel the pre-link task (cancel path only; a switch-host lets it finish)."""

    number: int


@dataclass(frozen=True, slots=True)
class LetPrelinksFinish:
    """Wait (bounded) for the pre-links in flight instead of cutting them mid-handshake:
    aborting a destination link between link reply and link result, then linking MAIN
    afresh, segfaulted spice-server 0.15.1 (~1 in 6 forced switch-hosts)."""

    number: int
    timeout: float


@dataclass(frozen=True, slots=True)
class DropDestinationLinks:
    """Close the destination links no channel uses, non-MAIN first as spice-gtk does. With
    ``drain`` (> 0): half-close and wait for the server to close, so the destination has torn
    the pre-linked session down before a fresh MAIN arrives (a race that crashed it)."""

    number: int
    drain: float = 0.0


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Close every channel of the current session, non-MAIN first."""


@dataclass(frozen=True, slots=True)
class Relink:
    """Build a brand-new session (connection id 0) at the target; report with
    ``on_relinked``/``on_relink_failed``. The whole switch, counted from ``since`` (when
    SWITCH_HOST arrived), gets one session set-up's time: what went before (pre-links
    let finish, links drained) is taken from it."""

    target: LinkTarget
    since: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class Answered:
    """The source has its answer (or never will): wake ``wait_migration_connected``."""

    number: int
    ok: bool


@dataclass(frozen=True, slots=True)
class Notice:
    """A :class:`~spice_libvirt.spice.client.ClientEvent` for subscribers."""

    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The migration's record is final: publish it."""

    number: int
    record: ClientMigrationRecord


@dataclass(frozen=True, slots=True)
class InBackground:
    """Run these actions, in order, in a task of their own (the caller is a reader that
    must not wait for them, or that they close)."""

    actions: tuple[Action, ...]
    name: str


Action = (
    StartPrelinks
    | LinkToDestination
    | AwaitSeamlessAnswer
    | SendToSource
    | SendToDestination
    | ReadMigrateData
    | SwapChannel
    | LeaveSource
    | StopPrelinks
    | LetPrelinksFinish
    | DropDestinationLinks
    | CloseSession
    | Relink
    | Answered
    | Notice
    | Finished
    | InBackground
)
