"""The host agent's verdict on the controller's evidence and rule, without I/O.

The agent follows a client it cannot ask about (no ``query-spice``: that taints) through
both libvirtds' graphics events: its pre-links on the destination, its channels leaving the
source, a reconnect from a new port. :meth:`HeldMigration.judge_due` waits, bounded, until
that evidence is conclusive (:func:`spice_libvirt.migration.verdict.settled`) and
:meth:`HeldMigration.verdict` judges it (:func:`spice_libvirt.migration.verdict.judge` on
:class:`~spice_libvirt.migration.verdict.LinkedClient` evidence). Every row is a timeline
the lab showed (times in seconds; the client is 300 ms away).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any, cast

import pytest

from spice_libvirt.agent.hold import MigrationHold, first_items
from spice_libvirt.agent.plan import (
    LEAVE_BOUND_S,
    SETTLE_BOUND_S,
    CallerValues,
    HeldMigration,
    Release,
)
from spice_libvirt.agent.settings import AgentSettings
from spice_libvirt.libvirt.connection import Connection, GraphicsEvent

CLIENT = "10.0.0.3"
#: the client's five channels on the source (what the kernel showed at setup)
SOURCE_PORTS = (40001, 40002, 40003, 40004, 40005)
#: its pre-links to the destination
PRELINK_PORTS = (50001, 50002, 50003, 50004, 50005)
RTT = 0.3


def plan() -> HeldMigration:
    return HeldMigration(
        domain="vm",
        started_at=100.0,
        caller=CallerValues(8796093022207, 300),
        client_channels=tuple(f"{CLIENT}:{p}" for p in SOURCE_PORTS),
    )


def dst(phase: str, port: int, at: float, host: str = CLIENT) -> GraphicsEvent:
    return GraphicsEvent("vm", phase, "10.0.0.2:5900", f"{host}:{port}", at)


def src(phase: str, port: int, at: float) -> GraphicsEvent:
    return GraphicsEvent("vm", phase, "10.0.0.1:5900", f"{CLIENT}:{port}", at)


@dataclasses.dataclass
class Timeline:
    """What the agent sees of one migration, fed to a plan in any order it arrives."""

    #: when the destination initialized each pre-link (None: no pre-links)
    linked_at: float | None = 101.0
    #: QEMU's switchover (pre-switchover/device) and completion on the source
    switchover_at: float = 103.0
    completed_at: float = 103.1
    status: str = "completed"
    #: the client's channels leaving the source (None: not seen)
    left_at: float | None = 103.4
    #: the client's reconnect from a new port (None: none)
    reconnect_at: float | None = None
    #: its pre-links dropped from the destination (None: they stay)
    dropped_at: float | None = None

    def events(self) -> tuple[list[GraphicsEvent], list[GraphicsEvent]]:
        destination: list[GraphicsEvent] = []
        if self.linked_at is not None:
            for port in PRELINK_PORTS:
                destination.append(dst("connect", port, self.linked_at - RTT))
                destination.append(dst("initialize", port, self.linked_at))
        if self.reconnect_at is not None:
            destination.append(dst("connect", 50100, self.reconnect_at))
            destination.append(dst("initialize", 50100, self.reconnect_at + RTT))
        if self.dropped_at is not None:
            destination += [dst("disconnect", port, self.dropped_at) for port in PRELINK_PORTS]
        source: list[GraphicsEvent] = []
        if self.left_at is not None:
            source = [src("disconnect", port, self.left_at) for port in SOURCE_PORTS]
        return destination, source

    def fed(self, *, statuses_last: bool = False) -> HeldMigration:
        """A plan fed this timeline; ``statuses_last``: QEMU's status events read only
        after every graphics event (a busy agent gets round to them late)."""
        p = plan()
        destination, source = self.events()
        statuses = [("active", 100.05), ("device", self.switchover_at)]
        statuses.append((self.status, self.completed_at))
        if not statuses_last:
            for status in statuses:
                p.migration_status(*status)
        for event in destination:
            p.destination_event(event)
        for event in source:
            p.source_event(event)
        if statuses_last:
            for status in statuses:
                p.migration_status(*status)
        return p


def settle(p: HeldMigration, start: float) -> tuple[float, str]:
    """Step the clock as the agent would (to each recheck) until the evidence is
    conclusive: (when, why)."""
    now = start
    for _ in range(100):
        decision = p.judge_due(now)
        if decision.done:
            return now, decision.reason
        assert decision.recheck_at is not None
        assert decision.recheck_at > now
        now = decision.recheck_at
    raise AssertionError("the verdict never settled")


#: (name, timeline, agent outcome, relinks after)
CASES = [
    ("kept: every channel linked before the switchover, none dropped, none anew",
     Timeline(), "seamless", 0),
    # the firmware guest at load 20: released "linked", yet remote-viewer went switch-host;
    # its reconnect came 0.9 s after completion, past the old fixed window (RTT + 0.1 s)
    ("linked in time, reset all the same: the reconnect after leaving the source",
     Timeline(left_at=103.6, reconnect_at=104.0, dropped_at=104.3), "switch-host", 1),
    ("a hold that came too late: linked after the switchover, then reset",
     Timeline(linked_at=102.0, switchover_at=100.1, completed_at=100.2, left_at=102.4,
              reconnect_at=102.7, dropped_at=103.0), "switch-host", 1),
    # the Vagrant lab's plain step: switchover 573 ms after setup, 628 ms of downtime, and
    # the client (which followed seamlessly) linked in between; spice-server hears of the
    # end only at QEMU's completed, so a link made while the paused guest moved is kept
    ("linked during the downtime, before QEMU completed: kept",
     Timeline(linked_at=103.3, switchover_at=103.0, completed_at=103.6, left_at=103.8),
     "seamless", 0),
    ("linked after QEMU completed and never seen anew: neither kept nor reset",
     Timeline(linked_at=102.0, switchover_at=100.1, completed_at=100.2, left_at=102.4),
     "not-linked", 0),
    ("a pre-link dropped without a reconnect: not conclusive, not kept",
     Timeline(dropped_at=103.5), "not-linked", 0),
    ("nothing of the client on the destination, and it left the source: lost",
     Timeline(linked_at=None), "client-lost", 0),
    ("the migration failed: the client stayed on the source",
     Timeline(status="failed", left_at=None), "failed", 0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("timeline", "outcome", "relinks"),
    [pytest.param(t, o, r, id=name) for name, t, o, r in CASES],
)
def test_the_agents_verdict_from_both_hosts_events(
    timeline: Timeline, outcome: str, relinks: int
) -> None:
    p = timeline.fed()
    when, _ = settle(p, timeline.completed_at)
    assert p.verdict(when) == outcome
    assert p.relinks_after(when) == relinks


def test_the_verdict_is_the_same_whatever_order_the_agent_read_the_events_in() -> None:
    """QEMU's completion is read after the links (a busy agent): by the events' own times
    the client linked only after it, so a reset client is not called seamless."""
    late = Timeline(linked_at=103.7, switchover_at=103.0, completed_at=103.6, left_at=104.0,
                    reconnect_at=104.3)  # fmt: skip
    for order in (False, True):
        p = late.fed(statuses_last=order)
        assert p.linked_before_end is False
        when, _ = settle(p, late.completed_at)
        assert p.verdict(when) == "switch-host"
    kept = Timeline()
    assert kept.fed(statuses_last=True).linked_before_end is True


def test_a_kept_session_is_judged_one_rtt_and_a_margin_after_the_client_left() -> None:
    t = Timeline()
    p = t.fed()
    decision = p.judge_due(t.left_at or 0.0)
    assert not decision.done
    when, why = settle(p, t.completed_at)
    assert t.left_at is not None
    assert when == pytest.approx(t.left_at + RTT + 0.1)
    assert "kept with every channel" in why


def test_the_verdict_waits_for_the_client_to_leave_the_source_not_a_fixed_window() -> None:
    """The old window closed RTT + 0.1 s after completion; a client still busy with its
    seamless links is told to switch host only when it is done, seconds later."""
    t = Timeline(left_at=None)
    p = t.fed()
    decision = p.judge_due(t.completed_at + RTT + 0.2)
    assert not decision.done
    assert decision.reason == "waiting for the client to leave the source"
    assert decision.recheck_at == pytest.approx(t.completed_at + LEAVE_BOUND_S)
    # it leaves 2.2 s after the end and reconnects one RTT later
    for port in SOURCE_PORTS:
        p.source_event(src("disconnect", port, 105.3))
    p.destination_event(dst("connect", 50100, 105.6))
    when, why = settle(p, 105.3)
    assert p.verdict(when) == "switch-host"
    assert "new connection" in why


def test_a_client_that_never_shows_leaving_is_judged_at_the_bounds() -> None:
    t = Timeline(left_at=None)
    p = t.fed()
    when, _ = settle(p, t.completed_at)
    assert when <= t.completed_at + LEAVE_BOUND_S + SETTLE_BOUND_S
    assert p.verdict(when) == "seamless"  # nothing against it, every link before


def test_only_the_clients_own_channels_and_address_count() -> None:
    t = Timeline()
    p = t.fed()
    # another client's connection to the destination is not this client's reconnect,
    # another domain's and another port's departures are not this client leaving
    p.destination_event(dst("connect", 6000, 103.5, host="10.0.0.9"))
    p.source_event(GraphicsEvent("other", "disconnect", "10.0.0.1:5900", f"{CLIENT}:40001", 102.0))
    p.source_event(src("disconnect", 45000, 102.0))
    when, _ = settle(p, t.completed_at)
    assert p.verdict(when) == "seamless"
    assert p.relinks_after(when) == 0


def test_no_destination_watched_is_nothing_to_judge_by() -> None:
    p = Timeline().fed()
    p.watched = False
    decision = p.judge_due(103.2)
    assert decision.done
    assert p.verdict(103.2) == "not-linked"


async def _nowhere(_: str) -> Any:
    return None


def test_a_qmp_throttle_that_came_after_the_first_pass_is_said_to_have_held_nothing() -> None:
    """``virsh migrate`` without ``--bandwidth`` moves the firmware guest in about 0.1 s: a
    throttle in place 80 ms after QEMU's setup found the pass over, QEMU switched over
    during the hold and the client was reset. The verdict says so, with the times."""
    hold = MigrationHold(AgentSettings(), cast(Connection, None), "vm", 99.95, _nowhere)
    hold.verdict.hold = "qmp-throttle"
    hold._applied_at, hold._throttled_at = 100.01, 100.03
    t = Timeline(linked_at=None, switchover_at=100.09, completed_at=100.15, left_at=102.3,
                 reconnect_at=102.6)  # fmt: skip
    p = t.fed()
    p.released(100.16, Release("migration-ended", "the migration ended (completed)"))
    hold._judge(p)
    assert hold.verdict.outcome == "switch-host"
    assert hold.verdict.relinks_after == 1
    assert hold.verdict.connection_id_kept is False
    assert any(
        "switched over 140 ms after QEMU's setup" in n
        and "throttle was in place 80 ms after it, too late to stop the first pass" in n
        for n in hold.verdict.notes
    ), hold.verdict.notes


def test_waiting_on_both_hosts_events_leaves_no_reader_behind() -> None:
    """The agent waits on the source's and the destination's events at once; a wait that
    ends (an item, the timeout, or the agent stopping) leaves no reader on either queue to
    swallow the next event."""

    async def scenario() -> None:
        a: asyncio.Queue[str] = asyncio.Queue()
        b: asyncio.Queue[str] = asyncio.Queue()
        b.put_nowait("left")
        assert await first_items([a, b], 1.0) == [(1, "left")]
        assert await first_items([a, b], 0.01) == []
        waiting = asyncio.ensure_future(first_items([a, b], 10.0))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        a.put_nowait("later")
        b.put_nowait("later")
        await asyncio.sleep(0)
        assert (a.get_nowait(), b.get_nowait()) == ("later", "later")

    asyncio.run(scenario())
