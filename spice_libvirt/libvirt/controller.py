"""Seamless SPICE migration through libvirt: the flow, and only the flow.

libvirt sends ``client_migrate_info`` itself at the start of its Perform phase and then
migrates at once; an idle guest is across in 30-90 ms while a client needs about six round
trips to link every channel to the destination, so at any client RTT above ~10 ms the
client misses the window and spice-server falls back to SWITCH_HOST (``rtt-seamless.md``).
This controller keeps libvirt in charge of the migration (``migrateToURI3``, peer to peer,
with the graphics URI) and only moves the *moment of switchover*; each step lives in its
own module, as on the QEMU path::

    preflight (.preflight; the TLS check) -> the client(s) on the source (.census)
      -> hold choice (migration.policy) -> migrateToURI3 at libvirt's floor
      -> hold until the client linked, release (.hold) -> completion
      -> the destination's evidence -> verdict (migration.verdict)

Taint-free by default: libvirt's public API and event APIs only. The clients are counted
from the source QEMU's sockets (or are our embedded client), the hold is libvirt's speed
and downtime floors, and the verdict follows each client by its address through libvirt's
graphics events. Only with ``allow_taint`` does the monitor passthrough come in --
``query-spice`` for the clients and the verdict, and QEMU's max-bandwidth for a guest the
taint-free hold cannot keep -- and libvirt then marks the domain tainted
(``custom-monitor``); the report says so. Nothing is left behind (.undo): on an error, a
timeout or a cancellation (Ctrl-C, SIGTERM) the held job is aborted -- or released to
complete when libvirt refuses -- QEMU's max-bandwidth is checked and put back, and both
libvirtds are asked where the domain runs (``placement``, exit code 12 when that is not
exactly one host); each step shielded from a second cancellation and bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from spice_libvirt import errors
from spice_libvirt.host import procnet
from spice_libvirt.libvirt import migration_tls
from spice_libvirt.libvirt.census import (
    Census,
    KernelCensus,
    follow_client,
    take_census,
)
from spice_libvirt.libvirt.claim import claim_for_controller, unclaim
from spice_libvirt.libvirt.connection import (
    Connection,
    EventStream,
    GraphicsEvent,
    JobCompletedEvent,
    require_libvirt,
)
from spice_libvirt.libvirt.errors import message_of
from spice_libvirt.libvirt.hold import DestinationLinks, Hold, MigrationStatus
from spice_libvirt.libvirt.preflight import (
    check_ticket,
    check_tls,
    preflight,
    spice_graphics,
)
from spice_libvirt.libvirt.request import (
    LIBVIRT_MAX_SPEED_MIBS,
    HoldDetails,
    LibvirtMigrationReport,
    LibvirtMigrationRequest,
)
from spice_libvirt.libvirt.settle import SettleInputs, SourceDepartures, await_settled
from spice_libvirt.libvirt.stats import figures_from_stats, progress_from_stats
from spice_libvirt.libvirt.undo import JobUndo, settle_placement
from spice_libvirt.migration.base import ControllerBase
from spice_libvirt.migration.evidence import (
    Sessions,
    SpiceSession,
    parse_channel_name,
    sessions_from_query_spice,
)
from spice_libvirt.migration.placement import run_to_completion
from spice_libvirt.migration.policy import HoldPolicy, choose_hold
from spice_libvirt.migration.report import Endpoint
from spice_libvirt.migration.switchover import HOLD_SPEED_MIBS, SwitchoverPlan, expected_link_s
from spice_libvirt.migration.verdict import LinkedClient, VerdictEvidence, judge
from spice_libvirt.spice.record import ClientMigrationRecord

log = logging.getLogger(__name__)

#: the whole undo (abort, job end, bandwidth, both ends settled) is bounded by this
UNDO_TIMEOUT = 120.0


class LibvirtMigrationController(ControllerBase[LibvirtMigrationRequest, LibvirtMigrationReport]):
    """Runs one migration; :func:`migrate_libvirt` is the public entry."""

    async def run(self) -> LibvirtMigrationReport:
        req = self.req
        self._lv = require_libvirt()
        src = await Connection.open(
            req.source_uri, timeout=req.connect_timeout, call_timeout=req.call_timeout
        )
        try:
            dst = await Connection.open(
                req.dst_connect, timeout=req.connect_timeout, call_timeout=req.call_timeout
            )
            try:
                return await self._run(src, dst)
            finally:
                await dst.close()
        finally:
            await src.close()

    def _new_report(self) -> LibvirtMigrationReport:
        req = self.req
        return LibvirtMigrationReport(
            outcome="failed",
            started_at=dt.datetime.now(dt.UTC),
            source=Endpoint(qmp=f"{req.source_uri} (libvirt)"),
            destination=Endpoint(qmp=f"{req.dst_connect} (libvirt)"),
            migrate_uri=req.destination_uri,
            client_target=req.graphics_uri or "libvirt migration cookie",
            require_seamless=req.require_seamless,
            domain=req.domain,
            method="libvirt-plain" if req.plain else "libvirt-seamless",
            hold=HoldDetails(policy="none" if req.plain else req.hold),
        )

    async def _run(self, src: Connection, dst: Connection) -> LibvirtMigrationReport:
        req = self.req
        report = self._new_report()
        dom, xml = await preflight(src, dst, req, report, self.log)
        migrations_before = self.witness.migration_count if self.witness is not None else None
        census = self._census = await take_census(
            src,
            dom,
            report.domain,
            xml,
            allow_taint=req.allow_taint and not req.plain,
            witness=self.witness,
            note=self.note,
        )
        clients = census.sessions
        report.hold.census = census.how
        counted = census.kernel if census.how != "query-spice" else None
        counted_tls = sum(c.tls_channels for c in counted.clients) if counted else None
        graphics_uri = check_tls(req, clients, xml, self.note, counted_tls)
        # last among the checks: extending the ticket (when asked) is a change, and a refusal
        # above must leave nothing changed
        await check_ticket(src, dom, xml, req, self.note)
        report.client_target = graphics_uri or report.client_target
        report.tainted = report.hold.tainted = census.tainted
        witness_cid = self.witness.session_id if self.witness is not None else None
        expected = self._expected(census, witness_cid)
        report.hold.expected_channels = expected or None
        has_client = census.has_client or self.witness is not None
        choice = choose_hold(
            plain=req.plain, has_client=has_client, policy=req.hold, passthrough=census.tainted
        )
        report.hold.applied, report.hold.reason = choice.applied, choice.reason
        link = report.link_wait
        link.timeout_s = req.hold_timeout
        watched = clients.get(witness_cid or -1) or next(iter(clients.values()), None)
        link.channels_expected = watched.names if watched is not None else []
        if not has_client:
            link.result = "no-client"
        gfx = await dst.graphics_events(None)
        src_gfx = await src.graphics_events(dom)
        jobs = await src.job_completed_events(dom)
        self._status = MigrationStatus(await src.migration_events(dom), report.domain)
        counted_hosts = (
            frozenset(c.address for c in census.kernel.clients)
            if census.how == "kernel" and census.kernel is not None
            else None
        )
        self._links = DestinationLinks(report.domain, time.monotonic(), counted_hosts)
        source_channels = sum(len(s.channels) for s in clients.values())
        if census.how == "kernel" and census.kernel is not None:
            source_channels = census.kernel.channels
        self._departures = SourceDepartures(report.domain, source_channels)
        self._returned_at: float | None = None
        self._dst_tls_port: int | None = None
        try:
            completed = await self._migrate(
                src, dom, report, gfx, graphics_uri, expected, migrations_before, choice.escalate
            )
            if completed:
                await self._figures(dst, jobs, report)
            else:
                await run_to_completion(self._placement(report), UNDO_TIMEOUT, "placement")
                if report.placement == "destination":
                    # the call failed (a libvirtd restarted, a connection dropped) but the
                    # job went through: say so, and judge the client where the VM runs
                    self.note("migrateToURI3 failed, yet the domain runs on the destination")
                    report.migration.status = "completed"
                    report.outcome = "failed"
                    completed = True
            await self._verdict(
                src, dst, dom, (gfx, src_gfx), report, clients, completed, witness_cid
            )
        finally:
            gfx.close()
            src_gfx.close()
            jobs.close()
            self._status.events.close()
            await unclaim(src, dst, report.domain)
        return report

    @staticmethod
    def _expected(census: Census, witness_cid: int | None) -> int:
        """How many channels must initialize on the destination before the release: our
        client's when attached, else every channel the kernel counted, else the largest
        session's (query-spice)."""
        if witness_cid is not None and witness_cid in census.sessions:
            return len(census.sessions[witness_cid].channels)
        if census.how == "kernel" and census.kernel is not None:
            return census.kernel.channels
        return max((len(s.channels) for s in census.sessions.values()), default=0)

    async def _migrate(
        self,
        src: Connection,
        dom: Any,
        report: LibvirtMigrationReport,
        gfx: EventStream[GraphicsEvent],
        graphics_uri: str | None,
        expected: int,
        migrations_before: int | None,
        escalate: bool,
    ) -> bool:
        """migrateToURI3 with the hold; True if the migration completed."""
        req = self.req
        orig_speed, params, flags = await self._job_parameters(
            src, dom, report, graphics_uri, escalate
        )
        if not req.plain:  # a held migration: a host agent leaves it to us (a plain one it holds)
            await claim_for_controller(src, dom, self.note)
        t_start = time.monotonic()
        links = self._links
        links.t0 = t_start
        migration = asyncio.create_task(
            src.call(
                lambda: dom.migrateToURI3(req.destination_uri, params, flags),
                "migrateToURI3",
                timeout=req.completion_timeout + 60.0,
            )
        )
        progress = asyncio.create_task(self._progress_loop(src, dom, migration))
        undo = JobUndo(
            src,
            dom,
            migration,
            orig_speed,
            report.hold.downtime_before_ms,
            report.hold.qemu_bandwidth_before,
            self.note,
        )
        error: BaseException | None = None
        cancelled = False
        try:
            if report.hold.applied != "none":
                hold = Hold(
                    src,
                    dom,
                    migration,
                    req,
                    report,
                    self.log,
                    self.witness,
                    self._status,
                    escalate,
                )
                await self._plan_hold(src, dom, hold, orig_speed)
                linked = await hold.run(
                    gfx, links, t_start, orig_speed, expected, migrations_before
                )
                if not linked and req.require_seamless and not migration.done():
                    self.note("--require-seamless: the client did not link; aborting the job")
                    await self._abort(src, dom)
                    cancelled = True
            elif report.link_wait.result != "no-client" and not req.plain and self.witness:
                report.link_wait.signal = "embedded-client"
            cancelled = await self._await_job(src, dom, migration) or cancelled
            self._returned_at = time.monotonic()
        except errors.SpiceLibvirtError as exc:
            error = exc
        except BaseException as exc:
            # cancelled (Ctrl-C, SIGTERM, an outer timeout) or a bug: undo, then unwind
            await run_to_completion(self._interrupted(undo, report, exc), UNDO_TIMEOUT, "undo")
            raise
        finally:
            progress.cancel()
            with contextlib.suppress(BaseException):
                await progress
        went_through = (
            error is None
            and migration.done()
            and not migration.cancelled()
            and migration.exception() is None
        )
        # a job that went through left no QEMU on the source whose bandwidth to check
        throttled = report.hold.qemu_bandwidth_before is not None
        if not migration.done() or (throttled and not went_through):
            report.hold.bandwidth_restored = await run_to_completion(
                undo.run(), UNDO_TIMEOUT, "undo"
            )
        report.wall_ms = round((time.monotonic() - t_start) * 1000.0, 3)
        for event in gfx.drain():
            links.absorb(event)
        self._status.drain()
        return self._job_outcome(report, migration, error, cancelled, t_start)

    async def _plan_hold(self, src: Connection, dom: Any, hold: Hold, orig_speed: int) -> None:
        """The switchover plan of a hold at libvirt's floor (``hold_mode = "switchover"``):
        how long the client will take to link (its RTT: our client's own, else the
        kernel's for the source's sockets) and how much non-zero memory the first pass
        moves (the source QEMU's resident guest RAM). Where that cannot be read (the source
        QEMU's sockets were not, so neither is its memory) the floor stays from the start:
        zero pages cross at memory speed whatever the limit, so a near-empty guest would be
        over before the first sample could tell."""
        report, req = hold.report, self.req
        report.hold.mode = "bulk"
        if report.hold.applied != "libvirt-floor" or req.hold_mode != "switchover":
            return
        kernel = self._census.kernel
        with contextlib.suppress(errors.LibvirtError):
            hold.ram_bytes = int(await src.call(dom.maxMemory, "domain memory")) * 1024
        if kernel is not None and hold.ram_bytes:
            hold.resident_bytes = await asyncio.to_thread(
                procnet.guest_ram_resident, kernel.pid, hold.ram_bytes
            )
        if kernel is None or hold.resident_bytes is None:
            self.note(
                "the source QEMU's memory cannot be read from here: libvirt's speed floor "
                "holds from the start (bulk), not only the switchover"
            )
            return
        if self.witness is not None and req.witness_one_way_ms is not None:
            rtt: float | None = 2 * req.witness_one_way_ms / 1000.0
        else:
            rtt = kernel.rtt_s
        caller = orig_speed if orig_speed > HOLD_SPEED_MIBS else LIBVIRT_MAX_SPEED_MIBS
        hold.plan = SwitchoverPlan(
            mode="switchover",
            caller_speed_mibs=caller,
            link_s=expected_link_s(rtt, req.assumed_link_s),
            guard_s=req.switchover_guard_s,
        )
        report.hold.mode = "switchover"

    async def _job_parameters(
        self,
        src: Connection,
        dom: Any,
        report: LibvirtMigrationReport,
        graphics_uri: str | None,
        escalate: bool,
    ) -> tuple[int, dict[str, Any], int]:
        """What the job is started with: the caller's speed (restored after the hold), the
        migration parameters and flags; the downtime limit (the hold's to restore) and,
        when the QMP throttle may come in, QEMU's own bandwidth into the report; whether the
        guest's memory moves over TLS, and why, too."""
        lv = self._lv
        orig_speed = await src.call(dom.migrateGetMaxSpeed, "migration max speed")
        report.hold.bandwidth_before_mibs = orig_speed
        with contextlib.suppress(errors.LibvirtError):  # the limit the downtime is judged by
            limit = await src.call(lambda: dom.migrateGetMaxDowntime(0), "max downtime")
            report.migration.downtime_limit_ms = int(limit)
        if report.hold.applied != "none":
            report.hold.downtime_before_ms = report.migration.downtime_limit_ms
        if report.hold.applied == "qmp-throttle" or escalate:
            # what the undo puts back if the throttle outlives the job (allowed: taints)
            report.hold.qemu_bandwidth_before = await self._qemu_bandwidth(src, dom)
        params: dict[str, Any] = {}
        if graphics_uri:
            params[lv.VIR_MIGRATE_PARAM_GRAPHICS_URI] = graphics_uri
        if report.hold.applied != "none":
            params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = 1
        flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER
        report.migration_tls, why = migration_tls.decide(self.req.migrate_tls, self.req.source_uri)
        self.note(why)
        if report.migration_tls:
            flags |= lv.VIR_MIGRATE_TLS
        return orig_speed, params, flags

    def _job_outcome(
        self,
        report: LibvirtMigrationReport,
        migration: asyncio.Task[Any],
        error: BaseException | None,
        cancelled: bool,
        t_start: float,
    ) -> bool:
        """The job's end into the report (status, error, what the destination saw); True
        if it completed."""
        if error is None and migration.done() and not migration.cancelled():
            error = migration.exception()
        completed = error is None and migration.done() and not migration.cancelled()
        self.log.record("migrate", t_start, ok=completed, detail=f"{report.wall_ms:.0f} ms")
        report.migration.status = (
            "completed" if completed else ("cancelled" if cancelled else "failed")
        )
        if report.hold.applied == "qmp-throttle":
            report.migration.max_bandwidth = self.req.hold_bytes_per_s
        if not completed:
            report.error = message_of(error.__cause__ or error) if error else "cancelled"
            report.error_phase = "migrate"
            if report.migration_tls and "TLS" in report.error.upper():
                report.error += (
                    " (migration TLS: set it up on both hosts -- doctor reports it -- or "
                    "choose --no-migrate-tls)"
                )
            if report.link_wait.reason:
                report.error = f"{report.link_wait.reason}; {report.error}"
        report.hold.destination_events = self._links.log
        report.hold.destination_channels_initialized = len(self._links.init_at)
        return completed

    async def _await_job(self, src: Connection, dom: Any, migration: asyncio.Task[Any]) -> bool:
        """The job's end, bounded by ``completion_timeout``; True if it had to be aborted."""
        try:
            async with asyncio.timeout(self.req.completion_timeout):
                await asyncio.shield(migration)
        except TimeoutError:
            self.note(f"no completion in {self.req.completion_timeout:.0f} s: aborting the job")
            await self._abort(src, dom)
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(60.0):
                    await migration
            if not migration.done():
                migration.cancel()
            return True
        return False

    async def _qemu_bandwidth(self, src: Connection, dom: Any) -> int | None:
        """QEMU's max-bandwidth now (B/s), what the undo puts back; None if unreadable."""
        try:
            reply = await src.qemu_monitor(dom, {"execute": "query-migrate-parameters"})
        except errors.LibvirtError:
            return None
        value = (reply.get("return") or {}).get("max-bandwidth")
        return int(value) if value is not None else None

    async def _interrupted(
        self, undo: JobUndo, report: LibvirtMigrationReport, exc: BaseException
    ) -> None:
        """The job undone and the domain placed before a cancellation unwinds; one line on
        stderr says where it runs, since no report will be printed."""
        what = "interrupted" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
        self.note(f"{what} during the migration: undoing it")
        report.hold.bandwidth_restored = await undo.run()
        await self._placement(report)
        log.warning(
            "spice-libvirt: %s: migration of %s undone (job ended, bandwidth %s); "
            "the domain runs on: %s (%s)",
            what,
            report.domain,
            {True: "as before", False: "NOT restored", None: "not checked"}[
                report.hold.bandwidth_restored
            ],
            report.placement,
            report.placement_evidence,
        )

    async def _placement(self, report: LibvirtMigrationReport) -> None:
        """Ask both libvirtds where the domain runs (fresh connections, bounded)."""
        verdict, src_state, _dst_state = await settle_placement(
            self.req.source_uri,
            self.req.dst_connect,
            report.domain,
            was_running=True,
            note=self.note,
        )
        report.placement, report.placement_evidence = verdict.placement, verdict.reason
        report.source_resumed = src_state == "running"
        report.source.status_after = src_state
        self.note(f"placement: {verdict.placement} ({verdict.reason})")

    async def _abort(self, src: Connection, dom: Any) -> None:
        with contextlib.suppress(errors.LibvirtError):
            await src.call(dom.abortJob, "abort the migration job")

    async def _progress_loop(self, src: Connection, dom: Any, migration: asyncio.Task[Any]) -> None:
        """A progress sample every half second (libvirt has no progress event)."""
        while not migration.done():
            with contextlib.suppress(errors.LibvirtError):
                stats = await src.call(dom.jobStats, "job stats", timeout=5.0)
                if stats.get("type", 0) not in (0, None):
                    self.reporter.update(progress_from_stats(stats))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await asyncio.shield(migration)

    async def _figures(
        self, dst: Connection, jobs: EventStream[JobCompletedEvent], report: LibvirtMigrationReport
    ) -> None:
        stats: dict[str, Any] | None = None
        with contextlib.suppress(TimeoutError):
            stats = (await jobs.get(timeout=2.0)).stats
        if stats is None:
            with contextlib.suppress(errors.LibvirtError):
                dom = await dst.lookup(report.domain)
                stats = await dst.call(
                    lambda: dom.jobStats(self._lv.VIR_DOMAIN_JOB_STATS_COMPLETED), "job stats"
                )
        if stats:
            figures_from_stats(stats, report.migration)
        figures = report.migration
        if figures.downtime_ms is not None and figures.downtime_limit_ms is not None:
            within = figures.downtime_ms <= figures.downtime_limit_ms
            self.note(
                f"downtime {figures.downtime_ms} ms, limit {figures.downtime_limit_ms} ms"
                + ("" if within else ": over the limit")
            )
        report.spice_migrate_completed = True  # libvirt's Confirm waited for it
        report.source_resumed = False

    async def _sessions(self, conn: Connection, dom: Any) -> Sessions | None:
        try:
            return sessions_from_query_spice(
                await conn.qemu_monitor(dom, {"execute": "query-spice"})
            )
        except errors.LibvirtError as exc:
            self.note(f"query-spice on {conn.uri} failed: {exc}")
            return None

    async def _verdict(
        self,
        src: Connection,
        dst: Connection,
        dom: Any,
        streams: tuple[EventStream[GraphicsEvent], EventStream[GraphicsEvent]],
        report: LibvirtMigrationReport,
        clients: Sessions,
        completed: bool,
        witness_cid: int | None,
    ) -> None:
        start = time.monotonic()
        census = self._census
        record: ClientMigrationRecord | None = None
        if self.witness is not None and completed:
            try:
                record = await self.witness.next_migration(timeout=self.req.settle_timeout + 10)
            except TimeoutError:
                self.note("the embedded client reported no finished migration in time")
            except errors.SpiceLibvirtError as exc:
                self.note(f"the embedded client failed: {exc}")
        after: Sessions | None = None
        reconnected = False
        if completed and census.has_client:
            after, reconnected = await self._destination_after(
                dst, streams, report, clients, record
            )
        elif not completed and census.tainted:  # the passthrough answered before
            after = await self._sessions(src, dom)
        verdict = judge(
            VerdictEvidence(
                status=report.migration.status,
                before=clients,
                after=after,
                linked=report.link_wait.result == "linked",
                embedded_id=witness_cid,
                record=record,
                stream=self.witness.stream_stats() if self.witness is not None else None,
                observed_by="libvirt/QMP" if census.tainted else "the embedded client",
                reconnected=reconnected,
                lost_cause=(
                    report.link_wait.reason if report.link_wait.result == "unreachable" else None
                ),
                linked_clients=self._linked_clients(),
            )
        )
        for text in verdict.notes:
            self.note(text)
        verdict.apply(report)
        if self._returned_at is not None:
            report.verdict_ready_ms = round((time.monotonic() - self._returned_at) * 1000.0, 3)
        self.log.record("verdict", start, detail=report.outcome)
        self._note_taint(report)
        self.log.fill(report)

    def _note_taint(self, report: LibvirtMigrationReport) -> None:
        uses: list[str] = []
        if self._census.tainted:
            uses.append("query-spice")
        if report.hold.applied == "qmp-throttle":
            uses.append(f"the hold ({report.hold.escalated or 'hold=qmp'})")
        if uses:
            self.note(
                "libvirt marked the domain tainted (custom-monitor): the monitor passthrough "
                f"was used for {' and '.join(uses)} (allow_taint)"
            )

    def _linked_clients(self) -> tuple[LinkedClient, ...]:
        """Each client the kernel counted, followed by its address through both hosts'
        graphics events (taint-free evidence; empty with other censuses)."""
        kernel: KernelCensus | None = self._census.kernel
        if self._census.how != "kernel" or kernel is None:
            return ()
        now = time.monotonic()
        spice_end = self._status.spice_end_at or self._returned_at or now
        split = self._departures.first_at or self._returned_at or now
        return tuple(
            follow_client(
                self._links,
                client.address,
                len(client.channels),
                spice_end=spice_end,
                left_source=split,
                tls_port=self._dst_tls_port,
                tls_channels=client.tls_channels,
            )
            for client in kernel.clients
        )

    async def _after_from_record(self, record: ClientMigrationRecord | None) -> Sessions | None:
        """Our client's session where it went, in its own words (taint-free)."""
        if record is None or record.connection_id_after is None:
            return None
        cid = record.connection_id_after
        session = SpiceSession(cid)
        for name in record.channels_after:
            session.add(parse_channel_name(name), None)
        return {cid: session}

    async def _destination_after(
        self,
        dst: Connection,
        streams: tuple[EventStream[GraphicsEvent], EventStream[GraphicsEvent]],
        report: LibvirtMigrationReport,
        clients: Sessions,
        record: ClientMigrationRecord | None,
    ) -> tuple[Sessions, bool]:
        """The destination's sessions once the evidence is conclusive (``verdict.settled``);
        and whether a new connection reached it after the client left the source. Without
        the passthrough the sessions are our client's own record, and the clients the kernel
        counted are followed through the graphics events."""
        try:
            dom = await dst.lookup(report.domain)
        except errors.LibvirtError as exc:
            self.note(f"the domain is not on the destination: {exc}")
            return {}, False
        read_after: Callable[[], Awaitable[Sessions | None]]
        linked_kept: Callable[[], bool] | None = None
        if self._census.tainted:
            read_after = functools.partial(self._sessions, dst, dom)
        else:
            read_after = functools.partial(self._after_from_record, record)
            with contextlib.suppress(errors.LibvirtError):
                graphics = spice_graphics(await dst.call(dom.XMLDesc, "destination XML"))
                self._dst_tls_port = graphics[2] if graphics is not None else None
            if self._census.how == "kernel":
                linked_kept = lambda: all(c.kept for c in self._linked_clients())  # noqa: E731
        links, rtt = self._links, report.hold.client_rtt_estimate_ms
        if rtt is None and self.req.witness_one_way_ms is not None:
            rtt = 2 * self.req.witness_one_way_ms
        inputs = SettleInputs(
            before=clients,
            returned_at=self._returned_at or time.monotonic(),
            rtt=rtt / 1000.0 if rtt is not None else links.rtt_estimate(),
            embedded=self.witness is not None,
            record_in=record is not None,
            margin=self.req.verdict_margin_ms / 1000.0,
            bound=self.req.settle_timeout,
            linked_kept=linked_kept,
        )
        gfx, src_gfx = streams
        after, decision, reconnected = await await_settled(
            read_after, gfx, links, src_gfx, self._departures, inputs
        )
        report.verdict_basis = decision.reason
        gone = self._departures
        report.source_disconnects = f"{len(gone.disconnect_at)}/{gone.channels}"
        left = self._departures.left_at
        if left is not None and self._returned_at is not None:
            report.client_left_source_ms = round((left - self._returned_at) * 1000.0, 3)
        return after or {}, reconnected


#: Migrate one domain through libvirt, seamlessly for its SPICE client; the verdict.
#: Raises LibvirtConnectError (a libvirtd unreachable), DomainNotFoundError, PreflightError
#: (not running, no SPICE graphics, incompatible destination, or a TLS client the
#: destination would accept in plain text; nothing changed). A migration that fails is
#: *reported* (outcome failed/cancelled, with ``source_resumed``), not raised.
migrate_libvirt = LibvirtMigrationController.migrate


__all__ = [
    "LIBVIRT_MAX_SPEED_MIBS",
    "HoldDetails",
    "HoldPolicy",
    "LibvirtMigrationController",
    "LibvirtMigrationReport",
    "LibvirtMigrationRequest",
    "migrate_libvirt",
    "spice_graphics",
]
