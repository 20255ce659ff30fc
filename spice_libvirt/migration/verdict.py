"""The verdict of one migration, from evidence only: the one place a ClientVerdict is built.

Both controllers gather evidence their own way (QMP events and queries; libvirt's graphics
events and the monitor passthrough) and hand it here as one :class:`VerdictEvidence`. The
rules are the same on both paths, so the same evidence always gives the same verdict:

* **completed**, a *new* connection id on the destination: the client was reset
  (``switch-host``), even if its old links still linger there;
* **completed**, the *same* id and no new one: the session was kept -- ``seamless``, or
  ``semi-seamless`` when the source is known to run without ``seamless-migration=on``
  (QMP cannot tell the two apart otherwise, and the verdict says so);
* **completed**, the client on neither: ``lost`` -- the VM moved, the session is gone
  (``client-lost``, with its cause when known: no connection of the client reached the
  destination); ``failed`` only when nobody could look at the destination;
* **not completed**: ``cancelled`` or ``failed``; the client stayed on the source;
* **our embedded client** cross-checks with its own record: it claims seamless only with
  BEGIN_SEAMLESS, MIGRATE and MIGRATE_DATA seen and its id kept; without a record nothing
  supports either path, so it is ``failed`` with a note -- never ``switch-host``;
* the **guest stream** broke (gaps, duplicates): not seamless, whatever the protocol did;
* **TLS** is compared channel by channel: any channel on TLS at the source and plain after
  marks the report ``tls_downgraded`` and the migration is not a success;
* a **new connection** on the destination after the client left the source, whose session
  has not linked yet (``reconnected``), is a switch-host too: spice-server can stall such a
  new main channel for ~10 s behind a stale pre-linked session (``rtt-seamless.md``).

*When* the evidence is enough is decided here too (:func:`settled`): the verdict comes from
events, not from a settle window. A switch-host client leaves the source before libvirt
returns (libvirt's Confirm waits for SPICE_MIGRATE_COMPLETED, which spice-server sends only
once the client is gone) and reaches the destination again one RTT after its source sockets
closed; so a kept session with every channel and no new connection one RTT (+ a margin)
after the client left the source is conclusive, and only missing evidence waits longer.

Pure: no I/O, no clock (times are passed in). Tested exhaustively in ``tests/test_verdict.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from spice_libvirt.migration.evidence import (
    Sessions,
    SpiceSession,
    channel_name,
    channel_names,
)
from spice_libvirt.migration.report import ClientVerdict, MigrationReport, Outcome
from spice_libvirt.spice.record import ClientMigrationRecord, ClientPath, StreamStats


@dataclasses.dataclass(frozen=True)
class LinkedClient:
    """One client followed without the monitor passthrough (taint-free evidence).

    Its channels are *counted* on the source (the kernel's sockets of the source QEMU,
    :mod:`spice_libvirt.libvirt.census`) and followed by its address through libvirt's
    graphics events on both hosts; libvirt's events carry neither channel types nor
    connection ids, so a kept session is inferred: every channel initialized on the
    destination before the switchover, none of them dropped, and no new connection from
    the client after it left the source (the host agent's rule).
    """

    address: str
    channels: int
    tls_channels: int = 0
    #: its channels initialized on the destination before the switchover and still there
    prelinked: int = 0
    #: of those, how many came in on the destination's TLS port
    prelinked_tls: int = 0
    #: a channel it had initialized on the destination disconnected from it
    dropped: bool = False
    #: it connected to the destination anew after leaving the source (switch-host)
    reconnected: bool = False
    #: its channels initialized on the destination only after the switchover, still there
    #: (too late to be kept; not lost either)
    later: int = 0

    @property
    def kept(self) -> bool:
        return self.prelinked >= self.channels > 0 and not self.dropped and not self.reconnected


@dataclasses.dataclass(frozen=True)
class VerdictEvidence:
    """Everything a verdict may rest on; a field left at its default is evidence missing."""

    #: the migration's final state: "completed", "failed", "cancelled" (None: unknown)
    status: str | None
    #: the clients on the source before the migration (channels with their TLS state)
    before: Sessions
    #: where the VM runs afterwards -- the destination if completed, else the source;
    #: None when nobody looked
    after: Sessions | None = None
    #: every channel was linked to the destination before the switchover
    linked: bool = False
    #: the migration was never started because the client did not link (require-seamless)
    aborted_before_migrate: bool = False
    #: the source runs with ``-spice seamless-migration=on`` (None: unknown)
    seamless_option: bool | None = None
    #: the connection id of our embedded client, when one was attached
    embedded_id: int | None = None
    record: ClientMigrationRecord | None = None
    stream: StreamStats | None = None
    #: how ``after`` was observed, for the notes ("QMP", "libvirt/QMP")
    observed_by: str = "QMP"
    #: a connection from a new remote reached the destination after the client left the
    #: source (a switch-host whose new session may not have linked yet)
    reconnected: bool = False
    #: what is known of why a client could not follow (e.g. policy.NO_CONTACT), for a
    #: client found on neither host
    lost_cause: str | None = None
    #: clients followed by their address (taint-free evidence), besides ``before``
    linked_clients: tuple[LinkedClient, ...] = ()


@dataclasses.dataclass
class Verdict:
    """Per-client verdicts and the outcome; :meth:`apply` writes them into a report."""

    clients: list[ClientVerdict]
    outcome: Outcome
    notes: list[str]
    stream: StreamStats | None = None
    tls_downgraded_channels: list[str] = dataclasses.field(default_factory=list)
    #: why the outcome is ``client-lost``, when known
    lost_cause: str | None = None

    @property
    def tls_downgraded(self) -> bool:
        return bool(self.tls_downgraded_channels)

    @property
    def seamless(self) -> bool:
        return self.outcome == "seamless" and not self.tls_downgraded

    def apply(self, report: MigrationReport) -> None:
        report.clients = self.clients
        report.outcome = self.outcome
        report.seamless = self.seamless
        report.tls_downgraded = self.tls_downgraded
        report.tls_downgraded_channels = list(self.tls_downgraded_channels)
        report.client_lost_cause = self.lost_cause if self.outcome == "client-lost" else None
        if self.stream is not None:
            report.stream = self.stream


def judge(evidence: VerdictEvidence) -> Verdict:
    """The verdict the evidence supports, and nothing more."""
    notes: list[str] = []
    after = evidence.after or {}
    new_ids = sorted(set(after) - set(evidence.before))
    clients = [
        _client(evidence, session, after, new_ids, notes) for session in evidence.before.values()
    ] + [_linked_client(evidence, linked) for linked in evidence.linked_clients]
    if evidence.aborted_before_migrate:
        outcome: Outcome = "cancelled"
    else:
        status = evidence.status
        outcome = classify_outcome(status, clients, cancelled=status == "cancelled")
    stream = evidence.stream
    if outcome == "seamless" and stream is not None and (stream.gaps or stream.duplicates):
        # the protocol path was seamless but guest data was lost or repeated: the promise
        # of seamless migration was not kept, so the verdict must not say so
        notes.append(
            f"stream continuity broken: {stream.gaps} gaps, {stream.duplicates} duplicates"
        )
        outcome = "failed"
    downgraded = _downgraded(clients)
    if downgraded:
        notes.append(
            f"TLS downgraded: {', '.join(downgraded)} went from TLS to plain text; "
            "not a success whatever the protocol path"
        )
    lost_cause = None
    if outcome == "client-lost":
        lost = [c for c in clients if c.path == "lost"]
        lost_cause = evidence.lost_cause or next((c.note for c in lost if c.note), None)
        notes.append(f"client lost: {lost_cause or 'it is connected to neither host'}")
    return Verdict(clients, outcome, notes, stream, downgraded, lost_cause)


def _client(
    ev: VerdictEvidence,
    session: SpiceSession,
    after: Sessions,
    new_ids: list[int],
    notes: list[str],
) -> ClientVerdict:
    cid = session.connection_id
    embedded = ev.embedded_id is not None and cid == ev.embedded_id
    v = ClientVerdict(
        kind="embedded" if embedded else "external",
        path="none",
        connection_id_before=cid,
        channels_before=session.names,
        linked_before_migrate=ev.linked,
        tls_before=session.all_tls,
        tls_channels_before=_tls_by_channel(session),
    )
    if ev.status == "completed":
        _completed_path(v, ev, cid, after, new_ids, embedded)
    else:
        v.path = "cancelled" if ev.status == "cancelled" or ev.aborted_before_migrate else "failed"
        if cid in after:
            _follow(v, after[cid], kept=True)
            v.note = "the client stayed on the source"
    if embedded:
        _embedded(v, ev, notes)
    if v.connection_id_after is not None and v.connection_id_after in after:
        later = after[v.connection_id_after]
        v.tls_after = later.all_tls
        v.tls_channels_after = _tls_by_channel(later)
        v.tls_downgraded_channels = channel_names(
            ch
            for ch, tls in session.channels.items()
            if tls is True and later.channels.get(ch) is False
        )
    return v


def _linked_client(ev: VerdictEvidence, c: LinkedClient) -> ClientVerdict:
    """A client seen through the kernel and libvirt's graphics events only."""
    v = ClientVerdict(
        kind="external",
        path="none",
        connection_id_before=None,
        address=c.address,
        evidence="graphics-events",
        linked_before_migrate=c.prelinked >= c.channels > 0,
        tls_before=c.tls_channels == c.channels if c.channels else None,
    )
    counted = f"{c.prelinked} of {c.channels} channel(s) initialized on the destination"
    if ev.status != "completed":
        v.path = "cancelled" if ev.status == "cancelled" or ev.aborted_before_migrate else "failed"
        v.note = "the client stayed on the source"
    elif c.reconnected:
        v.path = "switch-host"
        v.note = (
            f"{counted} before the switchover; it connected to the destination anew after "
            "leaving the source (libvirt's graphics events)"
        )
    elif c.kept:
        v.path = "seamless"
        v.connection_id_kept = True
        v.tls_after = c.prelinked_tls == c.prelinked if c.prelinked else None
        v.note = (
            f"{counted} before the switchover, none dropped, no reconnect: its session was kept "
            "(inferred from libvirt's graphics events without the monitor passthrough; "
            "seamless and semi-seamless look alike there)"
        )
        lost = c.tls_channels - c.prelinked_tls
        if lost > 0:
            v.tls_downgraded_channels = [f"{c.address}: {lost} of {c.tls_channels} TLS channel(s)"]
    elif c.prelinked == 0 and c.later == 0 and not c.dropped:
        v.path = "lost"
        v.note = ev.lost_cause or (
            f"no channel of {c.address} reached the destination, and it left the source: "
            "its session is gone"
        )
    else:
        v.path = "failed"
        dropped = ", one dropped" if c.dropped else ""
        late = f", {c.later} only after it" if c.later else ""
        v.note = (
            f"{counted} before the switchover{dropped}{late}: not linked to the destination "
            "in time, and no reconnect seen"
        )
    return v


def _tls_by_channel(session: SpiceSession) -> dict[str, bool | None]:
    return {channel_name(*ch): tls for ch, tls in sorted(session.channels.items())}


def _follow(v: ClientVerdict, later: SpiceSession, *, kept: bool) -> None:
    v.connection_id_after = later.connection_id
    v.connection_id_kept = kept
    v.channels_after = later.names


def _completed_path(
    v: ClientVerdict,
    ev: VerdictEvidence,
    cid: int,
    after: Sessions,
    new_ids: list[int],
    embedded: bool,
) -> None:
    if new_ids:
        # a fresh session on the destination means a reset; the old links may linger
        _follow(v, after[new_ids[0]], kept=False)
        v.path = "switch-host"
    elif ev.reconnected:
        v.path = "switch-host"
        v.connection_id_kept = False
        v.note = (
            "the client connected to the destination anew after leaving the source "
            "(its new session had not linked when the verdict was taken)"
        )
    elif cid in after:
        _follow(v, after[cid], kept=True)
        v.path = "semi-seamless" if ev.seamless_option is False else "seamless"
        if not embedded and ev.seamless_option is None:
            v.note = (
                f"{ev.observed_by} evidence only: connection id kept on the destination "
                "(seamless and semi-seamless look alike from QMP)"
            )
    elif ev.after is None:
        v.path = "failed"
        v.note = "nobody could look at the destination"
    else:
        v.path = "lost"
        v.note = ev.lost_cause or "the client is connected to neither host: its session is gone"


def _embedded(v: ClientVerdict, ev: VerdictEvidence, notes: list[str]) -> None:
    """Cross-check our client's own record with what QMP showed."""
    v.evidence = "client-record"
    v.stream = ev.stream
    record = ev.record
    if record is None:
        if ev.status == "completed":
            # QMP may show the id kept, but the client itself never finished its hand-over
            # (e.g. a channel lost before MIGRATE_DATA): not seamless, not switch-host
            v.note = (
                "the embedded client did not finish its migration (no record); "
                f"QMP alone would say {v.path}"
            )
            v.path = "failed"
        else:
            v.note = v.note or "no record from the embedded client"
        return
    v.record = record
    v.blackout_ms = dict(record.blackout_ms)
    if ev.status == "completed":
        v.path = _record_path(v, record, notes)


def _record_path(v: ClientVerdict, record: ClientMigrationRecord, notes: list[str]) -> ClientPath:
    if record.path == "seamless":
        if not embedded_path_is_seamless(record):
            notes.append(
                "the embedded client claimed seamless without BEGIN_SEAMLESS, MIGRATE and "
                "MIGRATE_DATA all in its steps, or without keeping its connection id"
            )
            return "failed"
        if not v.connection_id_kept:
            notes.append("the embedded client says seamless but QMP shows a new connection id")
            return "switch-host"
        return "seamless"
    if record.path == "none":
        v.note = "the embedded client saw no migration message"
        return "failed"
    if record.path == "lost":
        v.note = record.error or "the embedded client lost its session"
    if record.connection_id_after is not None:
        v.connection_id_after = record.connection_id_after
        v.connection_id_kept = record.connection_id_kept
    return record.path


def classify_outcome(
    migration_status: str | None, clients: list[ClientVerdict], *, cancelled: bool
) -> Outcome:
    """The overall outcome from the migration state and every client's verdict.

    The worst client wins: one client that fell back to switch-host makes the migration
    ``switch-host`` even if another was kept, and one that was lost makes it
    ``client-lost``.
    """
    if migration_status != "completed":
        return "cancelled" if cancelled or migration_status == "cancelled" else "failed"
    if not clients:
        return "no-client"
    if any(c.path == "lost" for c in clients):
        return "client-lost"
    order: list[ClientPath] = ["failed", "none", "switch-host", "semi-seamless", "seamless"]
    worst = min((c.path for c in clients), key=lambda p: order.index(p) if p in order else 0)
    if worst in ("seamless", "semi-seamless", "switch-host"):
        return worst
    # a client that broke, or that saw no migration at all: nothing shows it was reset
    # (switch-host) nor kept, so the only true word is that it failed
    return "failed"


def embedded_path_is_seamless(record: ClientMigrationRecord) -> bool:
    """The embedded client's claim of ``seamless`` checked against its own steps.

    Seamless means: BEGIN_SEAMLESS arrived, at least one MIGRATE arrived, MIGRATE_DATA was
    received and forwarded, and the connection id was kept.
    """
    messages = {s.message for s in record.steps}
    return (
        record.path == "seamless"
        and record.connection_id_kept
        and any("BEGIN_SEAMLESS" in m for m in messages)
        and any(m == "MIGRATE" or m.endswith(".MIGRATE") for m in messages)
        and any("MIGRATE_DATA" in m for m in messages)
    )


#: What the host agent can say of a migration someone else started: it follows libvirt's
#: graphics events and the client's sockets, never a connection id (:class:`LinkedClient`).
#: ``not-linked``: the client was neither kept nor shown reset (linked too late, or a
#: channel dropped, and no reconnect seen).
AgentOutcome = Literal[
    "seamless", "switch-host", "not-linked", "client-lost", "failed", "no-client"
]


def agent_outcome(verdict: Verdict, status: str | None) -> AgentOutcome:
    """The agent's word for a :func:`judge` verdict on :class:`LinkedClient` evidence: the
    same rules, in the agent's vocabulary (a migration that did not complete ``failed``:
    the client stayed; a completed one that kept no client and reset none ``not-linked``;
    seamless and semi-seamless look alike there)."""
    outcome = verdict.outcome
    if outcome in ("seamless", "semi-seamless"):
        return "seamless"
    if outcome in ("switch-host", "client-lost", "no-client"):
        return outcome
    return "not-linked" if status == "completed" else "failed"


def _downgraded(clients: list[ClientVerdict]) -> list[str]:
    several = len(clients) > 1
    return [
        f"{c.connection_id_before}/{name}" if several else name
        for c in clients
        for name in c.tls_downgraded_channels
    ]


# --------------------------------------------------------------------- when to judge


@dataclasses.dataclass(frozen=True)
class Settling:
    """What has been seen since the migration returned; monotonic seconds of the caller."""

    before: Sessions
    #: the destination's sessions now (None: not readable)
    after: Sessions | None
    #: libvirt returned (QEMU path: SPICE_MIGRATE_COMPLETED)
    returned_at: float
    now: float
    #: the client's RTT estimate in seconds (None: unknown)
    rtt: float | None = None
    #: the last of the client's source channels disconnected (None: not all seen)
    source_left_at: float | None = None
    #: the first connect on the destination from a new remote after the client left
    reconnected_at: float | None = None
    #: a channel linked to the destination before the switchover disconnected from it
    prelinks_dropped: bool = False
    #: an embedded client is attached, and whether its record has arrived
    embedded: bool = False
    record_in: bool = False
    #: scheduling and event-delivery slack on top of the RTT (seconds)
    margin: float = 0.1
    #: the longest wait after ``returned_at`` whatever the evidence (seconds)
    bound: float = 6.0
    #: taint-free evidence (no sessions to read): whether every client followed by its
    #: address is kept so far (:attr:`LinkedClient.kept`); None: the sessions decide
    linked_kept: bool | None = None


@dataclasses.dataclass(frozen=True)
class Settled:
    """Whether to judge now; if not, when to look again unless an event comes first."""

    done: bool
    reason: str
    recheck_at: float | None = None


#: the switch-host window when the client's RTT is unknown (seconds)
UNKNOWN_RTT_WINDOW = 0.5


def settled(s: Settling) -> Settled:
    """Is the evidence conclusive? The rules, first match wins:

    0. no client before the migration: nothing to follow;
    1. a new connection id on the destination: switch-host, now;
    2. the bound passed: judge on what is there;
    3. an embedded client's record arrived: its own word, now (the record waits for it);
    4. a new connection seen but not linked yet: wait for its id, at most 2 RTT + margin;
    5. every client kept on the destination with every channel, no pre-link dropped, and
       one RTT + margin passed since the client left the source (or libvirt returned,
       whichever came first) without a new connection: kept, now;
    6. otherwise wait, re-checking at the end of that window and at the bound.
    """
    after = s.after or {}
    bound_at = s.returned_at + s.bound
    if not s.before and s.linked_kept is None:
        return Settled(True, "no client was connected before the migration")
    if set(after) - set(s.before):
        return Settled(True, "a new connection id on the destination")
    if s.now >= bound_at:
        return Settled(True, f"bounded wait over ({s.bound:.1f} s)")
    if s.embedded and s.record_in:
        return Settled(True, "the embedded client's own record")
    window = s.rtt + s.margin if s.rtt is not None else UNKNOWN_RTT_WINDOW
    if s.reconnected_at is not None:
        until = min(bound_at, s.reconnected_at + 2 * window)
        if s.now >= until:
            return Settled(True, "a new connection on the destination (not linked yet)")
        return Settled(False, "a new connection on the destination: waiting for its id", until)
    anchor = min(s.returned_at, s.source_left_at or s.returned_at)
    quiet_at = anchor + window
    kept = (s.linked_kept is not False) and all(
        cid in after and set(session.channels) <= set(after[cid].channels)
        for cid, session in s.before.items()
    )
    if kept and not s.prelinks_dropped and s.now >= quiet_at:
        since = (
            "the client left the source"
            if s.source_left_at is not None and s.source_left_at <= s.returned_at
            else "the migration returned"
        )
        return Settled(
            True,
            f"kept with every channel; no new connection {window * 1000:.0f} ms after {since}",
        )
    if kept and not s.prelinks_dropped:
        return Settled(False, "kept so far: watching for a reconnect", min(quiet_at, bound_at))
    return Settled(False, "not conclusive: waiting for the destination", bound_at)


__all__ = [
    "AgentOutcome",
    "LinkedClient",
    "Settled",
    "Settling",
    "Verdict",
    "VerdictEvidence",
    "agent_outcome",
    "classify_outcome",
    "embedded_path_is_seamless",
    "judge",
    "settled",
]
