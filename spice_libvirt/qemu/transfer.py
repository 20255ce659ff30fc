"""The RAM transfer on the source QEMU: start it, follow it, cancel it, recover from it.

Why apart from the controller: these steps are about QEMU's migration state machine only
(``migrate``, ``MIGRATION`` events, ``query-migrate``, ``migrate_cancel``, ``cont``), not
about SPICE. The state changes are awaited as ``MIGRATION`` events with deadlines;
``query-migrate`` stays the source of truth and of the progress figures (QEMU has no
progress event).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from spice_libvirt import errors
from spice_libvirt.migration.progress import MigrationProgress, ProgressReporter
from spice_libvirt.migration.report import MigrationFigures, MigrationReport
from spice_libvirt.qemu.qmp import (
    EventStream,
    QMPConnection,
    QMPDisconnectedError,
    QMPTimeoutError,
)
from spice_libvirt.qemu.request import MigrationRequest

FINAL_STATES = frozenset({"completed", "failed", "cancelled"})


def fill_figures(figures: MigrationFigures, info: dict[str, Any]) -> None:
    """Copy QEMU's ``query-migrate`` numbers into the report's figures."""
    ram: dict[str, Any] = info.get("ram") or {}
    figures.total_time_ms = info.get("total-time", figures.total_time_ms)
    figures.downtime_ms = info.get("downtime", figures.downtime_ms)
    figures.setup_time_ms = info.get("setup-time", figures.setup_time_ms)
    figures.transferred_bytes = ram.get("transferred", figures.transferred_bytes)
    figures.total_bytes = ram.get("total", figures.total_bytes)
    figures.normal_pages = ram.get("normal", figures.normal_pages)
    figures.duplicate_pages = ram.get("duplicate", figures.duplicate_pages)
    figures.mbps = ram.get("mbps", figures.mbps)
    figures.passes = ram.get("dirty-sync-count", figures.passes)
    figures.dirty_pages_rate = ram.get("dirty-pages-rate", figures.dirty_pages_rate)
    if info.get("error-desc"):
        figures.error_desc = str(info["error-desc"])


async def query_status(conn: QMPConnection) -> str | None:
    """``query-status`` (None: QEMU does not answer)."""
    try:
        return str((await conn.execute("query-status", timeout=3))["status"])
    except errors.QMPError:
        return None


async def loaded_status(conn: QMPConnection, timeout: float = 5.0) -> str | None:
    """The destination's ``query-status`` once it has loaded the incoming state.

    When the source says ``completed`` the destination may still be ``inmigrate``, reading
    the last device state (for a while on a loaded machine); the status after a completed
    migration is the one it settles in, asked again until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        status = await query_status(conn)
        if status != "inmigrate" or time.monotonic() >= deadline:
            return status
        await asyncio.sleep(0.02)


@dataclasses.dataclass
class SourceMigration:
    """The migration job on one source QEMU, followed through its ``MIGRATION`` events."""

    src: QMPConnection
    events: EventStream
    req: MigrationRequest
    note: Callable[[str], None]
    reporter: ProgressReporter
    #: the parameters we changed, as they were before (put back by :meth:`restore`)
    saved: dict[str, object] = dataclasses.field(default_factory=dict)

    async def set_parameters(self, figures: MigrationFigures) -> None:
        src = self.src
        await src.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events", "state": True}]},
        )
        params: dict[str, object] = {}
        if self.req.downtime_limit_ms is not None:
            params["downtime-limit"] = self.req.downtime_limit_ms
        if self.req.max_bandwidth is not None:
            params["max-bandwidth"] = self.req.max_bandwidth
        if params:
            before = await src.execute_retrying("query-migrate-parameters")
            self.saved = {k: before[k] for k in params if k in before}
            await src.execute("migrate-set-parameters", params)
        current = await src.execute_retrying("query-migrate-parameters")
        figures.downtime_limit_ms = current.get("downtime-limit")
        figures.max_bandwidth = current.get("max-bandwidth")

    async def follow(self, figures: MigrationFigures, t_migrate: float) -> str:
        """Follow the migration to a final state; cancel it if it exceeds its bound."""
        deadline = t_migrate + self.req.completion_timeout
        while True:
            # the MIGRATION event carries a state change the moment it happens; between
            # events, one query-migrate per poll interval feeds the progress display
            with contextlib.suppress(errors.QMPError):
                event = await self.events.get(timeout=self.req.poll_interval)
                if event.name == "MIGRATION" and event.data.get("status") == "completed":
                    figures.migrate_to_completed_ms = round(
                        (event.received - t_migrate) * 1000.0, 3
                    )
            try:
                info = await self.src.execute_retrying("query-migrate")
            except QMPDisconnectedError:
                figures.status = "failed"
                figures.error_desc = "the source QEMU went away during the migration"
                raise
            status = str(info.get("status", "setup"))
            self.reporter.update(MigrationProgress.from_query(info))
            if status in FINAL_STATES:
                break
            if time.monotonic() > deadline:
                self.note(f"migration not finished after {self.req.completion_timeout:g} s: cancel")
                await self.cancel()
                info = await self.src.execute_retrying("query-migrate")
                status = str(info.get("status", "cancelling"))
                if status != "completed":  # it may have made it after all
                    figures.status = status
                    fill_figures(figures, info)
                    figures.error_desc = figures.error_desc or "completion timeout"
                    return status
                break
        if figures.migrate_to_completed_ms is None and status == "completed":
            figures.migrate_to_completed_ms = round((time.monotonic() - t_migrate) * 1e3, 3)
        if status == "completed":
            info = await self._final_figures(info)
        figures.status = status
        fill_figures(figures, info)
        return status

    async def _final_figures(self, info: dict[str, Any]) -> dict[str, Any]:
        """QEMU sets COMPLETED before it computes total-time/downtime (migration cleanup),
        and no event says when they are in: ask again briefly, bounded."""
        for _ in range(20):
            if info.get("total-time"):
                break
            await asyncio.sleep(0.025)
            info = await self.src.execute_retrying("query-migrate")
        return info

    async def restore(self) -> bool:
        """Put back the parameters :meth:`set_parameters` changed (True: as before)."""
        if not self.saved:
            return True
        try:
            await self.src.execute("migrate-set-parameters", self.saved, timeout=5)
        except errors.QMPError as exc:
            self.note(f"could not put back the migration parameters {self.saved}: {exc}")
            return False
        return True

    async def cancel(self) -> str:
        """``migrate_cancel`` and await (bounded) the final state as a MIGRATION event
        (or, on a reconnected QMP whose event stream is gone, as ``query-migrate``)."""
        with contextlib.suppress(errors.QMPError):
            await self.src.execute("migrate_cancel")
        deadline = time.monotonic() + self.req.cancel_timeout
        status = "cancelling"
        while True:
            with contextlib.suppress(errors.QMPError):
                status = str((await self.src.execute("query-migrate", timeout=2)).get("status"))
            left = deadline - time.monotonic()
            if status in FINAL_STATES or status == "none" or left <= 0:
                return status
            with contextlib.suppress(QMPTimeoutError):
                event = await self.events.get(timeout=min(left, 0.5))
                if event.name == "MIGRATION":
                    status = str(event.data.get("status", status))

    async def recover(self, report: MigrationReport, was_running: bool, phase: str) -> None:
        """After a failure: cancel what still runs, resume the source if it ran before."""
        src = self.src
        figures = report.migration
        try:
            info = await src.execute("query-migrate", timeout=3)
            status = str(info.get("status", "none"))
            if status not in FINAL_STATES and status != "none":
                self.note(f"{phase}: cancelling the migration (state {status})")
                await self.cancel()
                info = await src.execute("query-migrate", timeout=3)
                status = str(info.get("status", status))
                report.error_phase = report.error_phase or phase
            figures.status = status if status != "none" else figures.status or "failed"
            fill_figures(figures, info)
            state = (await src.execute("query-status", timeout=3))["status"]
            if was_running and state != "running" and status != "completed":
                self.note(f"source is {state!r} after the failure: resuming it")
                await src.execute("cont", timeout=5)
                state = (await src.execute("query-status", timeout=3))["status"]
            report.source_resumed = state == "running" if was_running else None
        except errors.QMPError as exc:
            report.source_resumed = False
            self.note(f"recovery on the source failed: {exc}")


__all__ = ["FINAL_STATES", "SourceMigration", "fill_figures", "query_status"]
