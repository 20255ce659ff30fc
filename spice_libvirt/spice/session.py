"""The embedded client's migration machine (sans-IO, in the manner of ``connection.py``).

The driver (:mod:`spice_libvirt.spice.client`) owns the sockets. It feeds this machine what
the source and destination channels said or what became of its own I/O, and executes the
*actions* it gets back, in order. Every decision about the SPICE migration protocol, and every
line of the :class:`~spice_libvirt.spice.record.ClientMigrationRecord`, is made here; the
phases and their legal events are the closed table :data:`TRANSITIONS`, and one ``_go()``
raises :class:`~spice_libvirt.errors.LocalProtocolError` on anything else (the driver turns
an illegal *server* message into a :class:`~spice_libvirt.errors.RemoteProtocolError`).

The paths, as spice-server 0.15 drives them (read the table alongside)::

    seamless       src BEGIN_SEAMLESS -> link dst MAIN (our connection id) -> dst DO_SEAMLESS
                   + link every other channel -> dst ACK -> src CONNECTED_SEAMLESS
                   ... migration ... src MIGRATE per channel -> (FLUSH_MARK) -> (MIGRATE_DATA,
                   forwarded byte for byte) -> swap -> once the LAST channel swapped: leave source
    semi-seamless  src BEGIN (or NACK above) -> same pre-links -> src CONNECTED ... src
                   MIGRATE_END -> MAIN to dst, dst MIGRATE_END -> dst INIT -> swap the rest
    switch-host    src SWITCH_HOST (we were too late, or never got BEGIN) -> let the pre-links
                   in flight finish -> drop them (draining) -> close everything -> new session
    cancel         src MIGRATE_CANCEL -> drop the destination links, stay on the source; after
                   SWITCH_HOST a MIGRATE_CANCEL is the server's answer to a late
                   CONNECTED_SEAMLESS and is NOT a cancel

Three rules were learned the hard way against the real server (README, "What the real server
taught us") and each has its action: :class:`LeaveSource` comes only after the last swap,
:class:`LetPrelinksFinish` precedes the switch-host relink, and :class:`DropDestinationLinks`
drains before relinking. Nothing here imports asyncio, socket or ssl.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from spice_libvirt.errors import LocalProtocolError, RemoteProtocolError
from spice_libvirt.spice import actions as act
from spice_libvirt.spice.actions import Action, LinkTarget
from spice_libvirt.spice.constants import ChannelType, MainCap, MigrateFlags, channel_label
from spice_libvirt.spice.messages import (
    ClientMigrateData,
    DstInfo,
    MainClientMigrateEnd,
    MainMigrateConnected,
    MainMigrateConnectedSeamless,
    MainMigrateConnectError,
    MainMigrateDstDoSeamless,
    MigrateFlushMark,
)
from spice_libvirt.spice.migrate_data import check_migrate_data
from spice_libvirt.spice.record import ClientMigrationRecord, ClientPath, PathStep

ChannelKey = tuple[int, int]
MAIN_KEY: ChannelKey = (ChannelType.MAIN, 0)
Side = Literal["src", "dst"]
Direction = Literal["rx", "tx", "event"]

#: how long a switch-host waits for the destination to drop the pre-linked session
SWITCH_DRAIN_TIMEOUT = 2.0


class Phase(enum.Enum):
    IDLE = "idle"  #: no migration in progress (the last one, if any, is finished)
    LINKING_MAIN = "linking-main"  #: BEGIN*: linking MAIN to the destination, our id
    PRE_LINKING = "pre-linking"  #: linking the other channels; seamless: awaiting ACK/NACK
    CONNECTED = "connected"  #: told the source CONNECTED(_SEAMLESS); the VM is migrating
    CONNECT_FAILED = "connect-failed"  #: told the source CONNECT_ERROR: switch-host or cancel
    HANDOVER = "handover"  #: seamless: channels swap one by one on their MIGRATE
    AWAIT_DST_INIT = "await-dst-init"  #: semi-seamless: MAIN on the destination, awaiting INIT
    SWAPPING = "swapping"  #: semi-seamless: INIT came; the other channels move
    SWITCHING = "switching"  #: SWITCH_HOST: a fresh session is built (connection id 0)
    CLOSED = "closed"  #: the client closed; nothing more is legal but closing again


class Ev(enum.Enum):
    BEGIN = "MIGRATE_BEGIN(_SEAMLESS)"
    DST_LINKED = "destination link up"
    DST_LINK_FAILED = "destination link failed"
    DST_MESSAGE = "destination message before ACK/NACK"
    SEAMLESS_ANSWER = "DST_SEAMLESS_ACK/NACK"
    PRELINKS_OK = "every pre-link up"  # internal
    PRELINKS_FAILED = "pre-links settled with a failure"  # internal
    MIGRATE = "MIGRATE"
    MIGRATE_DATA = "MIGRATE_DATA"
    SWAPPED = "channel swapped"
    ALL_SWAPPED = "every channel swapped"  # internal
    MIGRATE_END = "MIGRATE_END"
    DST_INIT = "destination INIT"
    SWITCH_HOST = "MIGRATE_SWITCH_HOST"
    RELINKED = "fresh session up"
    RELINK_FAILED = "fresh session failed"
    CANCEL = "MIGRATE_CANCEL"
    SUPERSEDED = "superseded by a new BEGIN"  # internal
    SOURCE_LOST = "source channel lost"
    CLOSE = "client closed"


P = Phase
_PRELINK = (P.LINKING_MAIN, P.PRE_LINKING)
_ANSWERED = (P.CONNECTED, P.CONNECT_FAILED)
_PRELINK_EVENTS = (Ev.DST_LINKED, Ev.DST_LINK_FAILED, Ev.DST_MESSAGE, Ev.SEAMLESS_ANSWER)
_SETTLE_EVENTS = (Ev.PRELINKS_OK, Ev.PRELINKS_FAILED)
_ACTIVE = tuple(p for p in Phase if p not in (P.IDLE, P.CLOSED))
#: the VM moved semi-seamlessly: the other channels leave the source once INIT came
_SEMI_MOVING = (P.AWAIT_DST_INIT, P.SWAPPING)

#: (phase, event) -> next phase. Anything missing is illegal.
TRANSITIONS: dict[tuple[Phase, Ev], Phase] = {
    (P.IDLE, Ev.BEGIN): P.LINKING_MAIN,
    # an old client (no SEMI_SEAMLESS cap) never gets BEGIN: the switch is the whole migration
    (P.IDLE, Ev.SWITCH_HOST): P.SWITCHING,
    # nothing to cancel: the server's late answer to a migration already finished
    (P.IDLE, Ev.CANCEL): P.IDLE,
    (P.LINKING_MAIN, Ev.DST_LINKED): P.PRE_LINKING,
    (P.LINKING_MAIN, Ev.DST_LINK_FAILED): P.LINKING_MAIN,
    (P.LINKING_MAIN, Ev.PRELINKS_FAILED): P.CONNECT_FAILED,
    (P.PRE_LINKING, Ev.DST_LINKED): P.PRE_LINKING,
    (P.PRE_LINKING, Ev.DST_LINK_FAILED): P.PRE_LINKING,
    (P.PRE_LINKING, Ev.DST_MESSAGE): P.PRE_LINKING,
    (P.PRE_LINKING, Ev.SEAMLESS_ANSWER): P.PRE_LINKING,
    (P.PRE_LINKING, Ev.PRELINKS_OK): P.CONNECTED,
    (P.PRE_LINKING, Ev.PRELINKS_FAILED): P.CONNECT_FAILED,
    # seamless hand-over: the server sends MIGRATE on every channel once the VM moved
    (P.CONNECTED, Ev.MIGRATE): P.HANDOVER,
    (P.HANDOVER, Ev.MIGRATE): P.HANDOVER,
    (P.HANDOVER, Ev.MIGRATE_DATA): P.HANDOVER,
    (P.HANDOVER, Ev.SWAPPED): P.HANDOVER,
    (P.HANDOVER, Ev.ALL_SWAPPED): P.IDLE,
    # semi-seamless: spice-server sends MIGRATE_END only to clients that reported connected
    (P.CONNECTED, Ev.MIGRATE_END): P.AWAIT_DST_INIT,
    (P.AWAIT_DST_INIT, Ev.SWAPPED): P.AWAIT_DST_INIT,
    (P.AWAIT_DST_INIT, Ev.DST_INIT): P.SWAPPING,
    (P.SWAPPING, Ev.SWAPPED): P.SWAPPING,
    (P.SWAPPING, Ev.ALL_SWAPPED): P.IDLE,
    # switch-host: a repeated SWITCH_HOST is recorded and ignored; a MIGRATE_CANCEL now is
    # the source answering our late CONNECTED_SEAMLESS, not a cancel; pre-links in flight
    # carry on (they must not be cut: see LetPrelinksFinish)
    (P.SWITCHING, Ev.SWITCH_HOST): P.SWITCHING,
    (P.SWITCHING, Ev.CANCEL): P.SWITCHING,
    (P.SWITCHING, Ev.RELINKED): P.IDLE,
    (P.SWITCHING, Ev.RELINK_FAILED): P.IDLE,
    **{(P.SWITCHING, ev): P.SWITCHING for ev in _PRELINK_EVENTS + _SETTLE_EVENTS},
    **{(p, Ev.SWITCH_HOST): P.SWITCHING for p in _PRELINK + _ANSWERED},
    **{(p, Ev.CANCEL): P.IDLE for p in _PRELINK + _ANSWERED},
    # a new BEGIN while one migration is open: the old one ends as cancelled
    **{(p, Ev.SUPERSEDED): P.IDLE for p in _ACTIVE},
    **{(p, Ev.SOURCE_LOST): p for p in _ACTIVE},
    **{(p, Ev.CLOSE): P.CLOSED for p in Phase},
}


# ----------------------------------------------------------------------------- state


@dataclass
class MigrationState:
    """One migration, from its first message to its end."""

    number: int
    kind: Literal["seamless", "semi-seamless"]
    dst: DstInfo
    record: ClientMigrationRecord
    started: float
    src_version: int | None = None
    #: channels of the session when the migration began, MAIN first
    channels: tuple[ChannelKey, ...] = ()
    linked: set[ChannelKey] = field(default_factory=set)
    pending: set[ChannelKey] = field(default_factory=set)
    awaiting_answer: bool = False
    do_seamless: bool = False
    failure: str | None = None
    #: a pre-link task exists (not for a SWITCH_HOST without BEGIN)
    prelinked: bool = False
    cut_at: dict[ChannelKey, float] = field(default_factory=dict)
    awaiting_data: set[ChannelKey] = field(default_factory=set)
    swapped: set[ChannelKey] = field(default_factory=set)
    init_at: float = 0.0
    switch_at: float = 0.0


def _labels(keys: tuple[ChannelKey, ...] | list[ChannelKey]) -> list[str]:
    return [channel_label(*key) for key in sorted(keys)]


class ClientSession:
    """The migration side of one client session; see the module docstring."""

    def __init__(
        self,
        *,
        tls_required: bool = False,
        host_subject: str | None = None,
        link_timeout: float = 10.0,
    ) -> None:
        self.phase = Phase.IDLE
        self.link_timeout = link_timeout
        #: a CA or a tls-port was configured: every link and relink uses TLS
        self.tls_required = tls_required
        self.host_subject = host_subject
        self.session_id = 0
        self.host = ""
        self.tls_in_use = False
        self.channels: tuple[ChannelKey, ...] = ()
        self.migration: MigrationState | None = None
        self.migrations_started = 0

    # -- facts from the driver ------------------------------------------------------------

    def session_up(
        self, session_id: int, channels: list[ChannelKey], host: str, *, tls: bool
    ) -> None:
        """A session is linked (at connect, and after a switch-host relink)."""
        self.session_id = session_id
        self.channels = tuple(sorted(channels, key=lambda k: k != MAIN_KEY))
        self.host = host
        self.tls_in_use = tls

    @property
    def wants_dst_init(self) -> bool:
        """MAIN's next INIT is the destination's (semi-seamless), not a session's first."""
        return self.phase is Phase.AWAIT_DST_INIT

    def _use_tls(self, port: int | None) -> bool:
        return self.tls_required or self.tls_in_use or port is None

    def _target(self, dst: DstInfo, subject: str | None) -> LinkTarget:
        port = None if self._use_tls(dst.port) else dst.port
        return LinkTarget(dst.host or self.host, port, dst.tls_port, subject)

    # -- transitions ----------------------------------------------------------------------

    def _go(self, event: Ev) -> None:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise LocalProtocolError(f"{event.value} is not allowed in phase {self.phase.value}")
        self.phase = nxt

    def _current(self, number: int) -> MigrationState | None:
        """None when ``number`` is not the open migration: a cancelled or superseded pre-link
        task reporting late (that path drops its links)."""
        mig = self.migration
        return mig if mig is not None and mig.number == number else None

    def _need(self) -> MigrationState:
        if self.migration is None:
            raise LocalProtocolError(f"no migration in phase {self.phase.value}")
        return self.migration

    def _step(
        self, mig: MigrationState, key: ChannelKey, side: Side, direction: Direction, name: str,
        now: float, detail: str = "",
    ) -> None:  # fmt: skip
        t_ms = round((now - mig.started) * 1000.0, 3)
        where = {"t_ms": t_ms, "channel": channel_label(*key), "side": side}
        what = {"direction": direction, "message": name, "detail": detail}
        mig.record.steps.append(PathStep.model_validate(where | what))

    def _open(
        self, kind: Literal["seamless", "semi-seamless"], dst: DstInfo, now: float
    ) -> MigrationState:
        self.migrations_started += 1
        record = ClientMigrationRecord(
            path="none",
            connection_id_before=self.session_id,
            channels_before=_labels(self.channels),
            started_at=now,
            destination=f"{dst.host}:{dst.port or dst.tls_port}",
        )
        mig = MigrationState(self.migrations_started, kind, dst, record, now)
        mig.channels = self.channels
        self.migration = mig
        return mig

    def _finish(
        self, mig: MigrationState, path: ClientPath, now: float, error: str | None = None
    ) -> list[Action]:
        record = mig.record
        record.path = path
        record.finished_at = now
        record.connection_id_after = self.session_id if path not in ("failed", "lost") else None
        record.connection_id_kept = path in ("seamless", "semi-seamless") and (
            self.session_id == record.connection_id_before
        )
        if path == "cancelled":
            record.connection_id_after = record.connection_id_before
            record.connection_id_kept = True
        record.channels_after = _labels(self.channels)
        if error:
            record.error = error
        side: Side = "src" if path == "cancelled" else "dst"
        self._step(mig, MAIN_KEY, side, "event", f"DONE:{path}", now)
        self.migration = None
        return [act.Notice("migration-done", path), act.Finished(mig.number, record)]

    def _abandon(self, mig: MigrationState) -> tuple[Action, ...]:
        """Everything a migration holds, released: we stay (or end) on the source."""
        return (
            act.StopPrelinks(mig.number),
            act.Answered(mig.number, ok=False),
            act.DropDestinationLinks(mig.number),
            act.LeaveSource(mig.number),
        )

    # -- source MAIN ----------------------------------------------------------------------

    def on_begin(self, dst: DstInfo, src_version: int | None, now: float) -> list[Action]:
        """MIGRATE_BEGIN_SEAMLESS (``src_version`` given) or MIGRATE_BEGIN (None)."""
        actions: list[Action] = []
        old = self.migration
        if old is not None:
            self._go(Ev.SUPERSEDED)
            actions.append(act.InBackground(self._abandon(old), "spice-abort"))
            actions += self._finish(old, "cancelled", now, "superseded by a new migration")
        self._go(Ev.BEGIN)
        mig = self._open("semi-seamless" if src_version is None else "seamless", dst, now)
        kind = mig.kind
        mig.src_version = src_version
        mig.prelinked = True
        mig.pending = {MAIN_KEY}
        name = "MIGRATE_BEGIN_SEAMLESS" if src_version is not None else "MIGRATE_BEGIN"
        where = f"{dst.host} port={dst.port} tls-port={dst.tls_port}"
        self._step(mig, MAIN_KEY, "src", "rx", name, now, where)
        target = self._target(dst, dst.cert_subject)
        return [
            *actions,
            act.Notice("migration-begin", f"{kind} to {mig.record.destination}"),
            act.StartPrelinks(mig.number, self.session_id, target),
        ]

    def on_switch_host(self, dst: DstInfo, now: float) -> list[Action]:
        """SWITCH_HOST: rebuild the session at ``dst`` (connection id 0)."""
        was = self.phase
        self._go(Ev.SWITCH_HOST)
        actions: list[Action] = []
        mig = self.migration
        if mig is None:
            mig = self._open("semi-seamless", dst, now)
            actions.append(act.Answered(mig.number, ok=False))
        where = f"{dst.host} port={dst.port} tls-port={dst.tls_port}"
        self._step(mig, MAIN_KEY, "src", "rx", "MIGRATE_SWITCH_HOST", now, where)
        if was is Phase.SWITCHING:
            return actions
        mig.switch_at = now
        target = self._target(dst, dst.cert_subject or self.host_subject)
        steps: list[Action] = []
        if mig.prelinked:
            steps.append(act.LetPrelinksFinish(mig.number, timeout=self.link_timeout))
        steps += [
            act.DropDestinationLinks(mig.number, drain=SWITCH_DRAIN_TIMEOUT),
            act.CloseSession(),
            act.Relink(target, now),
        ]
        return [*actions, act.InBackground(tuple(steps), "spice-switch-host")]

    def on_cancel(self, now: float) -> list[Action]:
        """MIGRATE_CANCEL: drop the destination links and stay on the source."""
        was = self.phase
        self._go(Ev.CANCEL)
        mig = self.migration
        if mig is None:
            return []
        self._step(mig, MAIN_KEY, "src", "rx", "MIGRATE_CANCEL", now)
        if was is Phase.SWITCHING:
            return []  # the answer to a late CONNECTED_SEAMLESS: the switch goes on
        return [*self._abandon(mig), *self._finish(mig, "cancelled", now)]

    def on_migrate_end(self, now: float) -> list[Action]:
        """Semi-seamless: the VM moved; MAIN goes first, the destination then sends INIT."""
        mig = self._need()
        if MAIN_KEY not in mig.linked:
            raise LocalProtocolError("MIGRATE_END without a connected migration")
        self._go(Ev.MIGRATE_END)
        self._step(mig, MAIN_KEY, "src", "rx", "MIGRATE_END", now)
        mig.cut_at[MAIN_KEY] = now
        self._step(mig, MAIN_KEY, "dst", "tx", "MIGRATE_END", now)
        return [
            act.SwapChannel(mig.number, MAIN_KEY),
            act.SendToDestination(mig.number, MAIN_KEY, MainClientMigrateEnd()),
        ]

    def on_source_lost(self, key: ChannelKey, error: str, now: float, *, closed: bool) -> bool:
        """A source channel broke during a migration; True when that is expected and the
        session moves on: the source drops us after SWITCH_HOST, and once the VM moved
        semi-seamlessly a channel still on the source may be ``closed`` before its swap.
        Otherwise (a protocol violation, a channel the hand-over still needs, the source's
        MAIN before the VM moved) it is the session's failure."""
        mig = self.migration
        if mig is None or self.phase is Phase.CLOSED:
            return False
        self._go(Ev.SOURCE_LOST)
        self._step(mig, key, "src", "event", "SOURCE_LOST", now, error)
        if self.phase is Phase.SWITCHING:
            return True
        return closed and key != MAIN_KEY and self.phase in _SEMI_MOVING

    # -- source channels: the seamless hand-over ------------------------------------------

    def on_migrate(self, key: ChannelKey, flags: int, now: float) -> list[Action]:
        mig = self._need()
        if key not in mig.linked or key in mig.cut_at:
            raise LocalProtocolError(
                f"{channel_label(*key)}: MIGRATE without a prepared destination link"
            )
        self._go(Ev.MIGRATE)
        mig.cut_at[key] = now
        self._step(mig, key, "src", "rx", "MIGRATE", now, f"flags {int(flags)}")
        actions: list[Action] = []
        if flags & MigrateFlags.NEED_FLUSH:
            actions.append(act.SendToSource(key, MigrateFlushMark()))
            self._step(mig, key, "src", "tx", "MIGRATE_FLUSH_MARK", now)
        if flags & MigrateFlags.NEED_DATA_TRANSFER:
            mig.awaiting_data.add(key)
            actions.append(act.ReadMigrateData(key))
        else:
            actions.append(act.SwapChannel(mig.number, key))
        return actions

    def on_migrate_data(self, key: ChannelKey, data: bytes, now: float) -> list[Action]:
        mig = self._need()
        if key not in mig.awaiting_data:
            raise LocalProtocolError(f"{channel_label(*key)}: MIGRATE_DATA without MIGRATE")
        self._go(Ev.MIGRATE_DATA)
        mig.awaiting_data.discard(key)
        try:
            detail = check_migrate_data(key[0], data).describe()
        except RemoteProtocolError as exc:
            # forwarded all the same: the destination server is the judge of its state
            detail = f"{len(data)} bytes, envelope invalid: {exc}"
        self._step(mig, key, "src", "rx", "MIGRATE_DATA", now, detail)
        self._step(mig, key, "dst", "tx", "MIGRATE_DATA", now, f"{len(data)} bytes")
        return [
            act.SendToDestination(mig.number, key, ClientMigrateData(data)),
            act.SwapChannel(mig.number, key),
        ]

    def on_swapped(self, key: ChannelKey, now: float) -> list[Action]:
        """The driver moved ``key`` to its destination link (its source socket kept)."""
        mig = self._need()
        ready = {
            Phase.HANDOVER: set(mig.cut_at) - mig.awaiting_data,
            Phase.AWAIT_DST_INIT: {MAIN_KEY},
            Phase.SWAPPING: self._semi_rest(mig),
        }.get(self.phase, set())
        if key not in ready - mig.swapped:
            raise LocalProtocolError(f"{channel_label(*key)}: no swap is due")
        self._go(Ev.SWAPPED)
        if self.phase is Phase.AWAIT_DST_INIT:
            return []  # MAIN reads the destination now; its blackout ends with INIT
        since = mig.cut_at[key] if self.phase is Phase.HANDOVER else mig.init_at
        mig.swapped.add(key)
        mig.record.blackout_ms[channel_label(*key)] = round((now - since) * 1000.0, 3)
        self._step(mig, key, "dst", "event", "SWAPPED", now)
        if self.phase is Phase.HANDOVER:
            if mig.swapped >= set(mig.channels):
                return self._all_swapped(mig, "seamless", now)
        elif mig.swapped >= self._semi_rest(mig):
            return self._all_swapped(mig, "semi-seamless", now)
        return []

    def _semi_rest(self, mig: MigrationState) -> set[ChannelKey]:
        return {k for k in mig.channels if k != MAIN_KEY and k in mig.linked}

    def _all_swapped(
        self, mig: MigrationState, path: Literal["seamless", "semi-seamless"], now: float
    ) -> list[Action]:
        self._go(Ev.ALL_SWAPPED)
        if path == "semi-seamless":
            self.host = mig.dst.host or self.host
        return [
            *self._finish(mig, path, now),
            act.InBackground((act.LeaveSource(mig.number),), "spice-leave-source"),
        ]

    # -- destination ----------------------------------------------------------------------

    def on_dst_init(self, session_id: int, now: float) -> list[Action]:
        """Semi-seamless: the destination's INIT on MAIN; the session id it names is ours."""
        mig = self._need()
        self._go(Ev.DST_INIT)
        self._step(mig, MAIN_KEY, "dst", "rx", "INIT", now, f"session {session_id}")
        mig.record.blackout_ms["main:0"] = round((now - mig.cut_at[MAIN_KEY]) * 1000.0, 3)
        self.session_id = session_id
        mig.init_at = now
        rest = [k for k in mig.channels if k in self._semi_rest(mig)]
        if not rest:
            return self._all_swapped(mig, "semi-seamless", now)
        return [act.SwapChannel(mig.number, k, restart_reader=True, channel_up=True) for k in rest]

    def on_dst_linked(
        self, number: int, key: ChannelKey, caps: frozenset[int], where: str, now: float
    ) -> list[Action]:
        mig = self._current(number)
        if mig is None:
            return []
        self._go(Ev.DST_LINKED)
        self._step(mig, key, "dst", "event", "LINKED", now, where)
        mig.linked.add(key)
        mig.pending.discard(key)
        actions: list[Action] = []
        if key == MAIN_KEY:
            others = tuple(k for k in mig.channels if k != MAIN_KEY)
            mig.pending |= set(others)
            version = mig.src_version
            mig.do_seamless = (
                mig.kind == "seamless" and version is not None and MainCap.SEAMLESS_MIGRATE in caps
            )
            if mig.do_seamless and version is not None:
                mig.awaiting_answer = True
                self._step(
                    mig, MAIN_KEY, "dst", "tx", "MIGRATE_DST_DO_SEAMLESS", now, f"version {version}"
                )
                actions.append(
                    act.SendToDestination(number, MAIN_KEY, MainMigrateDstDoSeamless(version))
                )
            if others:
                target = self._target(mig.dst, mig.dst.cert_subject)
                actions.append(act.LinkToDestination(number, others, self.session_id, target))
            if mig.do_seamless:
                actions.append(act.AwaitSeamlessAnswer(number))
        return actions + self._settle(mig, now)

    def on_prelink_failed(
        self, number: int, error: str, now: float, key: ChannelKey | None = None
    ) -> list[Action]:
        """A pre-link of ``key`` failed, or (key None) reading the ACK/NACK did."""
        mig = self._current(number)
        if mig is None:
            return []
        self._go(Ev.DST_LINK_FAILED)
        mig.failure = mig.failure or error
        if key is None:
            mig.awaiting_answer = False
        else:
            mig.pending.discard(key)
        return self._settle(mig, now)

    def on_dst_message(self, number: int, name: str, now: float) -> list[Action]:
        mig = self._current(number)
        if mig is None:
            return []
        self._go(Ev.DST_MESSAGE)
        self._step(mig, MAIN_KEY, "dst", "rx", name, now, "before seamless answer")
        return []

    def on_seamless_answer(self, number: int, ack: bool, now: float) -> list[Action]:
        mig = self._current(number)
        if mig is None:
            return []
        self._go(Ev.SEAMLESS_ANSWER)
        mig.awaiting_answer = False
        mig.do_seamless = mig.do_seamless and ack
        name = "MIGRATE_DST_SEAMLESS_ACK" if ack else "MIGRATE_DST_SEAMLESS_NACK"
        self._step(mig, MAIN_KEY, "dst", "rx", name, now)
        return self._settle(mig, now)

    def _settle(self, mig: MigrationState, now: float) -> list[Action]:
        """Answer the source once every pre-link (and the ACK/NACK) is in."""
        if mig.pending or mig.awaiting_answer:
            return []
        if mig.failure is not None:
            self._go(Ev.PRELINKS_FAILED)
            self._step(mig, MAIN_KEY, "dst", "event", "LINK_FAILED", now, mig.failure)
            mig.record.error = f"destination link failed: {mig.failure}"
            mig.linked.clear()
            self._step(mig, MAIN_KEY, "src", "tx", "MIGRATE_CONNECT_ERROR", now)
            return [
                act.DropDestinationLinks(mig.number),
                act.SendToSource(MAIN_KEY, MainMigrateConnectError()),
                act.Answered(mig.number, ok=False),
            ]
        self._go(Ev.PRELINKS_OK)
        reply = MainMigrateConnectedSeamless() if mig.do_seamless else MainMigrateConnected()
        mig.record.connected_reply_at = now
        self._step(mig, MAIN_KEY, "src", "tx", reply.NAME, now)
        return [
            act.SendToSource(MAIN_KEY, reply),
            act.Answered(mig.number, ok=True),
            act.Notice("migration-connected", reply.NAME),
        ]

    # -- the switch-host relink -----------------------------------------------------------

    def on_relinked(self, now: float) -> list[Action]:
        """The fresh session is up (``session_up`` was called with its facts)."""
        mig = self._need()
        self._go(Ev.RELINKED)
        self._step(mig, MAIN_KEY, "dst", "event", "RECONNECTED", now, f"session {self.session_id}")
        for label in _labels(self.channels):
            mig.record.blackout_ms[label] = round((now - mig.switch_at) * 1000.0, 3)
        return self._finish(mig, "switch-host", now)

    def on_relink_failed(self, error: str, channels: list[ChannelKey], now: float) -> list[Action]:
        mig = self._need()
        self._go(Ev.RELINK_FAILED)
        self.session_id = 0
        self.channels = tuple(channels)
        self._step(mig, MAIN_KEY, "dst", "event", "RECONNECT_FAILED", now, error)
        return self._finish(mig, "lost", now, f"switch-host reconnect failed: {error}")

    def close(self) -> list[Action]:
        """The client closes: release what an open migration holds (its record stays open)."""
        mig = self.migration
        self._go(Ev.CLOSE)
        return list(self._abandon(mig)) if mig is not None else []
