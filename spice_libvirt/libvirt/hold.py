"""Hold a libvirt migration before its switchover until the SPICE client is there; release.

libvirt sends ``client_migrate_info`` itself and migrates at once, so the only lever is the
*moment of switchover*. The hold is the host agent's, through libvirt's public API: the
migration starts at libvirt's 1 MiB/s speed floor, and at QEMU's ``setup`` (its MIGRATION
event; libvirt sets its own parameters just before) the downtime goes to 1 ms, so that a
guest with memory to move stays in its first pass. Once the transfer runs, the switchover
plan (:mod:`spice_libvirt.migration.switchover`, the agent's too) lifts the speed to the
domain's own, or to a pace that ends the first pass about when the client is expected to
be linked, and puts the floor back only as the end of the pass comes near: the client links
while the memory moves (``hold_mode = "bulk"``: the floor from the start). That taints
nothing. A near-empty guest (firmware only) moves in ~1.4 s even at the floor; for it, and
only when the operator allowed the monitor passthrough (``allow_taint``), QEMU's
max-bandwidth goes to a few KiB/s once the pass is seen about to end
(:class:`~spice_libvirt.migration.policy.FloorWatch`), which taints the domain. The release
(speed and downtime back to the domain's) comes at the release point of
:func:`spice_libvirt.migration.policy.release_point`:

* our embedded client: when it sent MIGRATE_CONNECTED_SEAMLESS, plus its one-way delay and
  a margin -- it knows, no guessing;
* any other client: when the destination initialized every channel the client has on the
  source (libvirt's graphics events), plus the RTT estimated from the connect ->
  initialize spacing, plus a margin.

The hold is bounded (``hold_timeout``): a client that never links is released anyway, and
the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from typing import Any

from spice_libvirt import errors
from spice_libvirt.libvirt.connection import (
    Connection,
    EventStream,
    GraphicsEvent,
    MigrationEvent,
    endpoint,
)
from spice_libvirt.libvirt.request import (
    LIBVIRT_MAX_SPEED_MIBS,
    LibvirtMigrationReport,
    LibvirtMigrationRequest,
)
from spice_libvirt.migration.policy import (
    NO_CONTACT,
    FloorWatch,
    ReleasePoint,
    first_contact_deadline,
    release_point,
)
from spice_libvirt.migration.progress import RunLog
from spice_libvirt.migration.switchover import (
    HOLD_DOWNTIME_MS,
    HOLD_SPEED_MIBS,
    GuestMemory,
    SpeedChange,
    SwitchoverPlan,
    progress_from_job_stats,
)
from spice_libvirt.migration.witness import MigrationWitness, await_connected

#: QEMU migration states in which the RAM transfer runs (and can be held)
RUNNING_STATES = ("active", "pre-switchover", "device")
#: QEMU migration states after which nothing can be held any more
FINAL_STATES = ("completed", "failed", "cancelled")
#: QEMU's post-copy states: the guest already runs on the destination
POSTCOPY_STATES = ("postcopy-active", "postcopy-paused", "postcopy-recover")
#: QEMU migration states in which the switchover is under way (the guest paused) or done
SWITCHOVER_STATES = ("pre-switchover", "device", *POSTCOPY_STATES, *FINAL_STATES)
#: the states at which QEMU calls spice_server_migrate_end (ui/spice-core.c: the migration
#: completed, or post-copy began after the devices moved): a client whose channels linked to
#: the destination before then can be kept, even when it linked while the guest was paused
SPICE_END_STATES = ("completed", *POSTCOPY_STATES)
#: how often the job statistics are read while a hold may still turn to the throttle
FLOOR_POLL_S = 0.03


class MigrationStatus:
    """QEMU's migration status as its MIGRATION events tell it, for one domain."""

    def __init__(self, events: EventStream[MigrationEvent], domain: str) -> None:
        self.events = events
        self.domain = domain
        self.status = "none"
        self.switchover_at: float | None = None
        #: when spice-server was told the migration ended (:data:`SPICE_END_STATES`)
        self.spice_end_at: float | None = None

    def absorb(self, event: MigrationEvent) -> None:
        if event.domain != self.domain:
            return
        self.status = event.status
        if event.status in SWITCHOVER_STATES and self.switchover_at is None:
            self.switchover_at = event.at
        if event.status in SPICE_END_STATES and self.spice_end_at is None:
            self.spice_end_at = event.at

    def drain(self) -> None:
        for event in self.events.drain():
            self.absorb(event)

    async def next(self, timeout: float) -> str | None:
        """The next status (None: none within ``timeout``)."""
        try:
            self.absorb(await self.events.get(timeout=timeout))
        except TimeoutError:
            return None
        return self.status


class DestinationLinks:
    """The client's channels on the destination, from libvirt's graphics events."""

    def __init__(self, domain: str, t0: float, client_hosts: frozenset[str] | None = None) -> None:
        self.domain = domain
        self.t0 = t0
        #: the addresses the client's channels come from (None: anyone's links count): a
        #: connection from elsewhere that never links cannot keep :meth:`complete` false
        self.client_hosts = client_hosts
        self.connect_at: dict[str, float] = {}
        self.init_at: dict[str, float] = {}
        self.log: list[str] = []
        #: every event of the domain, in order (the verdict looks for reconnects and drops)
        self.events: list[GraphicsEvent] = []

    def absorb(self, event: GraphicsEvent) -> None:
        if event.domain != self.domain:
            return
        self.events.append(event)
        self.log.append(f"{event.phase} {event.remote} @ {(event.at - self.t0) * 1000:.1f}")
        if event.phase == "connect":
            self.connect_at[event.remote] = event.at
            self.init_at.pop(event.remote, None)
        elif event.phase == "initialize":
            self.init_at[event.remote] = event.at
        elif event.phase == "disconnect":
            self.connect_at.pop(event.remote, None)
            self.init_at.pop(event.remote, None)

    def rtt_estimate(self) -> float | None:
        """Median connect -> initialize spacing (seconds): about one client RTT here."""
        spans = [self.init_at[r] - self.connect_at[r] for r in self.init_at if r in self.connect_at]
        return statistics.median(spans) if spans else None

    def complete(self, expected: int) -> bool:
        """Every expected channel initialized and no link of the client still half-way."""
        half_way = [r for r in self.connect_at if r not in self.init_at]
        if self.client_hosts is not None:
            half_way = [r for r in half_way if endpoint(r)[0] in self.client_hosts]
        return len(self.init_at) >= expected and not half_way

    def last_initialize(self) -> float | None:
        return max(self.init_at.values()) if self.init_at else None

    def contacted(self) -> bool:
        """A connection of the client (from its addresses, when known) reached the
        destination at all, linked or not."""
        return any(
            e.phase == "connect"
            and (self.client_hosts is None or endpoint(e.remote)[0] in self.client_hosts)
            for e in self.events
        )


async def _next_or_done(
    gfx: EventStream[GraphicsEvent], job: asyncio.Task[Any], timeout: float
) -> GraphicsEvent | None:
    """The next graphics event, or None when the job ended or ``timeout`` passed first."""
    getter = asyncio.ensure_future(gfx.get(timeout=timeout))
    try:
        await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
            with contextlib.suppress(BaseException):
                await getter
    if getter.cancelled() or getter.exception() is not None:
        return None
    return getter.result()


async def release_hold(
    src: Connection,
    dom: Any,
    speed_mibs: int,
    downtime_ms: int | None,
    timeout: float | None = None,
) -> None:
    """The domain's own downtime, then its speed, back (a speed of 1 MiB/s or less -- the
    floor itself -- goes to libvirt's maximum, as virsh's). Downtime first: the moment the
    speed is back, the switchover is judged by the caller's limit, not the hold's."""
    if downtime_ms is not None:
        await src.call(
            lambda: dom.migrateSetMaxDowntime(downtime_ms, 0), "release the hold: downtime", timeout
        )
    speed = speed_mibs if speed_mibs > 1 else LIBVIRT_MAX_SPEED_MIBS
    await src.call(lambda: dom.migrateSetMaxSpeed(speed, 0), "release the hold: speed", timeout)


@dataclasses.dataclass
class Hold:
    """The hold and release of one running libvirt migration job."""

    src: Connection
    dom: Any
    migration: asyncio.Task[Any]
    req: LibvirtMigrationRequest
    report: LibvirtMigrationReport
    log: RunLog
    witness: MigrationWitness | None
    status: MigrationStatus
    #: turn to the QMP throttle if the taint-free hold is about to run out (allow_taint)
    escalate: bool = False
    #: the switchover plan (None: the floor from the start, as the bulk mode and the QMP
    #: throttle hold)
    plan: SwitchoverPlan | None = None
    #: the guest's RAM, and how much of it the source QEMU has resident (None: unknown): the
    #: non-zero data the first pass moves
    ram_bytes: int = 0
    resident_bytes: int | None = None
    #: set when the link wait is over: the watch sets no speed after it (the release's)
    _over: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def run(
        self,
        gfx: EventStream[GraphicsEvent],
        links: DestinationLinks,
        t_start: float,
        orig_speed: int,
        expected: int,
        migrations_before: int | None,
    ) -> bool:
        """Hold the migration until the client is linked; release; True if it linked."""
        hold = self.report.hold
        start = time.monotonic()
        active = await self._wait_active()
        t_active = time.monotonic()
        hold.active_after_ms = round((t_active - t_start) * 1000.0, 3)
        if not active:
            self.log.note("the migration was over before it could be held")
            self.report.link_wait.result = "timeout"
            return False
        if hold.applied == "qmp-throttle":
            await self._throttle()
        elif self.plan is not None:
            await self._start_plan(self.plan)
        self.log.record("hold", start, detail=f"{hold.applied} ({hold.mode})")
        wait_start = time.monotonic()
        deadline = t_active + self.req.hold_timeout
        watching = self.escalate or (self.plan is not None and not self.plan.holding)
        watch = asyncio.create_task(self._watch()) if watching else None
        try:
            if self.witness is not None:
                point = await self._embedded_linked(
                    gfx, links, deadline, t_active, migrations_before
                )
            else:
                point = await self._destination_linked(gfx, links, deadline, t_active, expected)
        finally:
            await self._stop_watch(watch)
        linked = point is not None
        if not linked:
            link = self.report.link_wait
            if self.migration.done():
                hold.release_reason = "the migration ended during the hold"
            elif link.result == "unreachable":
                hold.release_reason = f"{link.reason}: given up at once"
            elif link.result == "connect-error":
                hold.release_reason = (
                    f"{link.reason or 'client could not link to the destination'} "
                    "(MIGRATE_CONNECT_ERROR): released at once (switch-host risk)"
                )
            else:
                hold.release_reason = (
                    f"client not linked within {self.req.hold_timeout:.1f} s: released "
                    "anyway (switch-host risk)"
                )
            self.log.note(hold.release_reason)
        else:
            assert point is not None
            await asyncio.sleep(max(0.0, point.at - time.monotonic()))
        self.log.record("link-wait", wait_start, ok=linked, detail=hold.release_reason)
        if not self.migration.done() and (linked or not self.req.require_seamless):
            await self._release(orig_speed, t_start, t_active)
        return linked

    async def _wait_active(self) -> bool:
        """Until QEMU's MIGRATION events say the transfer runs (True) or is over (False).

        At ``setup`` libvirt has set its own parameters (the speed floor among them): the
        downtime floor goes on then, through the public API, before the first page moves.
        The events come through libvirt-qemu's event API, which taints nothing.
        """
        deadline = time.monotonic() + 60.0
        floored = False
        while time.monotonic() < deadline and not self.migration.done():
            status = self.status.status
            if status in ("setup", *RUNNING_STATES) and not floored:
                floored = True
                await self._floor_downtime()
            if status in RUNNING_STATES:
                return True
            if status in FINAL_STATES:
                return False
            await self.status.next(timeout=0.05)
        return self.status.status in RUNNING_STATES

    async def _floor_downtime(self) -> None:
        try:
            await self.src.call(
                lambda: self.dom.migrateSetMaxDowntime(HOLD_DOWNTIME_MS, 0), "hold: downtime"
            )
        except errors.LibvirtError as exc:
            self.log.note(f"downtime floor refused ({exc}): holding at the speed floor only")

    async def _start_plan(self, plan: SwitchoverPlan) -> None:
        """The transfer runs (at the floor, libvirt's start parameter): the speed the plan
        asks for now -- the domain's own, a pace, or the floor kept. What QEMU scans after
        the guest's RAM (video memory: zero pages, fast) is the job's total beyond it."""
        total = 0
        with contextlib.suppress(errors.LibvirtError):
            stats = await self.src.call(lambda: self.dom.jobStats(0), "job stats", timeout=5.0)
            total = int(stats.get("memory_total") or 0)
        memory, total = GuestMemory.of(self.resident_bytes, self.ram_bytes, total)
        change = plan.start(time.monotonic(), memory, total)
        if change is None:
            speed = plan.caller_speed_mibs
            await self._set_speed(SpeedChange(speed, "the domain's own speed"))
        elif change.speed_mibs != HOLD_SPEED_MIBS:
            await self._set_speed(change)
        for why in plan.notes:
            self.log.note(why)

    async def _watch(self) -> None:
        """While the client links: the switchover plan's samples until the floor is back
        on, then (``allow_taint``) the floor's own watch. Ends when the link wait is over."""
        if self.plan is not None and not self.plan.holding:
            await self._pace(self.plan)
        if self.escalate and (self.plan is None or self.plan.holding):
            await self._watch_floor()

    async def _stop_watch(self, watch: asyncio.Task[None] | None) -> None:
        """The watch ends between two calls, never in the middle of one: a speed it set after
        the release would be a hold nobody releases."""
        self._over.set()
        if watch is None:
            return
        try:
            await asyncio.shield(watch)
        except asyncio.CancelledError:
            watch.cancel()
            raise
        except errors.LibvirtError:
            pass  # the release decides; the job may be over

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the link wait ends first; True if it is over."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._over.wait()
        return self._over.is_set() or self.migration.done()

    async def _pace(self, plan: SwitchoverPlan) -> None:
        """Sample the progress as the plan asks and set the speed it says, until the floor
        is back on (or the link wait is over)."""
        next_at: float | None = plan.first_sample_at()
        while next_at is not None:
            if await self._pause(next_at - time.monotonic()):
                return
            asked = time.monotonic()
            try:
                stats = await self.src.call(lambda: self.dom.jobStats(0), "job stats", timeout=5.0)
            except errors.LibvirtError:
                next_at = time.monotonic() + 0.1  # the job may be ending: the end decides
                continue
            now = time.monotonic()
            lag = max(0.0, asked - next_at) + (now - asked)
            change, next_at = plan.observe(progress_from_job_stats(stats, now, lag))
            if change is not None:
                await self._set_speed(change)
                self.log.note(change.why)

    async def _set_speed(self, change: SpeedChange) -> None:
        if self._over.is_set():
            return
        speed = change.speed_mibs
        await self.src.call(lambda: self.dom.migrateSetMaxSpeed(speed, 0), "hold: speed")

    async def _watch_floor(self) -> None:
        """Turn to the QMP throttle when the pass is about to end at the floor (libvirt's job
        statistics: public API). Runs until the link wait is over."""
        watch = FloorWatch()
        while not self._over.is_set() and not self.migration.done():
            try:
                stats = await self.src.call(lambda: self.dom.jobStats(0), "job stats", timeout=5.0)
            except errors.LibvirtError:
                stats = {}
            why = watch.feed(
                time.monotonic(),
                int(stats.get("memory_remaining", 0) or 0),
                int(stats.get("memory_total", 0) or 0),
            )
            if why is not None:
                if self._over.is_set():  # the client linked meanwhile: nothing to escalate
                    return
                hold = self.report.hold
                hold.escalated = why
                hold.applied = "qmp-throttle"
                self.log.note(f"the taint-free hold is running out ({why}): QMP throttle")
                await self._throttle()
                return
            if await self._pause(FLOOR_POLL_S):
                return

    async def _throttle(self) -> None:
        hold = self.report.hold
        command = {
            "execute": "migrate-set-parameters",
            "arguments": {"max-bandwidth": self.req.hold_bytes_per_s},
        }
        try:
            await self.src.qemu_monitor(self.dom, command)
            hold.hold_bytes_per_s = self.req.hold_bytes_per_s
            hold.tainted = self.report.tainted = True
        except errors.LibvirtError as exc:
            self.log.note(f"QMP throttle refused ({exc}): holding at libvirt's floor only")
            hold.applied = "libvirt-floor"

    async def _embedded_linked(
        self,
        gfx: EventStream[GraphicsEvent],
        links: DestinationLinks,
        deadline: float,
        t_active: float,
        migrations_before: int | None,
    ) -> ReleasePoint | None:
        """Our client's own answer to the source: the release point, or None (also as soon
        as it is clear that nothing of the client reaches the destination)."""
        assert self.witness is not None
        link, hold = self.report.link_wait, self.report.hold
        link.signal = "embedded-client"
        one_way = (self.req.witness_one_way_ms or 0.0) / 1000.0
        timeout = max(0.1, deadline - time.monotonic())
        answer = asyncio.ensure_future(
            await_connected(self.witness, timeout, migrations_before, link, self.log.note)
        )
        try:
            reached = await self._first_contact(gfx, links, answer, t_active, 2 * one_way)
        finally:
            if not answer.done():
                answer.cancel()
        if not reached:
            return None
        connected = await answer
        if connected is None:
            return None
        link.result = "linked"
        point = release_point(connected, one_way, self.req.embedded_margin_ms)
        link.grace_ms = round(point.grace * 1000.0, 3)
        link.duration_ms = round((connected - t_active) * 1000.0, 3)
        hold.client_rtt_estimate_ms = round(2 * one_way * 1000.0, 3)
        hold.release_reason = "embedded client answered the source (+ one-way delay + margin)"
        return point

    async def _destination_linked(
        self,
        gfx: EventStream[GraphicsEvent],
        links: DestinationLinks,
        deadline: float,
        t_active: float,
        expected: int,
    ) -> ReleasePoint | None:
        """Every channel initialized on the destination (graphics events): the release point."""
        link, hold = self.report.link_wait, self.report.hold
        link.signal = "qmp-destination"  # libvirt's relay of QEMU's SPICE events
        need = max(1, expected)
        for event in gfx.drain():
            links.absorb(event)
        contact_by = first_contact_deadline(t_active, links.rtt_estimate())
        while not links.complete(need) and not self.migration.done():
            now = time.monotonic()
            if not links.contacted() and now >= contact_by:
                self._unreachable(contact_by - t_active)
                return None
            left = (deadline if links.contacted() else min(deadline, contact_by)) - now
            if deadline - now <= 0:
                break
            # the job's end is an event too: wake on whichever comes first
            got = await _next_or_done(gfx, self.migration, max(0.0, left))
            if got is not None:
                links.absorb(got)
        link.channels_linked = sorted(links.init_at)
        if not links.complete(need):
            if not self.migration.done():
                link.result = "timeout"
            return None
        link.result = "linked"
        rtt = links.rtt_estimate() or 0.0
        last = links.last_initialize() or time.monotonic()
        point = release_point(last, rtt, self.req.release_margin_ms)
        link.grace_ms = round(point.grace * 1000.0, 3)
        link.duration_ms = round((last - t_active) * 1000.0, 3)
        hold.client_rtt_estimate_ms = round(rtt * 1000.0, 3)
        hold.release_reason = (
            f"destination initialized {len(links.init_at)}/{need} channels "
            f"(+ RTT estimate {rtt * 1000:.0f} ms + margin {self.req.release_margin_ms:.0f} ms)"
        )
        return point

    async def _first_contact(
        self,
        gfx: EventStream[GraphicsEvent],
        links: DestinationLinks,
        answer: asyncio.Future[float | None],
        t_active: float,
        rtt: float,
    ) -> bool:
        """Wait for ``answer`` while watching the destination: False as soon as the first
        contact is overdue (:func:`first_contact_deadline`) -- nothing of the client reached
        the destination, its answer would only come at its own deadline."""
        contact_by = first_contact_deadline(t_active, rtt)
        while not answer.done():
            for event in gfx.drain():
                links.absorb(event)
            if links.contacted():
                await asyncio.wait({answer})
                break
            left = contact_by - time.monotonic()
            if left <= 0:
                self._unreachable(contact_by - t_active)
                return False
            getter = asyncio.ensure_future(gfx.get(timeout=left))
            pending: set[asyncio.Future[Any]] = {getter, answer}
            try:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled() and getter.exception() is None:
                links.absorb(getter.result())
        return True

    def _unreachable(self, after_s: float) -> None:
        link = self.report.link_wait
        link.result = "unreachable"
        link.reason = f"{NO_CONTACT} within {after_s:.1f} s"
        self.log.note(f"{link.reason} (a firewall that drops it? a route that leads nowhere?)")

    async def _release(self, orig_speed: int, t_start: float, t_active: float) -> None:
        try:
            await release_hold(self.src, self.dom, orig_speed, self.report.hold.downtime_before_ms)
        except errors.LibvirtError as exc:
            if not self.migration.done():
                raise errors.MigrationError("release", f"could not release: {exc}") from exc
        hold = self.report.hold
        released = time.monotonic()
        hold.released_after_ms = round((released - t_start) * 1000.0, 3)
        hold.held_ms = round((released - t_active) * 1000.0, 3)
        plan = self.plan
        hold.floor_ms = plan.held_ms(released) if plan is not None else hold.held_ms
        if plan is not None:
            hold.samples, hold.plan_notes = plan.samples, list(plan.notes)


__all__ = [
    "FINAL_STATES",
    "POSTCOPY_STATES",
    "SWITCHOVER_STATES",
    "DestinationLinks",
    "Hold",
    "MigrationStatus",
    "release_hold",
]
