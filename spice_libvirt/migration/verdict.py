"""The verdict of one migration, from evidence only: the one place a ClientVerdict is built.

Both controllers gather evidence their own way (QMP events and queries; libvirt's graphics
events and the monitor passthrough) and hand it here as one :class:`VerdictEvidence`. The
rules are the same on both paths, so the same evidence always gives the same verdict:

* **completed**, a *new* connection id on the destination: the client was reset
  (``switch-host``), even if its old links still linger there;
* **completed**, the *same* id and no new one: the session was kept -- ``seamless``, or
  ``semi-seamless`` when the source is known to run without ``seamless-migration=on``
  (QMP cannot tell the two apart otherwise, and the verdict says so);
* **completed**, the client on neither: ``failed``;
* **not completed**: ``cancelled`` or ``failed``; the client stayed on the source;
* **our embedded client** cross-checks with its own record: it claims seamless only with
  BEGIN_SEAMLESS, MIGRATE and MIGRATE_DATA seen and its id kept; without a record nothing
  supports either path, so it is ``failed`` with a note -- never ``switch-host``;
* the **guest stream** broke (gaps, duplicates): not seamless, whatever the protocol did;
* **TLS** is compared channel by channel: any channel on TLS at the source and plain after
  marks the report ``tls_downgraded`` and the migration is not a success (issue 13).

Pure: no I/O, no clock. Tested exhaustively in ``tests/test_verdict.py``.
"""

from __future__ import annotations

import dataclasses

from spice_libvirt.migration.evidence import (
    Sessions,
    SpiceSession,
    channel_name,
    channel_names,
)
from spice_libvirt.migration.report import (
    ClientVerdict,
    MigrationReport,
    Outcome,
    classify_outcome,
    embedded_path_is_seamless,
)
from spice_libvirt.spice.record import ClientMigrationRecord, ClientPath, StreamStats


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


@dataclasses.dataclass
class Verdict:
    """Per-client verdicts and the outcome; :meth:`apply` writes them into a report."""

    clients: list[ClientVerdict]
    outcome: Outcome
    notes: list[str]
    stream: StreamStats | None = None
    tls_downgraded_channels: list[str] = dataclasses.field(default_factory=list)

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
        if self.stream is not None:
            report.stream = self.stream


def judge(evidence: VerdictEvidence) -> Verdict:
    """The verdict the evidence supports, and nothing more."""
    notes: list[str] = []
    after = evidence.after or {}
    new_ids = sorted(set(after) - set(evidence.before))
    clients = [
        _client(evidence, session, after, new_ids, notes) for session in evidence.before.values()
    ]
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
    return Verdict(clients, outcome, notes, stream, downgraded)


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
    elif cid in after:
        _follow(v, after[cid], kept=True)
        v.path = "semi-seamless" if ev.seamless_option is False else "seamless"
        if not embedded and ev.seamless_option is None:
            v.note = (
                f"{ev.observed_by} evidence only: connection id kept on the destination "
                "(seamless and semi-seamless look alike from QMP)"
            )
    else:
        v.path = "failed"
        v.note = "the client is not connected to the destination"


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
    if record.connection_id_after is not None:
        v.connection_id_after = record.connection_id_after
        v.connection_id_kept = record.connection_id_kept
    return record.path


def _downgraded(clients: list[ClientVerdict]) -> list[str]:
    several = len(clients) > 1
    return [
        f"{c.connection_id_before}/{name}" if several else name
        for c in clients
        for name in c.tls_downgraded_channels
    ]


__all__ = ["Verdict", "VerdictEvidence", "judge"]
