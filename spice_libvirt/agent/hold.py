"""Hold one outgoing migration that someone else started, release it, judge it.

The order matters and every step is bounded:

1. Is it ours to hold? An outgoing migration (libvirt's job says so), not marked by our own
   controller (:mod:`spice_libvirt.libvirt.claim`), with SPICE clients connected now
   (:mod:`spice_libvirt.host.procnet`: the kernel's view of the QEMU libvirt recorded,
   :mod:`spice_libvirt.host.trusted_qemu`, so an agent started after the client connected
   still knows every channel; only connections that linked a channel count,
   :mod:`spice_libvirt.libvirt.real_clients`).
2. Write the caller's speed and downtime down (:mod:`spice_libvirt.agent.holdfile`), *then*
   hold -- at QEMU's ``setup``, since libvirt sets its own parameters at the start of its
   Perform phase and would overwrite an earlier hold: the downtime limit at 1 ms, and the
   speed as the switchover plan says (:mod:`spice_libvirt.migration.switchover`: the
   caller's, or a pace that ends the first pass when the client is expected to be linked,
   then 1 MiB/s as the end of the pass comes near; ``hold_mode = "bulk"``: 1 MiB/s at once).
   The client's RTT, which says how long it will need, comes from the kernel
   (:mod:`spice_libvirt.host.tcpinfo`).
3. Find the destination (the source QEMU's migration connection; for a tunnelled migration,
   which has none, every peer the agent watches) and wait there for every channel to
   initialize, sampling the progress and following the caller's own changes meanwhile;
   release at the policy's release point, or at the bound, at once when the destination
   is unknown, or when the caller switches to post-copy.
4. Restore the caller's latest values, forget the record; wait for the end of the
   migration and a moment for reconnects; the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from spice_libvirt import errors
from spice_libvirt.agent import holdfile
from spice_libvirt.agent.plan import CallerValues, HeldMigration, Release
from spice_libvirt.agent.record import AgentVerdict
from spice_libvirt.agent.settings import AgentSettings
from spice_libvirt.agent.watch import Destination
from spice_libvirt.host import procnet, tcpinfo
from spice_libvirt.host.trusted_qemu import expected_qemu, trusted_qemu_pid
from spice_libvirt.libvirt.claim import ClaimClock, read_claim
from spice_libvirt.libvirt.connection import Connection, GraphicsEvent, require_libvirt
from spice_libvirt.libvirt.errors import LibvirtOperationError, error_code
from spice_libvirt.libvirt.hold import FINAL_STATES
from spice_libvirt.libvirt.real_clients import SourceChannels
from spice_libvirt.migration.policy import NO_CONTACT
from spice_libvirt.migration.switchover import (
    HOLD_DOWNTIME_MS,
    HOLD_SPEED_MIBS,
    GuestMemory,
    SpeedChange,
    SwitchoverPlan,
    expected_link_s,
    progress_from_job_stats,
)

T = TypeVar("T")

#: how long after ``setup`` the migration connection may take to show in /proc
PEER_LOOKUP_S = 1.0
#: a migration that runs longer than this after the release is judged without its end
COMPLETION_WAIT_S = 600.0


class AlreadyHeld(errors.AgentError):
    """Someone else holds this migration already."""


FindDestination = Callable[[str], Awaitable[Destination | None]]
#: every destination the agent watches (for a migration whose peer cannot be seen)
KnownDestinations = Callable[[], Awaitable[list[Destination]]]


def spice_ports(domain_xml: str) -> list[int]:
    """The SPICE ports (plain and TLS) the running domain listens on."""
    ports: list[int] = []
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return ports
    for graphics in root.iter("graphics"):
        if graphics.get("type") != "spice":
            continue
        for attr in ("port", "tlsPort"):
            value = graphics.get(attr, "")
            if value.isdigit() and int(value) > 0:
                ports.append(int(value))
    return ports


async def first_items(queues: Sequence[asyncio.Queue[T]], timeout: float) -> list[tuple[int, T]]:
    """Whatever the first of ``queues`` to have an item within ``timeout`` gives, as
    ``(queue index, item)`` pairs; an item taken by a getter that was being cancelled is
    returned too, never lost."""
    getters = [asyncio.ensure_future(q.get()) for q in queues]
    try:
        await asyncio.wait(getters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the hold itself is cancelled (the agent stops): no getter left
        pending = [fut for fut in getters if not fut.done()]
        for fut in pending:
            fut.cancel()
        for fut in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await fut
    return [
        (i, fut.result())
        for i, fut in enumerate(getters)
        if not fut.cancelled() and fut.exception() is None
    ]


class MigrationHold:
    """The agent's handling of one outgoing migration of ``domain``."""

    def __init__(
        self,
        settings: AgentSettings,
        local: Connection,
        domain: str,
        setup_at: float,
        find_destination: FindDestination,
        claims: ClaimClock | None = None,
        sources: SourceChannels | None = None,
        known_destinations: KnownDestinations | None = None,
    ) -> None:
        self.settings = settings
        #: when each domain's mark was first seen (the service keeps one for all holds)
        self.claims = claims if claims is not None else ClaimClock()
        #: which connections to the SPICE ports linked a channel (the service's)
        self.sources = sources if sources is not None else SourceChannels()
        self.local = local
        self.domain = domain
        self.setup_at = setup_at
        self.find_destination = find_destination
        self.known_destinations = known_destinations
        self.statuses: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        #: this domain's graphics events on the source (the client leaving it)
        self.source_events: asyncio.Queue[GraphicsEvent] = asyncio.Queue()
        self.verdict = AgentVerdict(domain=domain, outcome="error")
        self.plan: HeldMigration | None = None
        self.uuid: str | None = None
        self._dom: Any = None
        #: the source QEMU (found once: scanning /proc is the slow part on a busy host)
        self._pid = 0
        self._restored = False
        self._held_since = 0.0
        #: when libvirt had taken the hold's speed and downtime (monotonic)
        self._applied_at = 0.0
        #: when QEMU had taken the QMP throttle (monotonic; 0: never)
        self._throttled_at = 0.0
        #: the destination queues kept after the release, for reconnects after the switchover
        self._late: list[tuple[Destination, asyncio.Queue[GraphicsEvent]]] = []
        #: the client's SPICE socket inodes (their RTT says how long it will need to link)
        self._inodes: list[int] = []
        #: the job's memory at eligibility (bytes; 0: unknown)
        self._memory = 0
        #: the caller's speed (MiB/s) and downtime (ms) as read at eligibility
        self._caller_values = (0, 0)
        #: where the source QEMU's own connections go, as read at eligibility
        self._peers: list[str] = []

    def status(self, status: str, at: float) -> None:
        """QEMU's MIGRATION event for this domain (from the service's dispatch)."""
        self.statuses.put_nowait((status, at))

    def source_event(self, event: GraphicsEvent) -> None:
        """A graphics event of this domain on the source (from the service's dispatch)."""
        self.source_events.put_nowait(event)

    # ------------------------------------------------------------------ step 1

    async def _eligible(self) -> list[str] | None:
        """The client channels to hold for, or None (the verdict says why not)."""
        lv = require_libvirt()
        dom = self._dom = await self.local.lookup(self.domain)
        # at once, not one after the other: a guest with little to move is across in
        # less than 100 ms, and every step before the hold counts
        uuid, stats, claim, xml, values = await asyncio.gather(
            self.local.call(dom.UUIDString, "domain UUID"),
            self._outgoing_stats(lv),
            self.local.call(lambda: read_claim(dom), "read the hold mark"),
            self.local.call(lambda: dom.XMLDesc(0), "domain XML"),
            asyncio.gather(
                self.local.call(lambda: dom.migrateGetMaxSpeed(0), "read max speed"),
                self.local.call(lambda: dom.migrateGetMaxDowntime(0), "read downtime"),
                return_exceptions=True,  # an incoming migration may refuse them: no matter
            ),
        )
        self.uuid = self.verdict.uuid = uuid
        if stats is None:
            return None  # libvirt: "statistics are available only on the source host"
        for value in values:
            if isinstance(value, BaseException):
                raise value
        self._caller_values = (int(values[0]), int(values[1]))
        if stats.get("operation") != lv.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
            return None  # not libvirt's outgoing migration (a save, a dump...)
        self.verdict.job = f"outgoing migration (remaining {stats.get('memory_remaining', '?')} B)"
        self._memory = int(stats.get("memory_total") or stats.get("memory_remaining") or 0)
        holder = self.claims.holder(
            self.uuid or self.domain, claim, time.time(), await self.claims.local_host(self.local)
        )
        if holder is not None:
            self.verdict.outcome = "skipped"
            self.verdict.held_by = "controller"
            self.verdict.released_why = f"held by {holder} (spice-libvirt's own controller)"
            return None
        ports = spice_ports(xml)
        # libvirt's record of the process, checked: its sockets decide what the agent does
        pid = self._pid = trusted_qemu_pid(expected_qemu(self.domain, xml))
        sockets = procnet.snapshot(pid)
        # the migration connection is often up already: no second read of the table then
        self._peers = procnet.migration_peers(sockets)
        linked, bare = self.sources.split(self.domain, procnet.spice_sockets(sockets, ports))
        if bare:  # a TCP connection that never linked is nobody to wait for
            self.verdict.notes.append(
                f"not waited for: {len(bare)} connection(s) to the SPICE port that never "
                f"linked a channel ({', '.join(s.peer for s in bare[:3])})"
            )
        channels = sorted(s.peer for s in linked)
        self._inodes = [s.inode for s in linked]
        self.verdict.channels = len(channels)
        self.verdict.clients = sorted({c.rsplit(":", 1)[0] for c in channels})
        if not channels:
            self.verdict.outcome = "no-client"
            self.verdict.released_why = "no SPICE client connected: nothing to hold"
            return None
        return channels

    async def _outgoing_stats(self, lv: Any) -> dict[str, Any] | None:
        """The job's statistics; None on the destination of a migration."""
        dom = self._dom
        try:
            stats: dict[str, Any] = await self.local.call(lambda: dom.jobStats(0), "job stats")
        except LibvirtOperationError as exc:
            if error_code(exc) == lv.VIR_ERR_OPERATION_UNSUPPORTED:
                return None
            raise
        return stats

    # ------------------------------------------------------------------ step 2

    async def _apply(self, channels: list[str]) -> HeldMigration:
        speed, downtime = self._caller_values
        if (speed, downtime) == (HOLD_SPEED_MIBS, HOLD_DOWNTIME_MS):
            # another holder (a second agent, an older controller) got there first: holding
            # again would "restore" its hold values and leave the migration crawling
            raise AlreadyHeld("the migration already runs at the hold's speed and downtime")
        self._held_since = time.time()
        self._write_record(CallerValues(int(speed), int(downtime)))
        started = time.monotonic()
        # held at once (a guest with little data is across in a fraction of a second); the
        # plan below lifts the speed a moment later if the bulk may run meanwhile
        await self._set(HOLD_SPEED_MIBS, HOLD_DOWNTIME_MS)
        self._applied_at = time.monotonic()
        self.verdict.reacted_ms = round((self._applied_at - self.setup_at) * 1000.0, 1)
        plan = HeldMigration(
            domain=self.domain,
            started_at=started,
            caller=CallerValues(int(speed), int(downtime)),
            client_channels=tuple(channels),
            hold_timeout_s=self.settings.hold_timeout_s,
            margin_ms=self.settings.margin_ms,
            switchover=await self._speed_plan(int(speed)),
        )
        self.plan = plan
        assert plan.switchover is not None
        memory, total = await self._guest_memory()
        # how long this host took to answer QEMU's setup is how late its looks will come
        plan.switchover.lag = max(0.0, self._applied_at - self.setup_at)
        change = plan.switchover.start(started, memory, total)
        self.verdict.hold = "taint-free"
        self.verdict.held_by = "agent"
        self.verdict.hold_mode = plan.switchover.mode
        if change is None:
            await self._set(int(speed), None)  # the bulk at the caller's own speed
        elif change.speed_mibs != HOLD_SPEED_MIBS:
            await self._set(change.speed_mibs, None)
        else:
            await self._hold_proper()
        return plan

    async def _speed_plan(self, caller_speed: int) -> SwitchoverPlan:
        """The switchover plan, with the link time the client's RTT implies."""
        rtts = await asyncio.to_thread(tcpinfo.socket_rtts, self._inodes)
        rtt = sorted(rtts.values())[len(rtts) // 2] if rtts else None
        self.verdict.client_rtt_ms = round(rtt * 1000.0, 1) if rtt is not None else None
        return SwitchoverPlan(
            mode=self.settings.hold_mode,
            caller_speed_mibs=caller_speed,
            link_s=expected_link_s(rtt, self.settings.assumed_link_s),
            guard_s=self.settings.switchover_guard_s,
        )

    async def _guest_memory(self) -> tuple[GuestMemory, int]:
        """What the first pass has to move: the guest RAM's non-zero part (resident in the
        source QEMU) and the device memory scanned after it; and the job's total."""
        dom = self._dom
        try:
            ram = int(await self.local.call(dom.maxMemory, "domain memory")) * 1024
        except errors.LibvirtError:
            ram = 0
        data = await asyncio.to_thread(procnet.guest_ram_resident, self._pid, ram) if ram else None
        if data is not None:
            self.verdict.notes.append(f"guest RAM resident: {data >> 20} of {ram >> 20} MiB")
        return GuestMemory.of(data, ram, self._memory)

    async def _hold_proper(self) -> None:
        """The speed is at the hold's now; with ``allow_taint`` QEMU's own throttle too."""
        if self.settings.allow_taint and not self.verdict.tainted:
            await self._qmp_throttle()

    async def _set(self, speed: int | None, downtime: int | None) -> None:
        dom = self._dom
        if speed is not None:
            await self.local.call(lambda: dom.migrateSetMaxSpeed(speed, 0), "set max speed")
        if downtime is not None:
            await self.local.call(lambda: dom.migrateSetMaxDowntime(downtime, 0), "set downtime")

    async def _qmp_throttle(self) -> None:
        """QEMU's max-bandwidth at 4 KiB/s, which holds any guest, near-empty ones too;
        only where the host allows tainting the domain (``allow_taint``)."""
        command = {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 4096}}
        try:
            await self.local.qemu_monitor(self._dom, command)
            self._throttled_at = time.monotonic()
            self.verdict.hold = "qmp-throttle"
            self.verdict.tainted = True
        except errors.LibvirtError as exc:
            self.verdict.notes.append(f"QMP throttle refused: {exc}")

    # ------------------------------------------------------------------ step 3

    async def _destinations(self, plan: HeldMigration) -> list[Destination]:
        """Where the client links: the destination of the QEMU's migration connection;
        without one (a tunnelled migration goes through libvirtd), every watched peer --
        only the real destination sees this domain's client link."""
        deadline = time.monotonic() + PEER_LOOKUP_S
        peers: list[str] = self._peers
        while not peers and time.monotonic() < deadline:
            try:
                peers = procnet.migration_peers(procnet.snapshot(self._pid))
            except errors.AgentError:
                break
            if not peers:  # each read of the kernel's table costs: not too often
                await asyncio.sleep(0.1)
        if not peers:
            known = await self.known_destinations() if self.known_destinations else []
            if not known:
                why = "the destination could not be found (no migration connection)"
                plan.force_release(Release("no-destination", why))
                return []
            plan.notes.append(
                "no migration connection of QEMU's own (tunnelled through libvirtd?): "
                f"watching the {len(known)} known destination(s) for the client"
            )
            self.verdict.destination = ", ".join(d.uri for d in known)
            return known
        dest = await self.find_destination(peers[0])
        if dest is None:
            why = f"the destination libvirtd at {peers[0]} is unreachable"
            plan.force_release(Release("no-destination", why))
            return []
        self.verdict.destination = dest.uri
        return [dest]

    async def _wait_release(self, plan: HeldMigration, dests: list[Destination]) -> Release:
        queue: asyncio.Queue[GraphicsEvent] | None = None
        if dests:
            queue = asyncio.Queue()
            for dest in dests:
                self._late.append((dest, dest.listen(self.domain, self.setup_at - 0.5, queue)))
        next_poll = time.monotonic() + self.settings.poll_s
        speed_plan = plan.switchover
        next_sample = (
            speed_plan.first_sample_at() if speed_plan and not speed_plan.holding else None
        )
        try:
            while True:
                now = time.monotonic()
                when, reason = plan.release_due(now)
                if reason is not None:
                    return reason
                assert when is not None
                if next_sample is not None and now >= next_sample:
                    next_sample = await self._sample(plan, now - next_sample)
                if now >= next_poll:
                    await self._follow_caller(plan)
                    next_poll = now + self.settings.poll_s
                wake = min(when, next_poll, next_sample or when)
                await self._next_input(plan, queue, max(0.0, wake - time.monotonic()))
        finally:
            if queue is not None:
                self._drain_into(plan, queue)

    async def _sample(self, plan: HeldMigration, late: float) -> float | None:
        """One look at the progress; the speed the plan asks for; when to look again.
        ``late``: how far past its time the look began (a busy host's delay)."""
        dom = self._dom
        asked = time.monotonic()
        try:
            stats = await self.local.call(lambda: dom.jobStats(0), "job stats")
        except errors.LibvirtError:
            return time.monotonic() + self.settings.poll_s  # the job may be ending
        now = time.monotonic()
        sample = progress_from_job_stats(stats, now, max(0.0, late) + (now - asked))
        change, next_at = plan.progress(sample)
        if change is not None:
            await self._apply_change(change)
        return next_at

    async def _apply_change(self, change: SpeedChange) -> None:
        with contextlib.suppress(errors.LibvirtError):  # the job may be over: the end decides
            await self._set(change.speed_mibs, None)
            if change.speed_mibs == HOLD_SPEED_MIBS:
                await self._hold_proper()

    def _drain_into(self, plan: HeldMigration, queue: asyncio.Queue[GraphicsEvent]) -> None:
        while not queue.empty():
            plan.destination_event(queue.get_nowait())

    async def _next_input(
        self,
        plan: HeldMigration,
        queue: asyncio.Queue[GraphicsEvent] | None,
        timeout: float,
    ) -> None:
        """Whichever comes first within ``timeout``: a destination event or a status."""
        queues: list[asyncio.Queue[Any]] = [self.statuses]
        if queue is not None:
            queues.append(queue)
        for _, item in await first_items(queues, timeout):
            if isinstance(item, GraphicsEvent):
                plan.destination_event(item)
            else:
                plan.migration_status(*item)

    async def _follow_caller(self, plan: HeldMigration) -> None:
        dom = self._dom
        try:
            speed = await self.local.call(lambda: dom.migrateGetMaxSpeed(0), "read max speed")
            downtime = await self.local.call(lambda: dom.migrateGetMaxDowntime(0), "downtime")
        except errors.LibvirtError:
            return  # the job may be ending; the release decides
        before = (plan.caller.speed_mibs, plan.caller.downtime_ms)
        adjust = plan.observe_values(int(speed), int(downtime))
        if adjust.speed_mibs is not None:
            await self._apply_change(SpeedChange(adjust.speed_mibs, "the caller's change"))
        if (plan.caller.speed_mibs, plan.caller.downtime_ms) != before:
            self._write_record(plan.caller)

    def _write_record(self, caller: CallerValues) -> None:
        """What must be restored if this agent dies: the caller's values as known now."""
        assert self.uuid is not None
        record = holdfile.HoldRecord(
            domain=self.domain,
            uuid=self.uuid,
            speed_mibs=caller.speed_mibs,
            downtime_ms=caller.downtime_ms,
            held_since=self._held_since,
            agent_pid=os.getpid(),
        )
        holdfile.write(self.settings.state_dir, record)

    # ------------------------------------------------------------------ step 4

    async def release(self, reason: Release) -> None:
        """Put the caller's latest values back (idempotent); the record goes only then."""
        plan = self.plan
        if plan is None or self._restored:
            return
        speed, downtime = plan.caller.speed_mibs, plan.caller.downtime_ms
        try:
            await self._set(speed, downtime)
        except errors.LibvirtError as exc:
            if plan.status not in FINAL_STATES:
                # the record stays: the service restores it when libvirtd answers again
                self.verdict.notes.append(f"release failed ({exc}): left to recovery")
                self._released(plan, reason)
                raise
            # the job is over: libvirt keeps nothing of ours on a finished migration
        self._restored = True
        self._released(plan, reason)
        self.verdict.caller_restored = {"speed_mibs": speed, "downtime_ms": downtime}
        if self.uuid:
            holdfile.remove(self.settings.state_dir, self.uuid)

    def _released(self, plan: HeldMigration, reason: Release) -> None:
        plan.released(time.monotonic(), reason)
        self.verdict.release = reason.kind
        self.verdict.released_why = reason.why
        self.verdict.held_ms = plan.held_ms()

    async def _note_auto_converge(self, plan: HeldMigration) -> None:
        """A caller's auto-converge slows the guest's vCPUs while a migration does not
        converge -- as a held one does not: say how far it had gone at the release."""
        if plan.status in FINAL_STATES:
            return
        dom = self._dom
        with contextlib.suppress(errors.LibvirtError):
            stats = await self.local.call(lambda: dom.jobStats(0), "job stats")
            throttle = int(stats.get("auto_converge_throttle") or 0)
            if throttle > 0:
                self.verdict.notes.append(
                    f"auto-converge (the caller's) had throttled the guest's vCPUs by "
                    f"{throttle} % when the hold was released"
                )

    async def _await_end(self, plan: HeldMigration) -> None:
        deadline = time.monotonic() + COMPLETION_WAIT_S
        while plan.status not in FINAL_STATES and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # not wait_for: it can swallow a cancel
                    plan.migration_status(*await self.statuses.get())
        plan.watched = bool(self._late)
        queue = self._late[0][1] if self._late else None
        try:
            await self._await_evidence(plan, queue)
        finally:
            for dest, listened in self._late:  # also when the migration outlived the wait
                dest.unlisten(self.domain, listened)

    async def _await_evidence(
        self, plan: HeldMigration, queue: asyncio.Queue[GraphicsEvent] | None
    ) -> None:
        """Both hosts' graphics events into the plan until its rule finds them conclusive
        (:meth:`HeldMigration.judge_due`: bounded)."""
        queues: list[asyncio.Queue[GraphicsEvent]] = [self.source_events]
        if queue is not None:
            queues.append(queue)
        while True:
            for i, source in enumerate(queues):
                while not source.empty():
                    self._evidence(plan, i, source.get_nowait())
            decision = plan.judge_due(time.monotonic())
            if decision.done or decision.recheck_at is None:
                plan.verdict_basis = decision.reason
                return
            timeout = max(0.0, decision.recheck_at - time.monotonic())
            for i, event in await first_items(queues, timeout):
                self._evidence(plan, i, event)

    @staticmethod
    def _evidence(plan: HeldMigration, i: int, event: GraphicsEvent) -> None:
        """Queue 0 is the source's events, any other a destination's."""
        if i == 0:
            plan.source_event(event)
        else:
            plan.destination_event(event)

    def _judge(self, plan: HeldMigration) -> None:
        v = self.verdict
        now = time.monotonic()
        v.outcome = plan.verdict(now)
        v.verdict_basis = plan.verdict_basis
        v.link_wait_ms = plan.link_wait_ms()
        v.held_ms = plan.held_ms()
        v.throttled_ms = plan.throttled_ms()
        v.samples = plan.switchover.samples if plan.switchover is not None else 0
        v.relinks_after = plan.relinks_after(now)
        v.connection_id_kept = {"seamless": True, "switch-host": False, "client-lost": False}.get(
            v.outcome
        )
        if v.outcome == "client-lost":
            v.notes.append(
                f"the client could not follow: {NO_CONTACT}, before or after the switchover "
                "(its session is gone)"
            )
        v.notes.extend(plan.notes)
        if plan.switchover is not None:
            v.notes.extend(plan.switchover.notes)
        early = plan.switchover_at is not None and plan.switchover_at < plan.started_at + (
            plan.hold_timeout_s
        )
        if plan.postcopy_at is not None:
            after = (plan.postcopy_at - plan.started_at) * 1000.0
            v.notes.append(
                f"the caller switched to post-copy {after:.0f} ms into the hold: the guest "
                "moved then, and the client had "
                + ("linked before" if plan.linked_before_end else "not linked yet")
            )
        elif v.outcome == "switch-host" and plan.linked_before_end:
            v.notes.append(
                "every channel was initialized on the destination before QEMU completed, "
                "yet the client was reset: its answer (MIGRATE_CONNECTED_SEAMLESS) reached "
                "the source after QEMU had completed"
            )
        elif v.outcome in ("not-linked", "switch-host") and early:
            assert plan.switchover_at is not None
            if v.hold == "taint-free":
                v.taint_free_failed = True
                v.notes.append(
                    f"the guest switched over "
                    f"{(plan.switchover_at - plan.started_at) * 1000:.0f} ms into the hold, "
                    "before the client linked: too little memory to move for a taint-free "
                    "hold (1 MiB/s); allow_taint would hold it through QMP (taints)"
                )
            elif self._throttled_at:
                late = plan.switchover_at < self._throttled_at
                v.notes.append(
                    f"the guest switched over {(plan.switchover_at - self.setup_at) * 1000:.0f} "
                    "ms after QEMU's setup, before the client linked; QEMU's throttle was in "
                    f"place {(self._throttled_at - self.setup_at) * 1000:.0f} ms after it, "
                    + (
                        "after the switchover"
                        if late
                        else "too late to stop the first pass (the guest's memory had moved)"
                    )
                    + ": a near-empty guest migrated at full speed is across in about 0.1 s"
                )
            if plan.switchover_at < self._applied_at:
                # a near-empty guest, or one that moves faster than the agent answered
                # (an unlimited migration of an idle guest): the verdict cannot tell which
                v.notes.append(
                    "the hold was in place only "
                    f"{(self._applied_at - self.setup_at) * 1000:.0f} ms after QEMU's setup, "
                    "after the switchover"
                )

    async def run(self) -> AgentVerdict:
        """The whole handling; never raises for the migration's own sake (the verdict says)."""
        try:
            channels = await self._eligible()
            if channels is None:
                if self.verdict.outcome == "error":
                    self.verdict.outcome = "skipped"
                return self.verdict
            try:
                plan = await self._apply(channels)
            except AlreadyHeld as exc:
                self.verdict.outcome = "skipped"
                self.verdict.released_why = str(exc)
                return self.verdict
            dests = await self._destinations(plan)
            reason = await self._wait_release(plan, dests)
            await self.release(reason)
            await self._note_auto_converge(plan)
            await self._await_end(plan)
            self._judge(plan)
        except (errors.SpiceLibvirtError, OSError) as exc:
            self.verdict.outcome = "error"
            self.verdict.notes.append(str(exc))
            if self.plan is not None and not self._restored:
                with contextlib.suppress(errors.SpiceLibvirtError):
                    await self.release(Release("error", f"error: {exc}"))
        return self.verdict
