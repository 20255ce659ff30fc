"""What one libvirt-driven migration is asked to do, and the report it gives back."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from spice_libvirt.migration.policy import HoldApplied, HoldPolicy, TlsDowngradePolicy
from spice_libvirt.migration.report import MigrationReport
from spice_libvirt.migration.switchover import HoldMode

#: libvirt's "unlimited" migration speed in MiB/s (LLONG_MAX >> 20), what virsh uses too
LIBVIRT_MAX_SPEED_MIBS = 8796093022207


class LibvirtMigrationRequest(BaseModel):
    """One libvirt-driven migration; validated before anything is touched."""

    domain: str = Field(description="domain name or UUID on the source")
    source_uri: str = "qemu:///system"
    destination_uri: str = Field(description="the destination as the *source* libvirtd sees it")
    #: how this process reaches the destination libvirtd (events, verdict); default: the above
    destination_connect_uri: str | None = None
    #: spice://host[:port][?tlsPort=P&tlsSubject=DN]; default: libvirt's migration cookie
    graphics_uri: str | None = None
    #: the baseline: libvirt's own migration, no hold, no wait (the verdict is still taken)
    plain: bool = False
    #: ``auto``: libvirt's public API (speed and downtime floors, taint-free), turning to the
    #: QMP throttle for a guest that cannot be held so only when ``allow_taint``; ``libvirt``:
    #: never the throttle; ``qmp``: the throttle from the start (needs ``allow_taint``)
    hold: HoldPolicy = "auto"
    #: the operator allows libvirt's monitor passthrough, which taints the domain
    #: (``custom-monitor``): ``query-spice`` for the clients and the verdict (connection ids,
    #: channel types) and QEMU's max-bandwidth for a guest the taint-free hold cannot keep.
    #: Off (the default): libvirt's public API only; the clients come from the source QEMU's
    #: sockets (the controller on the source host) or the embedded client
    allow_taint: bool = False
    #: encrypt the guest's memory on the wire (``VIR_MIGRATE_TLS``): True/False as the
    #: operator chose; None: where this host, the source, is set up for it
    #: (:func:`spice_libvirt.libvirt.migration_tls.decide`)
    migrate_tls: bool | None = None
    hold_bytes_per_s: int = Field(default=4096, ge=1)
    #: ``switchover``: the first pass runs at the domain's own speed (or a pace that ends it
    #: when the client is expected to be linked) and the hold goes on only as the pass nears
    #: its end (:mod:`spice_libvirt.migration.switchover`), so the client links while the
    #: memory moves; ``bulk``: libvirt's speed floor from the start, the client's links and
    #: the transfer one after the other. A QMP throttle (``hold = "qmp"``) is always bulk.
    hold_mode: HoldMode = "switchover"
    #: the switchover hold goes on when the rest of the pass would be sent within this
    switchover_guard_s: float = Field(default=0.4, ge=0.05, le=10.0)
    #: how long a client is taken to need to link when its RTT is unknown (a remote source)
    assumed_link_s: float = Field(default=2.5, ge=0.1, le=60.0)
    #: how long the client may take to link before the hold is released anyway
    hold_timeout: float = Field(default=15.0, gt=0)
    #: added to the RTT estimate after the destination initialized the client's last
    #: channel (negative: earlier, counting on the transfer that follows the release).
    #: Measured (RESULTS-libvirt-margin.md, remote-viewer, 0/150/300 ms): the smallest
    #: margin that would still have been seamless was at most -48 ms over 64 seamless runs
    #: (median -124 ms), so 0 keeps >= 48 ms in hand in the worst run
    release_margin_ms: float = Field(default=0.0, ge=-1000, le=10_000)
    #: after the embedded client's own answer has reached the source (sent + one-way delay):
    #: measured (RESULTS-libvirt-margin.md, embedded, 0/150/300 ms): the smallest margin
    #: that would still have been seamless was at most -37 ms over 30 runs, so 0 keeps
    #: >= 37 ms in hand
    embedded_margin_ms: float = Field(default=0.0, ge=0)
    #: abort (domain stays on the source) if the client does not link within hold_timeout
    require_seamless: bool = False
    #: the embedded client's one-way delay to the source (None: measured by the caller or 0)
    witness_one_way_ms: float | None = None
    #: the longest wait after libvirt returned for the evidence of the client's path (the
    #: verdict is taken as soon as the evidence is conclusive, usually one RTT after)
    settle_timeout: float = Field(default=6.0, gt=0)
    #: slack on top of the client's RTT when watching for a switch-host reconnect
    verdict_margin_ms: float = Field(default=100.0, ge=0)
    completion_timeout: float = Field(default=300.0, gt=0)
    connect_timeout: float = Field(default=15.0, gt=0)
    call_timeout: float = Field(default=30.0, gt=0)
    #: a client on TLS whose channels the destination graphics would still accept in plain
    #: text: ``refuse`` raises PreflightError (nothing changed), ``warn`` migrates
    #: and notes it. ``refuse`` by default -- a migration must never move a client from TLS
    #: to plain text, and libvirt offers the plain port from its cookie whatever the graphics
    #: URI says, so the domain's own graphics (defaultMode='secure') are the only real
    #: protection; the refusal names that fix. ``warn`` is an explicit operator choice.
    tls_downgrade_policy: TlsDowngradePolicy = "refuse"
    #: a SPICE ticket with an expiry (``passwdValidTo``) that would run out before the client
    #: can link to the destination is refused in the preflight; with this set, it is
    #: extended instead to now + max(this, what the client needs), as VDSM extends it by
    #: 120 s for a migration. The ticket itself is kept; the report says so.
    extend_ticket_s: float | None = Field(default=None, gt=0, le=86400)

    @model_validator(mode="after")
    def _qmp_hold_needs_taint(self) -> LibvirtMigrationRequest:
        if self.hold == "qmp" and not self.allow_taint and not self.plain:
            raise ValueError(
                "hold=qmp throttles through the monitor passthrough, which taints the domain: "
                "it needs allow_taint (--allow-taint)"
            )
        return self

    @property
    def dst_connect(self) -> str:
        return self.destination_connect_uri or self.destination_uri


class HoldDetails(BaseModel):
    """How the switchover was held and released (the part this controller adds)."""

    policy: HoldPolicy
    applied: HoldApplied = "none"
    #: the domain was tainted by libvirt's monitor passthrough (custom-monitor)
    tainted: bool = False
    reason: str = ""
    #: why the taint-free hold was turned into the QMP throttle (allow_taint): the first
    #: pass was about to end before the client linked; None: it was not
    escalated: str | None = None
    #: where the clients on the source were counted: "query-spice" (monitor passthrough),
    #: "kernel" (the source QEMU's sockets), "embedded" (our client only), "none"
    census: Literal["query-spice", "kernel", "embedded", "none"] = "none"
    #: the domain's libvirt migration downtime before the hold (ms), restored at the release
    downtime_before_ms: int | None = None
    bandwidth_before_mibs: int | None = None
    hold_bytes_per_s: int | None = None
    #: ms from migrateToURI3 to QEMU "active" (libvirt's prepare + client_migrate_info)
    active_after_ms: float | None = None
    #: ms from migrateToURI3 to the release
    released_after_ms: float | None = None
    #: ms from QEMU "active" to the release
    held_ms: float | None = None
    #: ``switchover`` or ``bulk`` (the request's ``hold_mode``; ``bulk`` for the QMP throttle)
    mode: HoldMode | None = None
    #: ms the speed was at libvirt's floor before the release (the hold proper; in the
    #: switchover mode 0 when the client linked while the first pass still ran)
    floor_ms: float | None = None
    #: progress samples the switchover plan took (one libvirt call each)
    samples: int = 0
    #: what the switchover plan did and why (paced, held at ... MiB left)
    plan_notes: list[str] = Field(default_factory=list)
    release_reason: str | None = None
    client_rtt_estimate_ms: float | None = None
    expected_channels: int | None = None
    destination_channels_initialized: int = 0
    #: destination graphics events, ms from migrateToURI3: "connect 10.0.0.3:4711 @ 623.7"
    destination_events: list[str] = Field(default_factory=list)
    #: QEMU's own max-bandwidth (B/s) before the migration, read when the passthrough
    #: throttle is used; and whether it was found (or put) back after a failed job
    qemu_bandwidth_before: int | None = None
    bandwidth_restored: bool | None = None


class LibvirtMigrationReport(MigrationReport):
    """The verdict of one libvirt migration: :class:`MigrationReport` plus the hold."""

    domain: str
    method: Literal["libvirt-seamless", "libvirt-plain"] = "libvirt-seamless"
    wall_ms: float | None = Field(default=None, description="migrateToURI3 call, wall time")
    hold: HoldDetails
    tainted: bool = False
    #: the guest's memory moved over TLS (``VIR_MIGRATE_TLS``); the note says why or why not
    migration_tls: bool = False
    #: ms from libvirt's return to the client's last source channel closing (negative:
    #: before it returned)
    client_left_source_ms: float | None = None
    #: the client's source channels seen disconnecting, of how many it had
    source_disconnects: str | None = None


__all__ = [
    "LIBVIRT_MAX_SPEED_MIBS",
    "HoldDetails",
    "LibvirtMigrationReport",
    "LibvirtMigrationRequest",
]
