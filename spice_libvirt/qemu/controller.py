"""The seamless migration controller for bare QEMU, over QMP: the flow, and only the flow.

Why this exists: ``client_migrate_info`` returns at once, and a small guest
migrates in tens of milliseconds. If QEMU finishes before the SPICE client has told the
source "I linked every channel to the destination" (``MIGRATE_CONNECTED_SEAMLESS``),
spice-server falls back to ``SWITCH_HOST``: the session is reset and in-flight data is
lost. The fix is to *wait between* ``client_migrate_info`` *and* ``migrate`` until the
client has linked every channel to the destination, plus a short grace for its
confirmation to reach the source (``spice-protocol-facts.md`` §6-§7).

The flow, each step bounded by a timeout; each step lives in its own module::

    connect both QMPs -> preflight (.preflight) -> the client(s) on the source
      -> client_migrate_info, TLS port only for a TLS client (migration.policy.tls_target)
      -> link wait (.waits) -> parameters, migrate, follow (.transfer)
      -> SPICE_MIGRATE_COMPLETED -> settle (.waits) -> verdict (migration.verdict)

On failure after ``migrate`` the migration is cancelled, the source resumed if it was
running, and the client stays on the source (spice-server sends it MIGRATE_CANCEL). The
same undo runs, shielded and bounded, when the run is cancelled (Ctrl-C, SIGTERM) in any
phase, and the parameters we set are put back on every path. After anything but a clean
completion both QEMUs are asked where the guest runs (.undo; a lost QMP socket is
reconnected first -- QEMU keeps migrating without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time

from spice_libvirt import errors
from spice_libvirt.migration.base import ControllerBase
from spice_libvirt.migration.evidence import Sessions, SpiceSession, channel_names, merge
from spice_libvirt.migration.evidence import parse_channel_name as _parse_name
from spice_libvirt.migration.placement import run_to_completion
from spice_libvirt.migration.policy import TlsTarget, tls_target
from spice_libvirt.migration.report import Endpoint, LinkWait, MigrationReport
from spice_libvirt.migration.verdict import VerdictEvidence, judge
from spice_libvirt.qemu.preflight import (
    PreflightFacts,
    preflight,
    qemu_pid_of_socket,
    source_sessions,
    spice_sessions,
)
from spice_libvirt.qemu.qmp import EventStream, QMPConnection, QMPDisconnectedError
from spice_libvirt.qemu.request import MigrationRequest, client_target, parse_qmp_address
from spice_libvirt.qemu.transfer import SourceMigration, loaded_status, query_status
from spice_libvirt.qemu.undo import QmpEnd, settle_placement
from spice_libvirt.qemu.waits import ClientWaits
from spice_libvirt.spice.record import ClientMigrationRecord

log = logging.getLogger(__name__)

#: the whole undo (cancel, resume, parameters, both ends asked) is bounded by this
UNDO_TIMEOUT = 60.0
#: how long both ends may take to settle after a failure (a cut-off destination exits)
PLACEMENT_TIMEOUT = 15.0


@dataclasses.dataclass
class _Run:
    """One run's connections, event streams and what it learned so far."""

    src: QMPConnection
    dst: QMPConnection
    src_spice: EventStream
    src_mig: EventStream
    dst_spice: EventStream
    report: MigrationReport
    transfer: SourceMigration
    src_end: QmpEnd
    dst_end: QmpEnd
    clients: Sessions = dataclasses.field(default_factory=dict)
    facts: PreflightFacts = dataclasses.field(default_factory=lambda: PreflightFacts(None, None))
    record_task: asyncio.Task[ClientMigrationRecord] | None = None
    #: our client's connection id *before* the migration (a switch-host changes it)
    embedded_id: int | None = None
    #: ``migrate`` was sent: from then on there is a job to cancel or complete
    migrate_sent: bool = False
    #: a new connection reached the destination after the client left the source
    reconnected: bool = False


class QemuMigrationController(ControllerBase[MigrationRequest, MigrationReport]):
    """Runs one migration; :meth:`run` returns the verdict. Use :func:`migrate_qemu`."""

    async def run(self) -> MigrationReport:
        req = self.req
        self.waits = ClientWaits(req, self.witness, self.log)
        started_at = dt.datetime.now(dt.UTC)
        src = QMPConnection("src", command_timeout=req.command_timeout)
        dst = QMPConnection("dst", command_timeout=req.command_timeout)
        src_addr = parse_qmp_address(req.source_qmp)
        dst_addr = parse_qmp_address(req.destination_qmp)
        try:
            async with self.log.phase("connect"):
                await asyncio.gather(
                    src.connect(src_addr, timeout=req.connect_timeout),
                    dst.connect(dst_addr, timeout=req.connect_timeout),
                )
            async with (
                src.events(
                    ["SPICE_INITIALIZED", "SPICE_DISCONNECTED", "SPICE_MIGRATE_COMPLETED"]
                ) as src_spice,
                src.events(["MIGRATION", "MIGRATION_PASS", "STOP", "RESUME"]) as src_mig,
                dst.events(
                    ["SPICE_CONNECTED", "SPICE_INITIALIZED", "SPICE_DISCONNECTED", "RESUME"]
                ) as dst_spice,
            ):
                report = self._new_report(started_at)
                transfer = SourceMigration(src, src_mig, req, self.note, self.reporter)
                ends = (
                    QmpEnd("source", req.source_qmp, src, req.command_timeout, self.note),
                    QmpEnd("destination", req.destination_qmp, dst, req.command_timeout, self.note),
                )
                run = _Run(src, dst, src_spice, src_mig, dst_spice, report, transfer, *ends)
                try:
                    return await self._run_connected(run)
                finally:
                    await asyncio.gather(run.src_end.conn.close(), run.dst_end.conn.close())
        finally:
            await asyncio.gather(src.close(), dst.close())
            self.reporter.close()

    def _new_report(self, started_at: dt.datetime) -> MigrationReport:
        req = self.req
        return MigrationReport(
            outcome="failed",
            started_at=started_at,
            source=Endpoint(qmp=req.source_qmp),
            destination=Endpoint(qmp=req.destination_qmp),
            migrate_uri=req.migrate_uri,
            client_target=req.client_target,
            require_seamless=req.require_seamless,
        )

    async def _pids(self) -> tuple[int | None, int | None]:
        """The two QEMUs' PIDs, for their command lines (local unix sockets only)."""
        src_addr = parse_qmp_address(self.req.source_qmp)
        dst_addr = parse_qmp_address(self.req.destination_qmp)
        src_pid = self.req.source_pid
        if src_pid is None and isinstance(src_addr, str):
            src_pid = await asyncio.to_thread(qemu_pid_of_socket, src_addr)
        dst_pid = None
        if isinstance(dst_addr, str):
            dst_pid = await asyncio.to_thread(qemu_pid_of_socket, dst_addr)
        return src_pid, dst_pid

    async def _run_connected(self, run: _Run) -> MigrationReport:
        report = run.report
        async with self.log.phase("preflight"):
            run.facts = await preflight(
                run.src,
                run.dst,
                report.source,
                report.destination,
                await self._pids(),
                self.note,
                self.req.require_seamless,
            )
            run.clients = await source_sessions(run.src, run.src_spice)
            self._add_witness_channels(run)
            target = self._tls_target(run)
        report.link_wait = LinkWait(
            timeout_s=self.req.link_timeout,
            channels_expected=channel_names(ch for s in run.clients.values() for ch in s.channels),
        )
        run.dst_spice.drain()  # destination events before client_migrate_info are not ours
        migrations_before = self.witness.migration_count if self.witness is not None else None
        try:
            async with self.log.phase("client_migrate_info"):
                await run.src.execute("client_migrate_info", self._migrate_info(target, report))
            t_cmi = time.monotonic()
            if self.witness is not None:
                req = self.req
                run.record_task = asyncio.create_task(
                    self.witness.next_migration(
                        req.link_timeout + req.completion_timeout + req.spice_completed_timeout + 30
                    )
                )
            linked = await self.waits.link_wait(
                run.dst_spice, run.clients, report.link_wait, t_cmi, migrations_before
            )
            if not linked and self.req.require_seamless and run.clients:
                return await self._abort_before_migrate(run)
            t_migrate = await self._migrate(run)
            if report.migration.status != "completed":
                return await self._after_failure(run, t_migrate)
            return await self._after_completion(run, t_migrate)
        except BaseException as exc:
            # cancelled (Ctrl-C, SIGTERM, an outer timeout) or a bug: undo, then unwind
            await run_to_completion(self._interrupted(run, exc), UNDO_TIMEOUT, "undo")
            raise
        finally:
            task = run.record_task
            if task is not None:  # awaited also when done: its error is then retrieved
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _add_witness_channels(self, run: _Run) -> None:
        """query-spice may miss channels of our client; it knows its own."""
        if self.witness is None:
            return
        clients = run.clients
        run.embedded_id = cid = self.witness.session_id
        session = clients.setdefault(cid, SpiceSession(cid))
        for name in self.witness.channels:
            session.add(_parse_name(name), None)

    def _tls_target(self, run: _Run) -> TlsTarget:
        """Which ports the client may be told, so that no TLS channel goes plain."""
        req = self.req
        target = tls_target(
            run.clients, req.client_port, req.client_tls_port, run.facts.destination_security
        )
        if req.test_offer_plain_port:
            self.note("test_offer_plain_port: the plain port is offered to a TLS client (tests)")
            return TlsTarget(req.client_port, req.client_tls_port, None, target.tls_channels)
        if target.risk is not None:
            if req.tls_downgrade_policy == "refuse" or req.require_seamless:
                raise errors.MigrationError(
                    "preflight",
                    f"TLS downgrade risk: {target.risk}; refused "
                    "(tls_downgrade_policy=refuse; 'warn' migrates anyway). Nothing was changed",
                )
            self.note(f"TLS downgrade risk (tls_downgrade_policy=warn): {target.risk}")
        elif target.caveat is not None:
            self.note(
                f"the client is on TLS: it is told only the destination's TLS port; {target.caveat}"
            )
        elif target.tls_channels:
            self.note("the client is on TLS and the destination refuses plain text for it")
        return target

    def _migrate_info(self, target: TlsTarget, report: MigrationReport) -> dict[str, object]:
        req = self.req
        args: dict[str, object] = {"protocol": "spice", "hostname": req.client_host}
        if target.port is not None:
            args["port"] = target.port
        elif target.tls_port is not None:
            # 0 = no plain port (as libvirt sends it): QEMU turns a missing port into -1,
            # which spice-gtk reads as 65535 and links there in plain text (policy.tls_target)
            args["port"] = 0
        if target.tls_port is not None:
            args["tls-port"] = target.tls_port
            if req.client_cert_subject:
                args["cert-subject"] = req.client_cert_subject
        report.client_target = client_target(req.client_host, target.port, target.tls_port)
        return args

    async def _abort_before_migrate(self, run: _Run) -> MigrationReport:
        report = run.report
        report.error_phase = "link-wait"
        report.error = (
            f"the client did not link every channel to the destination within "
            f"{self.req.link_timeout:g} s; --require-seamless: migration not started, "
            "the VM is untouched"
        )
        report.source.status_after = await query_status(run.src)
        await self._placement(run, timeout=2.0)
        after = await spice_sessions(run.src)
        self._judge(run, after, None, aborted=True)
        return report

    async def _migrate(self, run: _Run) -> float:
        """Parameters, ``migrate``, and the transfer to its end; the time ``migrate`` went."""
        report = run.report
        async with self.log.phase("parameters"):
            await run.transfer.set_parameters(report.migration)
        was_running = report.source.status_before == "running"
        t_migrate = time.monotonic()
        try:
            async with self.log.phase("migrate"):
                run.migrate_sent = True
                await run.src.execute("migrate", {"uri": self.req.migrate_uri})
            async with self.log.phase("transfer") as timing:
                final = await self._follow(run, t_migrate)
                timing.detail = final
                timing.ok = final == "completed"
        except errors.SpiceLibvirtError as exc:
            await run_to_completion(
                run.transfer.recover(report, was_running, "migrate"), UNDO_TIMEOUT, "recover"
            )
            report.error = report.error or str(exc)
            report.error_phase = report.error_phase or "migrate"
        if report.migration.status != "completed" and report.source_resumed is None:
            await run_to_completion(
                run.transfer.recover(report, was_running, "migrate"), UNDO_TIMEOUT, "recover"
            )
        await run_to_completion(run.transfer.restore(), 10.0, "restore parameters")
        return t_migrate

    async def _follow(self, run: _Run, t_migrate: float) -> str:
        """The transfer to its end; a lost source QMP is reconnected and followed on
        (QEMU migrates on without its QMP client), else the loss propagates."""
        while True:
            try:
                return await run.transfer.follow(run.report.migration, t_migrate)
            except QMPDisconnectedError:
                if not await self._reconnect_source(run):
                    raise

    async def _reconnect_source(self, run: _Run) -> bool:
        conn = await run.src_end.connection()
        if conn is None:
            return False
        run.src = run.transfer.src = conn
        return True

    async def _interrupted(self, run: _Run, exc: BaseException) -> None:
        """Undo what this run changed before the cancellation unwinds; one line on stderr
        says where the guest runs, since no report will be printed."""
        what = "interrupted" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
        report = run.report
        self.note(f"{what}: undoing the migration")
        moving = run.migrate_sent and report.migration.status != "completed"
        if moving and await self._reconnect_source(run):
            was_running = report.source.status_before == "running"
            await run.transfer.recover(report, was_running, "interrupted")
        if await self._reconnect_source(run):
            await run.transfer.restore()
        await self._placement(run)
        log.warning(
            "spice-libvirt: %s: migration undone; the guest runs on: %s (%s)",
            what,
            report.placement,
            report.placement_evidence,
        )

    async def _placement(self, run: _Run, timeout: float = PLACEMENT_TIMEOUT) -> None:
        """Both QEMUs asked (reconnected if lost) where the guest runs; into the report."""
        verdict, _src, _dst = await settle_placement(run.src_end, run.dst_end, timeout)
        if run.src_end.reconnected:
            run.src = run.transfer.src = run.src_end.conn
        if run.dst_end.reconnected:
            run.dst = run.dst_end.conn
        report = run.report
        report.placement, report.placement_evidence = verdict.placement, verdict.reason
        self.note(f"placement: {verdict.placement} ({verdict.reason})")

    async def _after_failure(self, run: _Run, t_migrate: float) -> MigrationReport:
        await self._placement(run)
        report = run.report
        if report.placement == "destination":
            # the source's QMP was lost, not the migration: QEMU finished it on its own
            self.note("the migration went through without us: the guest runs on the destination")
            report.migration.status = "completed"
            report.error = None
            return await self._after_completion(run, t_migrate)
        # spice-server tells the client MIGRATE_CANCEL; its record says when it got it
        if run.record_task is None:
            await asyncio.sleep(min(self.req.settle, 0.5))
        record = await self.waits.collect_record(run.record_task, 5.0)
        run.src_spice.drain()
        report.source.status_after = await query_status(run.src)
        report.destination.status_after = await query_status(run.dst)
        self._judge(run, await spice_sessions(run.src), record)
        return report

    async def _after_completion(self, run: _Run, t_migrate: float) -> MigrationReport:
        report = run.report
        async with self.log.phase("spice-migrate-completed"):
            report.spice_migrate_completed = await self.waits.spice_completed(
                run.src,
                run.src_spice,
                bool(run.clients),
                events_alive=not run.src_end.reconnected,
            )
        t_done = time.monotonic()
        if report.migration.migrate_to_completed_ms is not None:
            completed_at = t_migrate + report.migration.migrate_to_completed_ms / 1000
            report.migration.completed_to_spice_ms = round((t_done - completed_at) * 1e3, 3)
        record = await self.waits.collect_record(run.record_task, self.req.record_timeout)
        async with self.log.phase("settle"):
            seen, decision, reconnected = await self.waits.settle(
                run.dst_spice, run.src_spice, run.clients, t_migrate, t_done, record is not None
            )
        report.verdict_basis = decision.reason
        report.verdict_ready_ms = round((time.monotonic() - t_done) * 1000.0, 3)
        run.reconnected = reconnected
        report.source.status_after = await query_status(run.src)
        report.destination.status_after = await loaded_status(run.dst)
        await self._placement(run, timeout=2.0)
        after = merge(await spice_sessions(run.dst), seen)
        self._judge(run, after, record)
        return report

    def _judge(
        self,
        run: _Run,
        after: Sessions,
        record: ClientMigrationRecord | None,
        *,
        aborted: bool = False,
    ) -> None:
        report = run.report
        verdict = judge(
            VerdictEvidence(
                status=report.migration.status,
                before=run.clients,
                after=after,
                linked=report.link_wait.result == "linked",
                aborted_before_migrate=aborted,
                seamless_option=run.facts.seamless_on,
                embedded_id=run.embedded_id,
                record=record,
                stream=self.witness.stream_stats() if self.witness is not None else None,
                reconnected=run.reconnected,
                lost_cause=(
                    report.link_wait.reason if report.link_wait.result == "unreachable" else None
                ),
            )
        )
        for text in verdict.notes:
            self.note(text)
        verdict.apply(report)
        self.log.fill(report)


#: Migrate one QEMU to another over QMP, waiting for the SPICE client; the verdict.
#: Raises QMPConnectError (a QMP socket unreachable) or MigrationError (preflight refused,
#: nothing changed); a migration that fails is reported, not raised.
migrate_qemu = QemuMigrationController.migrate


__all__ = ["QemuMigrationController", "migrate_qemu"]
