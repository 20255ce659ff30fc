"""The taint-free evidence, without a lab: the kernel's census of a QEMU's SPICE clients,
each client followed by its address through libvirt's graphics events, and the verdict
and the settle rules on that evidence. The lab runs are in ``tests/test_taint_free.py``."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt import errors
from spice_libvirt.host import procnet
from spice_libvirt.libvirt.census import (
    address_of,
    census_from_sockets,
    kernel_census,
    linked_counts,
    qemu_run_dir,
    reconnected_from,
    take_census,
)
from spice_libvirt.libvirt.connection import GraphicsEvent
from spice_libvirt.libvirt.errors import PreflightError
from spice_libvirt.libvirt.hold import DestinationLinks
from spice_libvirt.libvirt.request import LibvirtMigrationRequest
from spice_libvirt.migration.verdict import LinkedClient, Settling, VerdictEvidence, judge, settled

SPICE, TLS = 5900, 5901


def _sock(
    local: str, lport: int, remote: str, rport: int, state: str = "01", sent: int | None = 900
) -> procnet.TcpSocket:
    inode = lport * 100000 + rport
    return procnet.TcpSocket(local, lport, remote, rport, state, inode, sent)


def test_census_groups_channels_by_client_address_with_tls_by_port() -> None:
    sockets = procnet.ProcessSockets(
        4242,
        (
            _sock("0.0.0.0", SPICE, "0.0.0.0", 0, "0A"),
            _sock("0.0.0.0", TLS, "0.0.0.0", 0, "0A"),
            _sock("10.0.0.2", SPICE, "10.0.0.3", 40001),
            _sock("10.0.0.2", TLS, "10.0.0.3", 40002),
            _sock("10.0.0.2", TLS, "10.0.0.9", 41000),
            _sock("10.0.0.2", 49152, "10.0.0.7", 4444),  # the migration stream, not SPICE
            _sock("::1", SPICE, "::1", 5000),
        ),
    )
    census = census_from_sockets("vm", 4242, sockets, SPICE, TLS)
    assert [(c.address, dict(c.channels)) for c in census.clients] == [
        ("10.0.0.3", {"10.0.0.3:40001": False, "10.0.0.3:40002": True}),
        ("10.0.0.9", {"10.0.0.9:41000": True}),
        ("::1", {"[::1]:5000": False}),
    ]
    assert census.channels == 4
    assert [c.tls_channels for c in census.clients] == [1, 1, 0]
    assert "10.0.0.3 (2 channel(s), 1 on TLS)" in census.describe()
    assert address_of("[::1]:5000") == "::1"
    assert address_of("10.0.0.3:40001") == "10.0.0.3"


def test_census_counts_only_connections_that_linked() -> None:
    """A bare TCP connection (QEMU sent nothing on it) or one it refused (194 bytes)
    is no client, even from a client's own address; with nothing else, no client at all."""
    client = [_sock("10.0.0.2", SPICE, "10.0.0.3", 40000 + i) for i in range(5)]
    bare = _sock("10.0.0.2", SPICE, "10.0.0.3", 45000, sent=0)
    stranger = _sock("10.0.0.2", TLS, "10.0.0.66", 50000, sent=194)
    census = census_from_sockets(
        "vm", 4242, procnet.ProcessSockets(4242, (*client, bare, stranger)), SPICE, TLS
    )
    assert [(c.address, len(c.channels)) for c in census.clients] == [("10.0.0.3", 5)]
    assert census.channels == 5
    assert census.bare == ("10.0.0.3:45000", "10.0.0.66:50000")
    assert census.rtt_s is None  # the text table says no RTT: the hold assumes one
    assert "not waited for: 2 connection(s) that never linked" in census.describe()
    alone = census_from_sockets(
        "vm", 4242, procnet.ProcessSockets(4242, (bare, stranger)), SPICE, TLS
    )
    assert alone.clients == ()
    assert alone.channels == 0
    assert alone.describe().startswith("no SPICE client")


def test_the_clients_rtt_is_the_median_of_their_linked_channels() -> None:
    """What the switchover hold takes for the client's link time: a stranger's bare
    connection from across the world does not count."""
    client = [
        dataclasses.replace(_sock("10.0.0.2", SPICE, "10.0.0.3", 40000 + i), rtt=rtt)
        for i, rtt in enumerate((0.149, 0.151, 0.150, 0.300, 0.148))
    ]
    far = dataclasses.replace(_sock("10.0.0.2", SPICE, "10.0.0.66", 50000, sent=0), rtt=2.0)
    census = census_from_sockets(
        "vm", 4242, procnet.ProcessSockets(4242, (*client, far)), SPICE, TLS
    )
    assert census.rtt_s == 0.150


def test_the_source_qemus_pid_file_is_the_source_libvirtds() -> None:
    assert qemu_run_dir("qemu:///system") == Path("/run/libvirt/qemu")
    sock = "qemu+unix:///system?socket=/run/lab/A/run/libvirt/libvirt-sock"
    assert qemu_run_dir(sock) == Path("/run/lab/A/run/libvirt/qemu")
    assert qemu_run_dir("qemu+tls://hv2/system") is None
    assert qemu_run_dir("qemu:///session") is None


def test_no_census_of_a_source_elsewhere_or_without_libvirts_record(tmp_path: Path) -> None:
    """The kernel's view only of the QEMU libvirt recorded (host.trusted_qemu): a remote
    source, or a domain with no pid file where its libvirtd keeps them, is no census."""
    xml = (
        "<domain><name>vm</name><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<graphics type='spice' port='5900'/></devices></domain>"
    )
    with pytest.raises(errors.AgentError, match="not on this machine"):
        kernel_census("vm", xml, "qemu+ssh://hv2/system")
    sock = tmp_path / "libvirt-sock"
    (tmp_path / "qemu").mkdir()
    with pytest.raises(errors.AgentError, match="no pid file"):
        kernel_census("vm", xml, f"qemu+unix:///system?socket={sock}")


def _links(*events: tuple[str, str, str, float]) -> DestinationLinks:
    links = DestinationLinks("vm", 0.0)
    for phase, local, remote, at in events:
        links.absorb(GraphicsEvent("vm", phase, local, remote, at))
    return links


def test_linked_counts_and_reconnects_follow_one_address() -> None:
    links = _links(
        ("connect", "10.0.0.4:5901", "10.0.0.3:1", 1.0),
        ("initialize", "10.0.0.4:5901", "10.0.0.3:1", 1.1),
        ("connect", "10.0.0.4:5900", "10.0.0.3:2", 1.2),  # NEED_SECURED: never initialized
        ("disconnect", "10.0.0.4:5900", "10.0.0.3:2", 1.3),
        ("connect", "10.0.0.4:5900", "10.0.0.3:3", 1.3),
        ("initialize", "10.0.0.4:5900", "10.0.0.3:3", 1.4),
        ("connect", "10.0.0.4:5900", "10.0.0.8:1", 1.5),
        ("initialize", "10.0.0.4:5900", "10.0.0.8:1", 1.6),
        ("initialize", "10.0.0.4:5900", "10.0.0.3:9", 5.0),  # after the switchover
    )
    assert linked_counts(links, "10.0.0.3", 2.0, 5901) == (2, 1, False)
    assert linked_counts(links, "10.0.0.8", 2.0, 5901) == (1, 0, False)
    assert not reconnected_from(links, "10.0.0.3", 3.0)
    links.absorb(GraphicsEvent("vm", "disconnect", "10.0.0.4:5901", "10.0.0.3:1", 3.5))
    links.absorb(GraphicsEvent("vm", "connect", "10.0.0.4:5900", "10.0.0.3:77", 3.6))
    assert linked_counts(links, "10.0.0.3", 2.0, 5901) == (1, 0, True)
    assert reconnected_from(links, "10.0.0.3", 3.0)
    assert not reconnected_from(links, "10.0.0.8", 3.0)


@pytest.mark.parametrize(
    ("status", "client", "path", "kept"),
    [
        ("completed", LinkedClient("10.0.0.3", 5, prelinked=5), "seamless", True),
        ("completed", LinkedClient("10.0.0.3", 5, prelinked=5, reconnected=True), "switch-host", False),
        ("completed", LinkedClient("10.0.0.3", 5, prelinked=0, reconnected=True), "switch-host", False),
        ("completed", LinkedClient("10.0.0.3", 5, prelinked=4), "failed", False),
        ("completed", LinkedClient("10.0.0.3", 5, prelinked=0), "lost", False),
        ("completed", LinkedClient("10.0.0.3", 5, prelinked=5, dropped=True), "failed", False),
        ("cancelled", LinkedClient("10.0.0.3", 5, prelinked=5), "cancelled", False),
        ("failed", LinkedClient("10.0.0.3", 5), "failed", False),
    ],
)  # fmt: skip
def test_verdict_on_a_client_followed_by_its_address(
    status: str, client: LinkedClient, path: str, kept: bool
) -> None:
    verdict = judge(VerdictEvidence(status=status, before={}, linked_clients=(client,)))
    (v,) = verdict.clients
    assert (v.path, v.connection_id_kept) == (path, kept)
    assert v.evidence == "graphics-events"
    assert v.connection_id_before is None
    assert v.address == "10.0.0.3"
    assert v.note
    assert verdict.outcome == ("client-lost" if path == "lost" else path)


def test_a_tls_channel_prelinked_in_plain_text_is_a_downgrade() -> None:
    client = LinkedClient("10.0.0.3", 3, tls_channels=3, prelinked=3, prelinked_tls=2)
    verdict = judge(VerdictEvidence(status="completed", before={}, linked_clients=(client,)))
    assert verdict.tls_downgraded
    assert verdict.tls_downgraded_channels == ["10.0.0.3: 1 of 3 TLS channel(s)"]
    assert not verdict.seamless


def test_settle_on_address_evidence() -> None:
    base: dict[str, Any] = {"before": {}, "after": None, "returned_at": 10.0, "rtt": 0.3}
    # no client at all (no linked evidence either): nothing to follow
    assert settled(Settling(now=10.0, **base)).done
    # kept so far: wait one RTT + margin for a reconnect, then judge
    assert not settled(Settling(now=10.1, linked_kept=True, **base)).done
    assert settled(Settling(now=10.5, linked_kept=True, **base)).done
    # not (yet) kept: up to the bound
    waiting = settled(Settling(now=10.5, linked_kept=False, **base))
    assert not waiting.done
    assert waiting.recheck_at == 16.0


class _NoQemuHere:
    """A stand-in for a libvirt connection to a source whose QEMU is on another machine
    (the kernel census cannot be taken here): only what ``take_census`` calls."""

    uri = "qemu+tls://elsewhere/system"

    async def call(self, fn: Any, what: str, timeout: float | None = None) -> Any:
        return fn()


def test_no_census_without_taint_is_a_preflight_refusal_that_says_what_works() -> None:
    notes: list[str] = []
    with pytest.raises(PreflightError) as err:
        asyncio.run(
            take_census(
                _NoQemuHere(),  # type: ignore[arg-type]
                None,
                "vm",
                "<domain><devices><graphics type='spice' port='5900'/></devices></domain>",
                allow_taint=False,
                witness=None,
                note=notes.append,
            )
        )
    text = str(err.value)
    assert "without tainting" in text
    assert "--allow-taint" in text
    assert "Nothing was changed" in text


def test_the_qmp_hold_needs_allow_taint() -> None:
    with pytest.raises(ValueError, match="allow_taint"):
        LibvirtMigrationRequest(domain="vm", destination_uri="qemu+tls://b/system", hold="qmp")
    ok = LibvirtMigrationRequest(
        domain="vm", destination_uri="qemu+tls://b/system", hold="qmp", allow_taint=True
    )
    assert ok.allow_taint
    assert not LibvirtMigrationRequest(domain="vm", destination_uri="x").allow_taint
