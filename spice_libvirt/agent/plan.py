"""One held migration, decided without I/O: what the agent knows and what it should do next.

The agent's service (:mod:`spice_libvirt.agent.service`) feeds a :class:`HeldMigration` what
it observes -- QEMU's migration status, the destination's graphics events, the speed and
downtime it reads back from libvirt -- and asks it two questions: *is it time to release,
and why* (:meth:`HeldMigration.release_due`), and *what happened* (:meth:`verdict`). Every
rule of the agent lives here, tested with made-up clocks in ``tests/test_agent_plan.py``.

The hold itself is the taint-free one of ``host-agent.md``: libvirt's public
``migrateSetMaxSpeed`` and ``migrateSetMaxDowntime``, paced by
:class:`~spice_libvirt.migration.switchover.SwitchoverPlan`: the downtime limit at 1 ms from
``setup``, the first pass at the caller's speed (or paced to end when the client is expected
to be linked), and the speed at 1 MiB/s only as the end of the pass comes near. A guest with
more non-zero memory than the client needs seconds at 1 MiB/s can be held this way; a
near-empty guest (firmware only) cannot, and the verdict says so.

A caller that switches to post-copy switches over when it says so: the hold is released
at once (there is nothing left to hold), and the verdict says whether the client had linked.

Callers are not fought: a caller that changes the downtime during the hold (VDSM steps it up
over time) keeps its value, and the release restores the caller's *latest* values; a
caller that changes the speed during the hold gets its value back at the release too, but
the hold's speed is put back meanwhile, because the speed *is* the hold.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from spice_libvirt.libvirt.census import follow_client, linked_counts
from spice_libvirt.libvirt.connection import GraphicsEvent, endpoint
from spice_libvirt.libvirt.hold import (
    FINAL_STATES,
    POSTCOPY_STATES,
    SPICE_END_STATES,
    SWITCHOVER_STATES,
    DestinationLinks,
)
from spice_libvirt.libvirt.settle import SourceDepartures, reconnected_at, reconnects
from spice_libvirt.migration.policy import NO_CONTACT, first_contact_deadline, release_point
from spice_libvirt.migration.switchover import (
    HOLD_DOWNTIME_MS,
    HOLD_SPEED_MIBS,
    Progress,
    SpeedChange,
    SwitchoverPlan,
)
from spice_libvirt.migration.verdict import (
    AgentOutcome,
    LinkedClient,
    Settled,
    Settling,
    Verdict,
    VerdictEvidence,
    agent_outcome,
    judge,
    settled,
)

#: why a hold ended, in a few fixed words (the agent's ``releases_total{reason}`` label):
#: ``linked`` the destination showed every channel; ``timeout`` the bound passed first;
#: ``migration-ended`` the job ended during the hold; ``no-destination`` the destination
#: could not be found or reached; ``no-contact`` nothing of the client reached the
#: destination in time; ``stopping`` the agent stops; ``error`` a step failed;
#: ``recovered`` a later agent undid a hold its predecessor left; ``postcopy`` the caller
#: switched to post-copy (the guest moved then)
ReleaseKind = Literal[
    "linked",
    "timeout",
    "migration-ended",
    "postcopy",
    "no-destination",
    "no-contact",
    "stopping",
    "error",
    "recovered",
]
RELEASE_KINDS: tuple[ReleaseKind, ...] = get_args(ReleaseKind)

#: after the migration completed, how long the client may take to leave the source:
#: spice-server waits 10 s for it, then disconnects it itself
LEAVE_BOUND_S = 11.0
#: the verdict's wait once the client left, and the slack on top of its RTT (the
#: controller's defaults: ``settle_timeout``, ``verdict_margin_ms``)
SETTLE_BOUND_S = 6.0
VERDICT_MARGIN_S = 0.1


@dataclasses.dataclass(frozen=True)
class Release:
    """Why a hold is released: the fixed ``kind`` and the operator's sentence ``why``."""

    kind: ReleaseKind
    why: str


@dataclasses.dataclass
class CallerValues:
    """What the caller had set (and sets while we hold): restored at the release."""

    speed_mibs: int
    downtime_ms: int


@dataclasses.dataclass(frozen=True)
class Adjustment:
    """A call the service must make after :meth:`HeldMigration.observe_values`."""

    speed_mibs: int | None = None


@dataclasses.dataclass
class HeldMigration:
    """The state of one outgoing migration while the agent holds it and until its verdict."""

    domain: str
    started_at: float
    caller: CallerValues
    client_channels: tuple[str, ...]
    hold_timeout_s: float = 15.0
    margin_ms: float = 100.0
    links: DestinationLinks = dataclasses.field(init=False)
    status: str = "setup"
    switchover_at: float | None = None
    completed_at: float | None = None
    #: when QEMU told spice-server the migration ended (it completed, or post-copy began):
    #: the client's links made before then can be kept, those made while the paused guest's
    #: last state moved included
    spice_end_at: float | None = None
    released_at: float | None = None
    release: Release | None = None
    #: when the caller switched to post-copy (the guest moved then)
    postcopy_at: float | None = None
    #: the client's channels leaving the source (the source libvirtd's graphics events)
    departures: SourceDepartures = dataclasses.field(init=False)
    #: a destination was watched for the client's links (False: nothing to judge by)
    watched: bool = True
    #: why the evidence was taken as conclusive (:func:`settled`), once it was
    verdict_basis: str = ""
    _client_ends: frozenset[tuple[str, int]] = dataclasses.field(init=False, default=frozenset())
    #: nothing of the client reached the destination in time (policy.first_contact_deadline)
    unreachable: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)
    #: the speed plan of the hold (None: the speed held at 1 MiB/s throughout)
    switchover: SwitchoverPlan | None = None
    _forced: Release | None = None

    def __post_init__(self) -> None:
        hosts = frozenset(endpoint(c)[0] for c in self.client_channels)
        self.links = DestinationLinks(self.domain, self.started_at, hosts)
        self.departures = SourceDepartures(self.domain, len(self.client_channels))
        self._client_ends = frozenset(endpoint(c) for c in self.client_channels)

    # ---------------------------------------------------------------- observations

    @property
    def expected_channels(self) -> int:
        return len(self.client_channels)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The client addresses the hold is for (one per client, in order)."""
        return tuple(sorted({host for host, _ in self._client_ends}))

    def destination_event(self, event: GraphicsEvent) -> None:
        """A graphics event of the destination libvirtd (any domain; others are ignored),
        before the switchover and after it alike: the verdict weighs each by its time."""
        self.links.absorb(event)

    def source_event(self, event: GraphicsEvent) -> None:
        """A graphics event of the source libvirtd: the client's own channels leaving it."""
        if event.domain == self.domain and endpoint(event.remote) in self._client_ends:
            self.departures.absorb(event)

    def migration_status(self, status: str, at: float) -> None:
        """QEMU's MIGRATION event on the source (its time is when QEMU said so: the
        evidence is weighed by event times, not by when the agent got round to it)."""
        self.status = status
        if status in SWITCHOVER_STATES and self.switchover_at is None:
            self.switchover_at = at
        if status in POSTCOPY_STATES and self.postcopy_at is None:
            self.postcopy_at = at
        if status in FINAL_STATES and self.completed_at is None:
            self.completed_at = at
        if status in SPICE_END_STATES and self.spice_end_at is None:
            self.spice_end_at = at

    def progress(self, sample: Progress) -> tuple[SpeedChange | None, float | None]:
        """A progress sample during the hold: a speed to set now, and when to sample next."""
        if self.switchover is None or self.released_at is not None:
            return None, None
        return self.switchover.observe(sample)

    def observe_values(self, speed_mibs: int, downtime_ms: int) -> Adjustment:
        """Speed and downtime read back during the hold; anything not ours is the caller's."""
        adjust = Adjustment()
        if self.released_at is not None:
            return adjust
        if downtime_ms not in (HOLD_DOWNTIME_MS, self.caller.downtime_ms):
            self.notes.append(f"caller set downtime {downtime_ms} ms during the hold: kept")
            self.caller.downtime_ms = downtime_ms
            if self.switchover is not None and not self.switchover.holding:
                # QEMU switches over once what is left fits the caller's downtime at the
                # speed it measures: the end of the pass is no longer the switchover
                held = self.switchover.hold_now("the caller's downtime limit rules now")
                return Adjustment(speed_mibs=held.speed_mibs)
        plan = self.switchover
        if plan is not None:
            if plan.ours(speed_mibs) or speed_mibs == self.caller.speed_mibs:
                return adjust
            self.notes.append(f"caller set speed {speed_mibs} MiB/s during the hold: followed")
            self.caller.speed_mibs = speed_mibs
            change = plan.caller_speed(speed_mibs)
            return Adjustment(speed_mibs=change.speed_mibs if change else None)
        # at or below the hold's speed is ours: libvirt reports a QMP throttle under 1 MiB/s
        # (allow_taint) as 0, and a caller never slows a migration below libvirt's floor
        if speed_mibs > HOLD_SPEED_MIBS:
            if speed_mibs != self.caller.speed_mibs:
                self.notes.append(
                    f"caller set speed {speed_mibs} MiB/s during the hold: restored at release"
                )
                self.caller.speed_mibs = speed_mibs
            adjust = Adjustment(speed_mibs=HOLD_SPEED_MIBS)
        return adjust

    def force_release(self, release: Release) -> None:
        """Release at the next question, whatever the links say (destination unknown...)."""
        if self._forced is None:
            self._forced = release

    # ---------------------------------------------------------------- decisions

    def release_due(self, now: float) -> tuple[float | None, Release | None]:
        """``(None, release)``: release now; ``(t, None)``: ask again at ``t`` at the latest."""
        if self.released_at is not None:
            return None, None
        if self._forced is not None:
            return None, self._forced
        if self.status in FINAL_STATES:
            why = f"the migration ended ({self.status}) during the hold"
            return None, Release("migration-ended", why)
        if self.status in POSTCOPY_STATES:
            why = "the caller switched to post-copy: the guest runs on the destination"
            return None, Release("postcopy", why)
        bound = self.started_at + self.hold_timeout_s
        if now >= bound:
            why = f"client not linked within the bound of {self.hold_timeout_s:.0f} s"
            return None, Release("timeout", why)
        contact_by = first_contact_deadline(self.started_at)
        if not self.links.contacted():
            if now >= contact_by:
                self.unreachable = True
                why = f"{NO_CONTACT} within {contact_by - self.started_at:.1f} s"
                return None, Release("no-contact", why)
            bound = min(bound, contact_by)
        need = max(1, self.expected_channels)
        if self.links.complete(need):
            rtt = self.links.rtt_estimate() or 0.0
            last = self.links.last_initialize() or now
            point = release_point(last, rtt, self.margin_ms)
            if now >= point.at:
                return None, Release(
                    "linked",
                    f"destination initialized {len(self.links.init_at)}/{need} channels "
                    f"(+ RTT estimate {rtt * 1000:.0f} ms + margin {self.margin_ms:.0f} ms)",
                )
            return min(point.at, bound), None
        return bound, None

    def released(self, at: float, release: Release) -> None:
        self.released_at = at
        self.release = release

    @property
    def release_reason(self) -> str:
        return self.release.why if self.release is not None else ""

    # ---------------------------------------------------------------- the verdict

    @property
    def linked_before_end(self) -> bool:
        """Every channel of every client initialized on the destination before spice-server
        was told the migration ended -- by the events' times, not by when the agent read
        them."""
        end = self.spice_end_at
        if end is None:
            return False
        need = self._channels_by_address()
        return bool(need) and all(
            linked_counts(self.links, address, end, None, until=end)[0] >= channels
            for address, channels in need.items()
        )

    def _channels_by_address(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for host, _ in self._client_ends:
            counts[host] = counts.get(host, 0) + 1
        return counts

    def _left_at(self) -> float | None:
        """When the client began leaving the source (its first channel closed there)."""
        return self.departures.first_at

    def linked_clients(self, now: float) -> tuple[LinkedClient, ...]:
        """Each client's evidence as of now (:func:`~spice_libvirt.libvirt.census.follow_client`)."""
        end = self.spice_end_at if self.spice_end_at is not None else now
        left = self._left_at() or self.completed_at or now
        return tuple(
            follow_client(self.links, address, channels, spice_end=end, left_source=left)
            for address, channels in sorted(self._channels_by_address().items())
        )

    def judge_due(self, now: float) -> Settled:
        """Is the evidence conclusive (the controller's rule, :func:`settled`, on the same
        taint-free evidence)? A completed migration is judged once the client has left the
        source (at most :data:`LEAVE_BOUND_S` after the end) and then no later than
        :data:`SETTLE_BOUND_S`; anything else at once."""
        if not self.client_channels:
            return Settled(True, "no SPICE client connected")
        if self.status != "completed" or self.completed_at is None:
            return Settled(True, f"the migration did not complete ({self.status})")
        if not self.watched:
            return Settled(True, "no destination watched: nothing to judge by")
        left = self._left_at()
        leave_by = self.completed_at + LEAVE_BOUND_S
        if left is None and now < leave_by:
            return Settled(False, "waiting for the client to leave the source", leave_by)
        anchor = left if left is not None else leave_by
        clients = self.linked_clients(now)
        return settled(
            Settling(
                before={},
                after=None,
                returned_at=anchor,
                now=now,
                rtt=self.links.rtt_estimate(),
                source_left_at=anchor,
                reconnected_at=reconnected_at(self.links, anchor, frozenset(self.addresses)),
                prelinks_dropped=any(c.dropped for c in clients),
                margin=VERDICT_MARGIN_S,
                bound=SETTLE_BOUND_S,
                linked_kept=all(c.kept for c in clients),
            )
        )

    def judgement(self, now: float) -> Verdict:
        """The verdict of :func:`judge` on this migration's evidence as of ``now``."""
        final = self.status if self.status in FINAL_STATES else None
        return judge(
            VerdictEvidence(
                status=final,
                before={},
                linked=self.linked_before_end,
                observed_by="libvirt's graphics events",
                linked_clients=self.linked_clients(now),
                lost_cause=NO_CONTACT if self.unreachable else None,
            )
        )

    def verdict(self, now: float) -> AgentOutcome:
        if not self.client_channels:
            return "no-client"
        if self.status in FINAL_STATES and not self.watched:
            return "not-linked" if self.status == "completed" else "failed"
        return agent_outcome(self.judgement(now), self.status)

    def relinks_after(self, now: float) -> int:
        """The client's new connections to the destination after it left the source."""
        left = self._left_at() or self.completed_at
        if left is None:
            return 0
        found = reconnects(self.links, left, frozenset(self.addresses))
        return sum(1 for e in found if e.at <= now)

    def held_ms(self) -> float | None:
        """From ``setup`` to the release: the time the switchover was held back."""
        if self.released_at is None:
            return None
        return round((self.released_at - self.started_at) * 1000.0, 1)

    def link_wait_ms(self) -> float | None:
        """From the hold to the destination initializing the client's last channel, if it
        did before spice-server was told the migration ended (what the hold waited for);
        None when it did not."""
        if not self.linked_before_end:
            return None
        last = self.links.last_initialize()
        if last is None:
            return None
        return round(max(0.0, last - self.started_at) * 1000.0, 1)

    def throttled_ms(self) -> float | None:
        """The part of it at the hold's speed (0: the client linked during the bulk)."""
        if self.released_at is None:
            return None
        if self.switchover is None:
            return self.held_ms()
        return self.switchover.held_ms(self.released_at)
