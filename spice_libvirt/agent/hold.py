"""Hold one outgoing migration that someone else started, release it, judge it.

The order matters and every step is bounded:

1. Is it ours to hold? An outgoing migration (libvirt's job says so), not marked by our own
   controller (:mod:`spice_libvirt.libvirt.claim`), with SPICE clients connected now
   (:mod:`spice_libvirt.agent.procnet`: the kernel's view of the QEMU libvirt recorded,
   :mod:`spice_libvirt.agent.trusted_qemu`, so an agent started after the client connected
   still knows every channel).
2. Write the caller's speed and downtime down (:mod:`spice_libvirt.agent.holdfile`), *then*
   hold (1 MiB/s, 1 ms) -- at QEMU's ``setup``, since libvirt sets its own parameters at the
   start of its Perform phase and would overwrite an earlier hold.
3. Find the destination (the source QEMU's migration connection) and wait there for every
   channel to initialize, following the caller's own changes meanwhile; release at the
   policy's release point, or at the bound, or at once when the destination is unknown.
4. Restore the caller's latest values, forget the record; wait for the end of the
   migration and a moment for reconnects; the verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any

from spice_libvirt import errors
from spice_libvirt.agent import holdfile, procnet
from spice_libvirt.agent.plan import (
    FINAL_STATES,
    HOLD_DOWNTIME_MS,
    HOLD_SPEED_MIBS,
    CallerValues,
    HeldMigration,
    Release,
)
from spice_libvirt.agent.record import AgentVerdict
from spice_libvirt.agent.settings import AgentSettings
from spice_libvirt.agent.trusted_qemu import expected_qemu, trusted_qemu_pid
from spice_libvirt.agent.watch import Destination, SourceChannels
from spice_libvirt.libvirt.claim import ClaimClock, read_claim
from spice_libvirt.libvirt.connection import Connection, GraphicsEvent, require_libvirt
from spice_libvirt.libvirt.errors import LibvirtOperationError, error_code
from spice_libvirt.migration.policy import NO_CONTACT

#: how long after ``setup`` the migration connection may take to show in /proc
PEER_LOOKUP_S = 1.0
#: a migration that runs longer than this after the release is judged without its end
COMPLETION_WAIT_S = 600.0


class AlreadyHeld(errors.AgentError):
    """Someone else holds this migration already."""


FindDestination = Callable[[str], Awaitable[Destination | None]]


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
        self.statuses: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
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
        #: the destination queue kept after the release, for reconnects after the switchover
        self._late: tuple[Destination, asyncio.Queue[GraphicsEvent]] | None = None

    def status(self, status: str, at: float) -> None:
        """QEMU's MIGRATION event for this domain (from the service's dispatch)."""
        self.statuses.put_nowait((status, at))

    # ------------------------------------------------------------------ step 1

    async def _eligible(self) -> list[str] | None:
        """The client channels to hold for, or None (the verdict says why not)."""
        lv = require_libvirt()
        dom = self._dom = await self.local.lookup(self.domain)
        self.uuid = self.verdict.uuid = await self.local.call(dom.UUIDString, "domain UUID")
        try:
            stats = await self.local.call(lambda: dom.jobStats(0), "job stats")
        except LibvirtOperationError as exc:
            if error_code(exc) == lv.VIR_ERR_OPERATION_UNSUPPORTED:
                return None  # libvirt: "statistics are available only on the source host"
            raise
        if stats.get("operation") != lv.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
            return None  # not libvirt's outgoing migration (a save, a dump...)
        self.verdict.job = f"outgoing migration (remaining {stats.get('memory_remaining', '?')} B)"
        claim = await self.local.call(lambda: read_claim(dom), "read the hold mark")
        holder = self.claims.holder(self.uuid or self.domain, claim, time.time())
        if holder is not None:
            self.verdict.outcome = "skipped"
            self.verdict.held_by = "controller"
            self.verdict.released_why = f"held by {holder} (spice-libvirt's own controller)"
            return None
        xml = await self.local.call(lambda: dom.XMLDesc(0), "domain XML")
        ports = spice_ports(xml)
        # libvirt's record of the process, checked: its sockets decide what the agent does
        pid = self._pid = trusted_qemu_pid(expected_qemu(self.domain, xml))
        established = procnet.spice_channels(procnet.snapshot(pid), ports) if ports else []
        channels, bare = self.sources.split(self.domain, established)
        if bare:  # a TCP connection that never linked is nobody to wait for
            self.verdict.notes.append(
                f"not waited for: {len(bare)} connection(s) to the SPICE port that never "
                f"linked a channel ({', '.join(bare[:3])})"
            )
        self.verdict.channels = len(channels)
        self.verdict.clients = sorted({c.rsplit(":", 1)[0] for c in channels})
        if not channels:
            self.verdict.outcome = "no-client"
            self.verdict.released_why = "no SPICE client connected: nothing to hold"
            return None
        return channels

    # ------------------------------------------------------------------ step 2

    async def _apply(self, channels: list[str]) -> HeldMigration:
        dom = self._dom
        speed = await self.local.call(lambda: dom.migrateGetMaxSpeed(0), "read max speed")
        downtime = await self.local.call(lambda: dom.migrateGetMaxDowntime(0), "read downtime")
        if (speed, downtime) == (HOLD_SPEED_MIBS, HOLD_DOWNTIME_MS):
            # another holder (a second agent, an older controller) got there first: holding
            # again would "restore" its hold values and leave the migration crawling
            raise AlreadyHeld("the migration already runs at the hold's speed and downtime")
        self._held_since = time.time()
        self._write_record(CallerValues(int(speed), int(downtime)))
        plan = HeldMigration(
            domain=self.domain,
            started_at=time.monotonic(),
            caller=CallerValues(int(speed), int(downtime)),
            client_channels=tuple(channels),
            hold_timeout_s=self.settings.hold_timeout_s,
            margin_ms=self.settings.margin_ms,
        )
        self.plan = plan
        await self._set(HOLD_SPEED_MIBS, HOLD_DOWNTIME_MS)
        self._applied_at = time.monotonic()
        self.verdict.hold = "taint-free"
        self.verdict.held_by = "agent"
        if self.settings.allow_taint:
            await self._qmp_throttle()
        return plan

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
            self.verdict.hold = "qmp-throttle"
            self.verdict.tainted = True
        except errors.LibvirtError as exc:
            self.verdict.notes.append(f"QMP throttle refused: {exc}")

    # ------------------------------------------------------------------ step 3

    async def _destination(self, plan: HeldMigration) -> Destination | None:
        deadline = time.monotonic() + PEER_LOOKUP_S
        peers: list[str] = []
        while not peers and time.monotonic() < deadline:
            try:
                peers = procnet.migration_peers(procnet.snapshot(self._pid))
            except errors.AgentError:
                break
            if not peers:
                await asyncio.sleep(0.05)
        if not peers:
            why = "the destination could not be found (no migration connection)"
            plan.force_release(Release("no-destination", why))
            return None
        dest = await self.find_destination(peers[0])
        if dest is None:
            why = f"the destination libvirtd at {peers[0]} is unreachable"
            plan.force_release(Release("no-destination", why))
        else:
            self.verdict.destination = dest.uri
        return dest

    async def _wait_release(self, plan: HeldMigration, dest: Destination | None) -> Release:
        queue = dest.listen(self.domain, self.setup_at - 0.5) if dest is not None else None
        next_poll = time.monotonic() + self.settings.poll_s
        try:
            while True:
                now = time.monotonic()
                when, reason = plan.release_due(now)
                if reason is not None:
                    return reason
                assert when is not None
                if now >= next_poll:
                    await self._follow_caller(plan)
                    next_poll = now + self.settings.poll_s
                timeout = max(0.0, min(when, next_poll) - time.monotonic())
                await self._next_input(plan, queue, timeout)
        finally:
            if dest is not None and queue is not None:
                self._drain_into(plan, queue)
                self._late = (dest, queue)

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
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(self.statuses.get())}
        if queue is not None:
            waiters.add(asyncio.ensure_future(queue.get()))
        done, pending = await asyncio.wait(
            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for fut in pending:
            fut.cancel()
        for fut in pending:  # a getter cancelled after it took an item: keep the item
            with contextlib.suppress(asyncio.CancelledError):
                await fut
        for fut in done | pending:
            if fut.cancelled() or fut.exception() is not None:
                continue
            item = fut.result()
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
            with contextlib.suppress(errors.LibvirtError):
                await self._set(adjust.speed_mibs, None)
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

    async def _await_end(self, plan: HeldMigration) -> None:
        deadline = time.monotonic() + COMPLETION_WAIT_S
        while plan.status not in FINAL_STATES and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # not wait_for: it can swallow a cancel
                    plan.migration_status(*await self.statuses.get())
        if self._late is None:
            return
        dest, queue = self._late
        until = plan.settle_until()
        while until is not None and time.monotonic() < until:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(until - time.monotonic()):
                    plan.destination_event(await queue.get())
        self._drain_into(plan, queue)
        dest.unlisten(self.domain, queue)  # also when the migration outlived the wait

    def _judge(self, plan: HeldMigration) -> None:
        v = self.verdict
        v.outcome = plan.verdict()
        v.link_wait_ms = plan.link_wait_ms()
        v.relinks_after = plan.relinks_after
        v.connection_id_kept = {"seamless": True, "switch-host": False, "client-lost": False}.get(
            v.outcome
        )
        if v.outcome == "client-lost":
            v.notes.append(
                f"the client could not follow: {NO_CONTACT}, before or after the switchover "
                "(its session is gone)"
            )
        v.notes.extend(plan.notes)
        early = plan.switchover_at is not None and plan.switchover_at < plan.started_at + (
            plan.hold_timeout_s
        )
        if v.outcome in ("not-linked", "switch-host") and v.hold == "taint-free" and early:
            assert plan.switchover_at is not None
            v.taint_free_failed = True
            v.notes.append(
                f"the guest switched over {(plan.switchover_at - plan.started_at) * 1000:.0f} ms "
                "into the hold, before the client linked: too little memory to move for a "
                "taint-free hold (1 MiB/s); allow_taint would hold it through QMP (taints)"
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
            dest = await self._destination(plan)
            reason = await self._wait_release(plan, dest)
            await self.release(reason)
            await self._await_end(plan)
            self._judge(plan)
        except (errors.SpiceLibvirtError, OSError) as exc:
            self.verdict.outcome = "error"
            self.verdict.notes.append(str(exc))
            if self.plan is not None and not self._restored:
                with contextlib.suppress(errors.SpiceLibvirtError):
                    await self.release(Release("error", f"error: {exc}"))
        return self.verdict
