"""The SPICE side of a QMP migration: waiting for the client, awaited on events with deadlines.

* **link wait** -- between ``client_migrate_info`` and ``migrate``: until the client linked
  every channel to the destination (the destination's ``SPICE_INITIALIZED`` events), or,
  with our embedded client, until it says it sent MIGRATE_CONNECTED_SEAMLESS; then the
  grace of :mod:`spice_libvirt.migration.policy`;
* **SPICE hand-over** -- ``SPICE_MIGRATE_COMPLETED`` on the source after the transfer;
* **settle** -- a short look at the destination for a session that a switch-host client
  opens anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from spice_libvirt import errors
from spice_libvirt.migration.evidence import MAIN, Sessions, absorb, channel_names
from spice_libvirt.migration.policy import embedded_link_grace, qmp_link_grace
from spice_libvirt.migration.progress import RunLog
from spice_libvirt.migration.report import LinkWait
from spice_libvirt.migration.witness import MigrationWitness, await_connected, witness_rtt
from spice_libvirt.qemu.qmp import EventStream, QMPConnection, QMPEvent, QMPTimeoutError
from spice_libvirt.qemu.request import MigrationRequest
from spice_libvirt.spice.record import ClientMigrationRecord


def _absorb_initialized(sessions: Sessions, event: QMPEvent) -> int | None:
    return absorb(sessions, event.data) if event.name == "SPICE_INITIALIZED" else None


def _covers(linked: Sessions, clients: Sessions) -> bool:
    """Every channel of every client has initialized on the destination."""
    return all(
        cid in linked and set(linked[cid].channels) >= set(s.channels) for cid, s in clients.items()
    )


class ClientWaits:
    """The waits of one QMP migration on its SPICE client(s)."""

    def __init__(
        self, req: MigrationRequest, witness: MigrationWitness | None, log: RunLog
    ) -> None:
        self.req = req
        self.witness = witness
        self.log = log

    async def link_wait(
        self,
        dst_spice: EventStream,
        clients: Sessions,
        link: LinkWait,
        t_cmi: float,
        migrations_before: int | None,
    ) -> bool:
        """Wait until the client(s) linked every channel to the destination; True if so."""
        if not self.req.wait_client:
            link.skipped, link.result = True, "skipped"
            self.log.note("--no-wait-client: migrating without waiting for the client (diagnosis)")
            return False
        if not clients:
            link.result = "no-client"
            return True
        async with self.log.phase("link-wait") as timing:
            linked: Sessions = {}
            if self.witness is not None:
                link.signal = "embedded-client"
                connected_at = await await_connected(
                    self.witness, self.req.link_timeout, migrations_before, link, self.log.note
                )
            else:
                link.signal = "qmp-destination"
                connected_at = None
                await self._destination_linked(dst_spice, clients, linked, t_cmi)
            for event in dst_spice.drain():
                _absorb_initialized(linked, event)
            mine = {cid: s for cid, s in linked.items() if cid in clients}
            all_linked = _covers(linked, clients)
            link.channels_linked = channel_names(ch for s in mine.values() for ch in s.channels)
            end = connected_at if connected_at is not None else time.monotonic()
            link.duration_ms = round((end - t_cmi) * 1000.0, 3)
            if self.witness is None and not all_linked:
                link.result = "timeout"
            if link.result in ("timeout", "connect-error"):
                timing.ok = False
                timing.detail = link.result
                self.log.note(
                    f"link wait: {link.result} after {link.duration_ms:.0f} ms; "
                    f"linked {link.channels_linked} of {link.channels_expected}"
                )
                return False
            link.result = "linked"
            grace = self._grace(end - t_cmi, all_linked, link)
            link.grace_ms = round(grace * 1000.0, 3)
            timing.detail = f"linked in {link.duration_ms:.0f} ms, grace {link.grace_ms:.0f} ms"
            await asyncio.sleep(grace)
            return True

    async def _destination_linked(
        self, dst_spice: EventStream, clients: Sessions, linked: Sessions, t_cmi: float
    ) -> None:
        """Read the destination's events until every client channel initialized there."""
        deadline = t_cmi + self.req.link_timeout

        for event in dst_spice.drain():
            _absorb_initialized(linked, event)
        while not _covers(linked, clients):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(QMPTimeoutError):
                _absorb_initialized(linked, await dst_spice.get(timeout=left))

    def _grace(self, link_s: float, all_linked: bool, link: LinkWait) -> float:
        req = self.req
        if self.witness is None:
            return qmp_link_grace(link_s, floor=req.grace, ceiling=req.max_grace)
        if not all_linked:
            self.log.note(
                "the embedded client reported CONNECTED_SEAMLESS before the destination "
                f"showed every channel (saw {link.channels_linked})"
            )
        return embedded_link_grace(
            witness_rtt(self.witness), margin=req.embedded_grace, ceiling=req.max_grace
        )

    async def spice_completed(
        self,
        src: QMPConnection,
        src_spice: EventStream,
        had_clients: bool,
        *,
        events_alive: bool = True,
    ) -> bool:
        """SPICE_MIGRATE_COMPLETED on the source (or ``query-spice.migrated``), bounded.

        ``events_alive`` False: the source QMP was reconnected and the event stream is
        the lost connection's; only ``query-spice`` can tell.
        """
        timeout = self.req.spice_completed_timeout
        if any(e.name == "SPICE_MIGRATE_COMPLETED" for e in src_spice.history):
            return True
        with contextlib.suppress(errors.QMPError):
            if not events_alive:
                raise errors.QMPError("no event stream")
            await src.wait_event(src_spice, lambda e: e.name == "SPICE_MIGRATE_COMPLETED", timeout)
            return True
        with contextlib.suppress(errors.QMPError):  # fired before we listened?
            if (await src.execute("query-spice", timeout=2)).get("migrated"):
                return True
        self.log.note(
            f"no SPICE_MIGRATE_COMPLETED within {timeout:g} s"
            + ("" if had_clients else " (no client was connected)")
        )
        return False

    async def settle(self, dst_spice: EventStream, clients: Sessions, settle: float) -> Sessions:
        """Watch the destination for ``settle`` s: a new connection id means SWITCH_HOST."""
        seen: Sessions = {}
        for event in dst_spice.history:
            _absorb_initialized(seen, event)
        deadline = time.monotonic() + settle
        fresh_main = False
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(QMPTimeoutError):
                _absorb_initialized(seen, await dst_spice.get(timeout=left))
            new_ids = set(seen) - set(clients)
            if not fresh_main and new_ids and all(MAIN in seen[c].channels for c in new_ids):
                # a fresh main link arrived; give its other channels a moment to follow
                fresh_main = True
                deadline = min(deadline, time.monotonic() + 0.2)
        return seen

    async def collect_record(
        self, task: asyncio.Task[ClientMigrationRecord] | None, timeout: float
    ) -> ClientMigrationRecord | None:
        """The embedded client's record of this migration, if it hands one over in time."""
        if task is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            self.log.note(f"the embedded client gave no migration record within {timeout:g} s")
        except errors.SpiceLibvirtError as exc:
            self.log.note(f"the embedded client failed: {exc}")
        return None


__all__ = ["ClientWaits"]
