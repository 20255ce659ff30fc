"""After libvirt returned: gather the events that make the verdict conclusive, no longer.

The decision is :func:`spice_libvirt.migration.verdict.settled` (pure); this module only
feeds it what both libvirtds said since the migration started:

* the **source's** graphics events: the client's channels disconnecting from the source.
  A switch-host client has left before libvirt returns (libvirt's Confirm waits for
  SPICE_MIGRATE_COMPLETED, which spice-server emits once the client is gone), and its new
  connection reaches the destination one RTT after it left;
* the **destination's** graphics events: a connect from a remote that was not one of the
  client's pre-links (the switch-host reconnect), a pre-link dropped;
* the destination's ``query-spice`` on each event (with the monitor passthrough allowed): a
  new connection id, or the kept one with every channel; without it, each client's
  channels counted on the destination by its address (taint-free).

A seamless verdict is therefore ready one RTT + a margin after the client left the source
(before or at libvirt's return), instead of after a fixed settle window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable

from spice_libvirt.libvirt.connection import EventStream, GraphicsEvent, endpoint
from spice_libvirt.libvirt.hold import DestinationLinks
from spice_libvirt.migration.evidence import Sessions
from spice_libvirt.migration.verdict import Settled, Settling, settled


class SourceDepartures:
    """The client's channels leaving the source (the source's graphics events)."""

    def __init__(self, domain: str, channels: int) -> None:
        self.domain = domain
        self.channels = channels
        self.disconnect_at: dict[str, float] = {}

    def absorb(self, event: GraphicsEvent) -> None:
        if event.domain == self.domain and event.phase == "disconnect":
            self.disconnect_at.setdefault(event.remote, event.at)

    @property
    def first_at(self) -> float | None:
        return min(self.disconnect_at.values()) if self.disconnect_at else None

    @property
    def left_at(self) -> float | None:
        """When the last of the client's channels left (None: not all of them yet)."""
        if self.channels <= 0 or len(self.disconnect_at) < self.channels:
            return None
        return max(self.disconnect_at.values())


@dataclasses.dataclass
class SettleInputs:
    """What the settle loop is given by the controller."""

    before: Sessions
    returned_at: float
    rtt: float | None
    embedded: bool
    record_in: bool
    margin: float
    bound: float
    #: taint-free evidence: whether every client followed by its address is kept so far
    #: (from the events gathered up to now); None: the destination's sessions decide
    linked_kept: Callable[[], bool] | None = None


def reconnects(
    links: DestinationLinks, split: float, addresses: frozenset[str] | None = None
) -> list[GraphicsEvent]:
    """The connects on the destination at or after ``split`` from remotes that were not
    connected before it (not pre-links): a switch-host client's new connections.
    ``addresses``: only from these client addresses (None: from anyone)."""
    before = {e.remote for e in links.events if e.phase == "connect" and e.at < split}
    return [
        e
        for e in links.events
        if e.phase == "connect"
        and e.at >= split
        and e.remote not in before
        and (addresses is None or endpoint(e.remote)[0] in addresses)
    ]


def reconnected_at(
    links: DestinationLinks, split: float, addresses: frozenset[str] | None = None
) -> float | None:
    """The first of :func:`reconnects`: the switch-host reconnect."""
    found = reconnects(links, split, addresses)
    return found[0].at if found else None


def _absorb_all(
    gfx: EventStream[GraphicsEvent],
    links: DestinationLinks,
    src: EventStream[GraphicsEvent],
    departures: SourceDepartures,
) -> None:
    for event in gfx.drain():
        links.absorb(event)
    for event in src.drain():
        departures.absorb(event)


async def _either(
    a: EventStream[GraphicsEvent], b: EventStream[GraphicsEvent], timeout: float
) -> None:
    """Return when either stream has an event queued, or after ``timeout``."""
    if a.pending() or b.pending():
        return
    waiters = [asyncio.ensure_future(a.wait_pending()), asyncio.ensure_future(b.wait_pending())]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, timeout), return_when="FIRST_COMPLETED")
    finally:
        for w in waiters:
            w.cancel()
            with contextlib.suppress(BaseException):
                await w


async def await_settled(
    read_after: Callable[[], Awaitable[Sessions | None]],
    gfx: EventStream[GraphicsEvent],
    links: DestinationLinks,
    src: EventStream[GraphicsEvent],
    departures: SourceDepartures,
    inputs: SettleInputs,
) -> tuple[Sessions | None, Settled, bool]:
    """Wait until the evidence is conclusive: (the destination's sessions, why, reconnected)."""
    after: Sessions | None = None
    while True:
        _absorb_all(gfx, links, src, departures)
        after = await read_after() or after
        _absorb_all(gfx, links, src, departures)
        split = departures.first_at or inputs.returned_at
        again = reconnected_at(links, split)
        state = Settling(
            before=inputs.before,
            after=after,
            returned_at=inputs.returned_at,
            now=time.monotonic(),
            rtt=inputs.rtt,
            # not every disconnect may be relayed before the source QEMU is stopped: the
            # first one anchors then (spice-gtk closes a switch-host's channels together)
            source_left_at=departures.left_at or departures.first_at,
            reconnected_at=again,
            prelinks_dropped=any(e.phase == "disconnect" for e in links.events),
            embedded=inputs.embedded,
            record_in=inputs.record_in,
            margin=inputs.margin,
            bound=inputs.bound,
            linked_kept=inputs.linked_kept() if inputs.linked_kept is not None else None,
        )
        decision = settled(state)
        if decision.done:
            return after, decision, again is not None
        recheck = decision.recheck_at or (inputs.returned_at + inputs.bound)
        await _either(gfx, src, recheck - time.monotonic())


__all__ = ["SettleInputs", "SourceDepartures", "await_settled", "reconnected_at", "reconnects"]
