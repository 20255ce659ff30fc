"""Only real clients hold a migration: the unit half.

A TCP connection to a SPICE port that never links a channel (no ticket, no link) is not a
client: the agent and the controller (one census, ``libvirt/real_clients.py``) do not wait
for it on the source, and a half-open connection from elsewhere on the destination does
not keep the release from coming. The lab halves, such connections held open during a
migration: the agent's in ``test_hostile_lab.py``, our controller's in
``test_taint_free.py``.
"""

from __future__ import annotations

from spice_libvirt.agent.plan import CallerValues, HeldMigration
from spice_libvirt.host.procnet import TcpSocket
from spice_libvirt.libvirt.connection import GraphicsEvent, endpoint
from spice_libvirt.libvirt.hold import DestinationLinks
from spice_libvirt.libvirt.real_clients import (
    LINK_REFUSAL_BYTES,
    SOURCE_CONNECTIONS_MAX,
    SourceChannels,
    answered,
)

CLIENT = "10.0.3.2"
STRANGER = "10.0.3.66"


def ev(phase: str, remote: str, at: float = 0.0, domain: str = "vm") -> GraphicsEvent:
    return GraphicsEvent(domain, phase, "10.0.1.2:5900", remote, at)


def test_endpoints_compare_across_spellings() -> None:
    assert endpoint("10.0.0.1:40000") == ("10.0.0.1", 40000)
    assert endpoint("[::1]:40000") == ("::1", 40000)
    assert endpoint("::1:40000") == ("::1", 40000)  # the kernel table's spelling
    assert endpoint("[::ffff:10.0.0.1]:5") == ("10.0.0.1", 5)


def _sock(remote: str, sent: int | None = None) -> TcpSocket:
    address, _, port = remote.rpartition(":")
    return TcpSocket("10.0.1.2", 5900, address, int(port), "01", int(port), sent)


def _peers(sockets: list[TcpSocket]) -> list[str]:
    return [s.peer for s in sockets]


def test_bare_connections_are_not_channels() -> None:
    sources = SourceChannels()
    for port in (40001, 40002, 40003):  # the client: connect, then initialize
        sources.absorb(ev("connect", f"{CLIENT}:{port}"))
        sources.absorb(ev("initialize", f"{CLIENT}:{port}"))
    sources.absorb(ev("connect", f"{STRANGER}:50000"))  # no ticket: never initializes
    sources.absorb(ev("connect", f"{CLIENT}:40009"))
    sources.absorb(ev("disconnect", f"{CLIENT}:40009"))
    established = [_sock(f"{CLIENT}:{p}", 1) for p in (40001, 40002, 40003)]
    # the events outrank the kernel: the stranger was answered, yet never linked
    established.append(_sock(f"{STRANGER}:50000", 5000))
    established.append(_sock(f"{CLIENT}:39000"))  # never reported, the kernel cannot say
    channels, bare = sources.split("vm", established)
    # 39000 was accepted before the subscription: counted
    assert _peers(channels) == [f"{CLIENT}:40001", f"{CLIENT}:40002", f"{CLIENT}:40003",
                                f"{CLIENT}:39000"]  # fmt: skip
    assert _peers(bare) == [f"{STRANGER}:50000"]
    # another domain's events are its own; forgotten once the kernel no longer shows them
    assert _peers(sources.split("other", [_sock(f"{STRANGER}:50000")])[0]) == [f"{STRANGER}:50000"]
    assert _peers(sources.split("vm", [_sock(f"{CLIENT}:40001")])[0]) == [f"{CLIENT}:40001"]
    assert _peers(sources.split("vm", [_sock(f"{STRANGER}:50000")])[0]) == [f"{STRANGER}:50000"]


def test_before_the_events_the_kernel_tells_an_answered_link_from_a_bare_connection() -> None:
    """What QEMU sent on a connection nobody reported: nothing (a bare connection), a
    refusal at most (spice-server closes those), or a link reply and its result (a
    channel)."""
    assert answered(_sock(f"{STRANGER}:1", 0)) is False
    assert answered(_sock(f"{STRANGER}:2", LINK_REFUSAL_BYTES)) is False
    assert answered(_sock(f"{CLIENT}:3", LINK_REFUSAL_BYTES + 4 + 4)) is True
    assert answered(_sock(f"{CLIENT}:4")) is None
    sockets = [_sock(f"{STRANGER}:1", 0), _sock(f"{CLIENT}:3", 300), _sock(f"{CLIENT}:4")]
    channels, bare = SourceChannels().split("vm", sockets)
    assert _peers(channels) == [f"{CLIENT}:3", f"{CLIENT}:4"]
    assert _peers(bare) == [f"{STRANGER}:1"]


def test_a_flood_of_connections_is_bounded() -> None:
    sources = SourceChannels()
    for port in range(SOURCE_CONNECTIONS_MAX + 500):
        sources.absorb(ev("connect", f"{STRANGER}:{port}"))
    assert len(sources._phase["vm"]) == SOURCE_CONNECTIONS_MAX


def test_a_stranger_half_way_on_the_destination_does_not_delay_the_release() -> None:
    links = DestinationLinks("vm", 0.0, frozenset({CLIENT}))
    links.absorb(ev("connect", f"{STRANGER}:50000", 0.1))  # held open, never links
    for i, port in enumerate((41001, 41002)):
        links.absorb(ev("connect", f"{CLIENT}:{port}", 0.2 + i / 10))
        links.absorb(ev("initialize", f"{CLIENT}:{port}", 0.3 + i / 10))
    assert links.complete(2)
    links.absorb(ev("connect", f"{CLIENT}:41003", 0.5))  # the client's own link half-way
    assert not links.complete(2)
    # without the client's addresses (unknown), any half-way link still counts
    anyone = DestinationLinks("vm", 0.0)
    anyone.absorb(ev("connect", f"{STRANGER}:50000", 0.1))
    anyone.absorb(ev("connect", f"{CLIENT}:41001", 0.2))
    anyone.absorb(ev("initialize", f"{CLIENT}:41001", 0.3))
    assert not anyone.complete(1)


def test_the_agent_plan_releases_despite_a_stranger() -> None:
    plan = HeldMigration(
        domain="vm",
        started_at=0.0,
        caller=CallerValues(100, 300),
        client_channels=(f"{CLIENT}:40001", f"{CLIENT}:40002"),
        hold_timeout_s=15.0,
        margin_ms=0.0,
    )
    plan.destination_event(ev("connect", f"{STRANGER}:50000", 0.1))
    for port in (41001, 41002):
        plan.destination_event(ev("connect", f"{CLIENT}:{port}", 0.5))
        plan.destination_event(ev("initialize", f"{CLIENT}:{port}", 0.8))
    when, reason = plan.release_due(2.0)
    assert when is None
    assert reason is not None
    assert reason.kind == "linked"
    assert reason.why.startswith("destination initialized 2/2")
