"""The SPICE side of a QMP migration: waiting for the client, awaited on events with deadlines.

* **link wait** -- between ``client_migrate_info`` and ``migrate``: until the client linked
  every channel to the destination (the destination's ``SPICE_INITIALIZED`` events), or,
  with our embedded client, until it says it sent MIGRATE_CONNECTED_SEAMLESS; then the
  grace of :mod:`spice_libvirt.migration.policy`;
* **SPICE hand-over** -- ``SPICE_MIGRATE_COMPLETED`` on the source after the transfer;
* **settle** -- until the evidence is conclusive (``verdict.settled``): a new session on the
  destination (switch-host), or the kept one with no reconnect one RTT + a margin after
  the client left the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from typing import Any

from spice_libvirt import errors
from spice_libvirt.migration.evidence import Sessions, absorb, channel_names
from spice_libvirt.migration.policy import (
    NO_CONTACT,
    embedded_link_grace,
    first_contact_deadline,
    qmp_link_grace,
)
from spice_libvirt.migration.progress import RunLog
from spice_libvirt.migration.report import LinkWait
from spice_libvirt.migration.verdict import Settled, Settling, settled
from spice_libvirt.migration.witness import MigrationWitness, await_connected, witness_rtt
from spice_libvirt.qemu.qmp import EventStream, QMPConnection, QMPEvent, QMPTimeoutError
from spice_libvirt.qemu.request import MigrationRequest
from spice_libvirt.spice.record import ClientMigrationRecord


def _absorb_initialized(sessions: Sessions, event: QMPEvent) -> int | None:
    return absorb(sessions, event.data) if event.name == "SPICE_INITIALIZED" else None


@dataclasses.dataclass
class _Contact:
    """Whether anything of a client reached the destination by ``by`` (its SPICE_CONNECTED:
    a TCP connection accepted there); ``given_up`` once it is overdue."""

    by: float
    seen: bool = False
    given_up: bool = False

    def absorb(self, linked: Sessions, event: QMPEvent) -> None:
        self.seen = self.seen or event.name in ("SPICE_CONNECTED", "SPICE_INITIALIZED")
        _absorb_initialized(linked, event)

    def overdue(self, now: float) -> bool:
        if not self.seen and now >= self.by:
            self.given_up = True
        return self.given_up

    async def race(
        self, events: EventStream, linked: Sessions, answer: asyncio.Future[float | None]
    ) -> float | None:
        """``answer`` (our client's), unless the first contact is overdue first."""
        try:
            while not answer.done():
                for event in events.drain():
                    self.absorb(linked, event)
                if self.seen:
                    return await answer
                if self.overdue(time.monotonic()):
                    return None
                getter = asyncio.ensure_future(events.get(timeout=self.by - time.monotonic()))
                pending: set[asyncio.Future[Any]] = {getter, answer}
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                elif not getter.cancelled() and getter.exception() is None:
                    self.absorb(linked, getter.result())
            return answer.result()
        finally:
            if not answer.done():
                answer.cancel()


def _client_key(event: QMPEvent) -> str:
    client = event.data.get("client") or {}
    return f"{client.get('host')}:{client.get('port')}"


@dataclasses.dataclass
class SpiceFacts:
    """What both QEMUs' SPICE events say after the migration (see ``verdict.settled``)."""

    seen: Sessions
    rtt: float | None
    left_at: float | None
    reconnected_at: float | None
    dropped: bool


def _spice_facts(
    dst: list[QMPEvent], src: list[QMPEvent], clients: Sessions, since: float
) -> SpiceFacts:
    """The sessions initialized on the destination, the RTT (median connect -> initialize
    of the client's links there), when the client's last source channel left, the first
    connect on the destination from a new remote after it began to leave, pre-links lost."""
    seen: Sessions = {}
    connect_at: dict[str, float] = {}
    spans: list[float] = []
    for event in dst:
        if event.name == "SPICE_CONNECTED":
            connect_at.setdefault(_client_key(event), event.received)
        elif event.name == "SPICE_INITIALIZED":
            _absorb_initialized(seen, event)
            start = connect_at.get(_client_key(event))
            if start is not None:
                spans.append(event.received - start)
    channels = sum(len(s.channels) for s in clients.values())
    gone = [e.received for e in src if e.name == "SPICE_DISCONNECTED" and e.received >= since]
    first = min(gone, default=since)
    # every channel gone, else the first one (spice-gtk closes a switch-host's together)
    left_at = max(gone) if channels and len(gone) >= channels else min(gone, default=None)
    early = {_client_key(e) for e in dst if e.name == "SPICE_CONNECTED" and e.received < first}
    again = next(
        (
            e.received
            for e in dst
            if e.name == "SPICE_CONNECTED" and e.received >= first and _client_key(e) not in early
        ),
        None,
    )
    dropped = any(e.name == "SPICE_DISCONNECTED" for e in dst)
    return SpiceFacts(seen, statistics.median(spans) if spans else None, left_at, again, dropped)


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
            contact = _Contact(first_contact_deadline(t_cmi))
            if self.witness is not None:
                link.signal = "embedded-client"
                answer = asyncio.ensure_future(
                    await_connected(
                        self.witness, self.req.link_timeout, migrations_before, link, self.log.note
                    )
                )
                connected_at = await contact.race(dst_spice, linked, answer)
            else:
                link.signal = "qmp-destination"
                connected_at = None
                await self._destination_linked(dst_spice, clients, linked, t_cmi, contact)
            if contact.given_up:
                link.result = "unreachable"
                link.reason = f"{NO_CONTACT} within {contact.by - t_cmi:.1f} s"
            for event in dst_spice.drain():
                _absorb_initialized(linked, event)
            mine = {cid: s for cid, s in linked.items() if cid in clients}
            all_linked = _covers(linked, clients)
            link.channels_linked = channel_names(ch for s in mine.values() for ch in s.channels)
            end = connected_at if connected_at is not None else time.monotonic()
            link.duration_ms = round((end - t_cmi) * 1000.0, 3)
            if self.witness is None and not all_linked and link.result != "unreachable":
                link.result = "timeout"
            if link.result in ("timeout", "connect-error", "unreachable"):
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
        self,
        dst_spice: EventStream,
        clients: Sessions,
        linked: Sessions,
        t_cmi: float,
        contact: _Contact,
    ) -> None:
        """Read the destination's events until every client channel initialized there
        (or nothing of the client reached it in time: ``contact.given_up``)."""
        deadline = t_cmi + self.req.link_timeout

        for event in dst_spice.drain():
            contact.absorb(linked, event)
        while not _covers(linked, clients):
            now = time.monotonic()
            if contact.overdue(now):
                return
            left = (deadline if contact.seen else min(deadline, contact.by)) - now
            if deadline - now <= 0:
                return
            with contextlib.suppress(QMPTimeoutError):
                contact.absorb(linked, await dst_spice.get(timeout=max(0.0, left)))

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

    async def settle(
        self,
        dst_spice: EventStream,
        src_spice: EventStream,
        clients: Sessions,
        migrate_at: float,
        completed_at: float,
        record_in: bool,
    ) -> tuple[Sessions, Settled, bool]:
        """Watch the destination until the evidence is conclusive (``verdict.settled``):
        (the sessions seen there, why, whether a new connection came after the client left).

        Bounded by ``settle``; a kept session is conclusive one RTT + a margin after the
        client left the source, without a fixed window.
        """
        while True:
            dst_spice.drain()
            src_spice.drain()
            facts = _spice_facts(dst_spice.history, src_spice.history, clients, migrate_at)
            decision = settled(
                Settling(
                    before=clients,
                    after=facts.seen,
                    returned_at=completed_at,
                    now=time.monotonic(),
                    rtt=witness_rtt(self.witness) if self.witness is not None else facts.rtt,
                    source_left_at=facts.left_at,
                    reconnected_at=facts.reconnected_at,
                    prelinks_dropped=facts.dropped,
                    embedded=self.witness is not None,
                    record_in=record_in,
                    margin=self.req.verdict_margin_ms / 1000.0,
                    bound=self.req.settle,
                )
            )
            if decision.done:
                return facts.seen, decision, facts.reconnected_at is not None
            until = decision.recheck_at or completed_at + self.req.settle
            with contextlib.suppress(QMPTimeoutError):
                await dst_spice.get(timeout=max(0.005, min(until - time.monotonic(), 0.05)))

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
