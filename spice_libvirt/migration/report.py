"""The migration verdict, as data.

A verdict must be *true*, so it is computed from evidence and nothing else, by the rules in
:mod:`spice_libvirt.migration.verdict` (the one place they are written). The CLI prints
:class:`MigrationReport` with ``--json`` as one object; management tools parse it, so field
names are a contract.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from spice_libvirt.migration.evidence import (
    CHANNEL_TYPE_NAMES,
    CHANNEL_TYPE_NUMBERS,
    channel_name,
    parse_channel_name,
)
from spice_libvirt.migration.placement import Placement
from spice_libvirt.spice.record import ClientMigrationRecord, SessionChange, StreamStats

#: The overall outcome. ``no-client`` is used only when no SPICE client was connected at all:
#: there was nothing to keep, and calling that "seamless" would be a claim without evidence.
#: ``client-lost``: the VM moved (it runs on the destination) and a client could not follow
#: -- its session is gone -- which is neither a failed migration nor a switch-host.
Outcome = Literal[
    "seamless", "semi-seamless", "switch-host", "client-lost", "cancelled", "failed", "no-client"
]


class ClientVerdict(SessionChange):
    """One SPICE client, as both QEMUs (and, for ours, the client itself) saw it."""

    kind: Literal["embedded", "external"] = Field(
        description="embedded: our own client, with a protocol record; external: QMP only"
    )
    #: the client had linked every channel to the destination before ``migrate`` was issued
    linked_before_migrate: bool = False
    #: every channel QMP lists for this client uses TLS (before: source, after: destination)
    tls_before: bool | None = None
    tls_after: bool | None = None
    #: TLS per channel (None: QMP did not say), before on the source, after where it went
    tls_channels_before: dict[str, bool | None] = Field(default_factory=dict)
    tls_channels_after: dict[str, bool | None] = Field(default_factory=dict)
    #: channels on TLS before the migration and plain after it (never allowed)
    tls_downgraded_channels: list[str] = Field(default_factory=list)
    #: how the path was established: "client-record" (embedded), "qmp" (events/queries),
    #: "graphics-events" (taint-free: the client's channels counted on the source by the
    #: kernel, followed by its address through libvirt's graphics events)
    evidence: Literal["client-record", "qmp", "graphics-events"] = "qmp"
    #: the client's address (graphics-events evidence: what identifies it)
    address: str | None = None
    #: embedded client only: the record, with the message-by-message path
    record: ClientMigrationRecord | None = None
    stream: StreamStats | None = None
    blackout_ms: dict[str, float] = Field(default_factory=dict)
    note: str | None = None

    @property
    def identity(self) -> str:
        """How the client is known: its connection id before -> after, or its address."""
        if self.connection_id_before is None:
            return f"address {self.address or '?'}"
        return f"connection id {self.connection_id_before} -> {self.connection_id_after}"


class LinkWait(BaseModel):
    """The wait between ``client_migrate_info`` and ``migrate`` (the race this project closes)."""

    skipped: bool = False
    #: "linked": every channel linked (and, embedded, CONNECTED_SEAMLESS sent);
    #: "timeout": not within the bound; "no-client"; "skipped"; "connect-error";
    #: "unreachable": no connection of the client reached the destination at all
    result: Literal["linked", "timeout", "no-client", "skipped", "connect-error", "unreachable"] = (
        "skipped"
    )
    #: why the client did not link, when it says (e.g. "client could not verify the
    #: destination (subject mismatch)")
    reason: str | None = None
    duration_ms: float | None = None
    grace_ms: float = 0.0
    timeout_s: float = 0.0
    signal: Literal["embedded-client", "qmp-destination", "none"] = "none"
    channels_expected: list[str] = Field(default_factory=list)
    channels_linked: list[str] = Field(default_factory=list)


class MigrationFigures(BaseModel):
    """QEMU's own numbers (``query-migrate``) plus the controller's wall clocks."""

    status: str | None = None
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    transferred_bytes: int | None = None
    total_bytes: int | None = None
    normal_pages: int | None = None
    duplicate_pages: int | None = None
    mbps: float | None = None
    passes: int | None = Field(default=None, description="ram.dirty-sync-count")
    dirty_pages_rate: int | None = None
    #: wall time from issuing ``migrate`` to the COMPLETED state (controller clock)
    migrate_to_completed_ms: float | None = None
    #: wall time from COMPLETED to SPICE_MIGRATE_COMPLETED on the source
    completed_to_spice_ms: float | None = None
    downtime_limit_ms: int | None = None
    max_bandwidth: int | None = None
    error_desc: str | None = None


class Endpoint(BaseModel):
    """One QEMU as the controller saw it."""

    qmp: str
    qemu_version: str | None = None
    spice_version: str | None = None
    spice_host: str | None = None
    spice_port: int | None = None
    spice_tls_port: int | None = None
    status_before: str | None = None
    status_after: str | None = None


class PhaseTiming(BaseModel):
    name: str
    start_ms: float
    duration_ms: float
    ok: bool = True
    detail: str | None = None


class MigrationReport(BaseModel):
    """The verdict of one migration: printed as one JSON object with ``--json``."""

    outcome: Outcome
    seamless: bool = False
    started_at: dt.datetime
    duration_ms: float = 0.0
    source: Endpoint
    destination: Endpoint
    migrate_uri: str
    client_target: str = Field(description="host:port[/tls-port] given to client_migrate_info")
    require_seamless: bool = False
    link_wait: LinkWait = Field(default_factory=LinkWait)
    clients: list[ClientVerdict] = Field(default_factory=list)
    #: the embedded client's path, message by message (mirror of clients[i].record.steps)
    stream: StreamStats | None = None
    migration: MigrationFigures = Field(default_factory=MigrationFigures)
    spice_migrate_completed: bool = False
    #: ms from the migration's end (libvirt's return; QEMU path: SPICE_MIGRATE_COMPLETED)
    #: to the verdict, and the evidence that made it conclusive (``verdict.settled``)
    verdict_ready_ms: float | None = None
    verdict_basis: str | None = None
    phases: list[PhaseTiming] = Field(default_factory=list)
    source_resumed: bool | None = None
    error: str | None = None
    error_phase: str | None = None
    notes: list[str] = Field(default_factory=list)
    #: some channel went from TLS at the source to plain text after the migration; such a
    #: migration is never a success, whatever its protocol path
    tls_downgraded: bool = False
    #: those channels, by name (``"display:0"``); for several clients ``"<id>/display:0"``
    tls_downgraded_channels: list[str] = Field(default_factory=list)
    #: where the VM runs, asked of both ends after anything but a clean completion
    #: (:mod:`spice_libvirt.migration.placement`); None: a completed migration, not asked
    placement: Placement | None = None
    #: what each end said, in words ("source running, destination absent")
    placement_evidence: str | None = None
    #: why a client was lost (outcome ``client-lost``), when known: e.g. no connection from
    #: the client reached the destination during the migration
    client_lost_cause: str | None = None


__all__ = [
    "CHANNEL_TYPE_NAMES",
    "CHANNEL_TYPE_NUMBERS",
    "ClientVerdict",
    "Endpoint",
    "LinkWait",
    "MigrationFigures",
    "MigrationReport",
    "Outcome",
    "PhaseTiming",
    "channel_name",
    "parse_channel_name",
]
