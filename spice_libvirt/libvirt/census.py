"""The SPICE clients of a domain on the source, without tainting it: the kernel's view.

``query-spice`` through the monitor passthrough names every session and channel, but it
taints the domain (``custom-monitor``); libvirt's public API lists no clients at all (its
graphics events only say what happened *since* one subscribed). The kernel knows: every
SPICE channel is one established TCP connection on one of the domain's SPICE ports, owned
by the domain's QEMU process (:mod:`spice_libvirt.host.procnet`, the agent's source too).

A connection is not a client, though: anyone who reaches the port can hold one open and
no ticket is needed for that. Only connections that linked a channel are counted, by the
census the agent takes too (:mod:`spice_libvirt.libvirt.real_clients`; the controller
subscribes to graphics events only when it starts, so the kernel's count of what QEMU sent
on each connection decides), and the others are named in the report, never waited for.

That view needs the source QEMU on this machine -- the controller run on the source
hypervisor, as ``ansible/evacuate.yml`` runs it -- and root; it gives each channel's client
address and whether it came in on the TLS port, not its type nor the session's connection
id. So the taint-free verdict follows each client *by its address* through libvirt's
graphics events (:class:`spice_libvirt.migration.verdict.LinkedClient`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from spice_libvirt import errors
from spice_libvirt.host import procnet
from spice_libvirt.host.trusted_qemu import LIBVIRT_QEMU_RUN_DIR, expected_qemu, trusted_qemu_pid
from spice_libvirt.libvirt.connection import Connection, endpoint
from spice_libvirt.libvirt.errors import PreflightError
from spice_libvirt.libvirt.hold import DestinationLinks
from spice_libvirt.libvirt.preflight import source_sessions, spice_graphics
from spice_libvirt.libvirt.real_clients import SourceChannels
from spice_libvirt.libvirt.settle import reconnected_at
from spice_libvirt.migration.evidence import Sessions, SpiceSession, parse_channel_name
from spice_libvirt.migration.verdict import LinkedClient
from spice_libvirt.migration.witness import MigrationWitness


def address_of(remote: str) -> str:
    """``"10.0.0.3:4711"`` -> ``"10.0.0.3"``; ``"[::1]:4711"`` -> ``"::1"`` (the client's
    address, as libvirt's graphics events and the kernel's tables both give it; an
    IPv4-mapped address as IPv4)."""
    host, _, _ = remote.rpartition(":")
    return endpoint(remote)[0] if host else remote


@dataclasses.dataclass(frozen=True)
class KernelClient:
    """The channels one client address holds open on the source's SPICE ports."""

    address: str
    #: the client end of each channel (``"ip:port"``) -> it came in on the TLS port
    channels: Mapping[str, bool]

    @property
    def tls_channels(self) -> int:
        return sum(self.channels.values())


@dataclasses.dataclass(frozen=True)
class KernelCensus:
    """Every client of the domain's SPICE server now, from its QEMU's sockets."""

    pid: int
    clients: tuple[KernelClient, ...]
    #: connections to the SPICE ports that never linked a channel (``ip:port``): not waited for
    bare: tuple[str, ...] = ()
    #: the median of the kernel's RTT of the linked channels (s): how long the clients will
    #: take to link to the destination; None when the kernel did not say
    rtt_s: float | None = None

    @property
    def channels(self) -> int:
        return sum(len(c.channels) for c in self.clients)

    def describe(self) -> str:
        who = ", ".join(
            f"{c.address} ({len(c.channels)} channel(s), {c.tls_channels} on TLS)"
            for c in self.clients
        )
        text = f"{who or 'no SPICE client'} (the kernel's sockets of QEMU {self.pid})"
        if self.bare:
            text += (
                f"; not waited for: {len(self.bare)} connection(s) that never linked a "
                f"channel ({', '.join(self.bare[:3])})"
            )
        return text


def census_from_sockets(
    domain: str,
    pid: int,
    sockets: procnet.ProcessSockets,
    port: int | None,
    tls_port: int | None,
) -> KernelCensus:
    """Group the connections on the SPICE ports that linked a channel by client address
    (pure: the kernel's evidence, no graphics event heard yet)."""
    spice = procnet.spice_sockets(sockets, {p for p in (port, tls_port) if p})
    linked, bare = SourceChannels().split(domain, spice)
    by_address: dict[str, dict[str, bool]] = {}
    for s in linked:
        remote = f"[{s.remote}]:{s.remote_port}" if ":" in s.remote else s.peer
        by_address.setdefault(s.remote, {})[remote] = s.local_port == tls_port
    clients = tuple(
        KernelClient(a, dict(sorted(ch.items()))) for a, ch in sorted(by_address.items())
    )
    rtts = sorted(s.rtt for s in linked if s.rtt is not None)
    rtt = rtts[len(rtts) // 2] if rtts else None
    return KernelCensus(pid, clients, tuple(sorted(s.peer for s in bare)), rtt)


def qemu_run_dir(source_uri: str) -> Path | None:
    """Where the source libvirtd keeps its QEMUs' pid files, when it runs on this machine:
    ``/run/libvirt/qemu`` for ``qemu:///system``, beside the socket for
    ``qemu+unix:///system?socket=.../libvirt-sock`` (a libvirtd with its own run directory,
    as the labs run them); None for a remote one."""
    parts = urllib.parse.urlsplit(source_uri)
    if parts.hostname not in (None, ""):
        return None
    socket = dict(urllib.parse.parse_qsl(parts.query)).get("socket")
    if socket:
        return Path(socket).parent / "qemu"
    return LIBVIRT_QEMU_RUN_DIR if parts.path.rstrip("/") == "/system" else None


def kernel_census(domain: str, live_xml: str, source_uri: str) -> KernelCensus:
    """The source QEMU's SPICE clients now, read from its sockets (only connections that
    linked a channel); the process is the one libvirt recorded and checked
    (:mod:`spice_libvirt.host.trusted_qemu`: an impostor that merely looks like the domain's
    QEMU is never read). :class:`~spice_libvirt.errors.AgentError`
    when the source is not on this machine or cannot be checked (not root)."""
    graphics = spice_graphics(live_xml)
    if graphics is None or (graphics[1] is None and graphics[2] is None):
        raise errors.AgentError("the domain has no SPICE port")
    run_dir = qemu_run_dir(source_uri)
    if run_dir is None:
        raise errors.AgentError(f"the source {source_uri} is not on this machine")
    expected = expected_qemu(domain, live_xml)
    pid = trusted_qemu_pid(expected, run_dir=run_dir, same_netns=False)
    return census_from_sockets(domain, pid, procnet.snapshot(pid), graphics[1], graphics[2])


def linked_counts(
    links: DestinationLinks,
    address: str,
    before: float,
    tls_port: int | None,
    *,
    until: float | None = None,
) -> tuple[int, int, bool]:
    """For one client address, from the destination's graphics events: how many channels
    were initialized before ``before`` (when spice-server was told the migration ended) and
    are still connected, how many of those on the TLS port, and whether a channel
    initialized before it was dropped later.
    ``until``: the events up to that moment only (what was linked *then*)."""
    initialized: dict[str, bool] = {}
    dropped = False
    for event in links.events:
        if address_of(event.remote) != address or (until is not None and event.at >= until):
            continue
        if event.phase == "initialize" and event.at < before:
            initialized[event.remote] = _port(event.local) == tls_port
        elif event.phase == "disconnect" and event.remote in initialized:
            del initialized[event.remote]
            dropped = True
    return len(initialized), sum(initialized.values()), dropped


def linked_after(links: DestinationLinks, address: str, at: float) -> int:
    """How many of ``address``'s channels were initialized on the destination at or after
    ``at`` (that end) and are still connected: links that came too late to be kept."""
    live: set[str] = set()
    for event in links.events:
        if address_of(event.remote) != address:
            continue
        if event.phase == "initialize" and event.at >= at:
            live.add(event.remote)
        elif event.phase == "disconnect":
            live.discard(event.remote)
    return len(live)


def _port(address: str) -> int | None:
    tail = address.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def reconnected_from(links: DestinationLinks, address: str, split: float) -> bool:
    """A connect from ``address`` reached the destination at or after ``split`` (the
    client left the source) from a port that was not one of its pre-links: a switch-host."""
    return reconnected_at(links, split, frozenset({address})) is not None


def follow_client(
    links: DestinationLinks,
    address: str,
    channels: int,
    *,
    spice_end: float,
    left_source: float,
    tls_port: int | None = None,
    tls_channels: int = 0,
) -> LinkedClient:
    """One client's fate by its address, from the destination's graphics events: the
    evidence the taint-free controller and the host agent both hand the verdict.
    ``spice_end``: when QEMU told spice-server the migration ended (what was linked before
    it could be kept; a link made while the paused guest's last state moved still counts);
    ``left_source``: when the client began leaving the source (a connect after it
    from a new port is its switch-host reconnect)."""
    linked, linked_tls, dropped = linked_counts(links, address, spice_end, tls_port)
    return LinkedClient(
        address=address,
        channels=channels,
        tls_channels=tls_channels,
        prelinked=linked,
        prelinked_tls=linked_tls,
        dropped=dropped,
        reconnected=reconnected_from(links, address, left_source),
        later=linked_after(links, address, spice_end),
    )


CensusSource = Literal["query-spice", "kernel", "embedded", "none"]


@dataclasses.dataclass(frozen=True)
class Census:
    """The clients a migration holds for and is judged by, and where they were counted."""

    how: CensusSource
    #: sessions with connection ids and channel types: query-spice's, or our client's own
    sessions: Sessions
    #: the kernel's view (every client, counted by address), when it could be read
    kernel: KernelCensus | None = None

    @property
    def has_client(self) -> bool:
        return bool(self.sessions) or (self.kernel is not None and self.kernel.channels > 0)

    @property
    def tainted(self) -> bool:
        return self.how == "query-spice"


def witness_sessions(session_id: int, channels: list[str]) -> Sessions:
    """Our embedded client's own session, as it knows it (TLS per channel not said)."""
    session = SpiceSession(session_id)
    for name in channels:
        session.add(parse_channel_name(name), None)
    return {session_id: session}


async def take_census(
    src: Connection,
    dom: Any,
    name: str,
    live_xml: str,
    *,
    allow_taint: bool,
    witness: MigrationWitness | None,
    note: Callable[[str], None],
) -> Census:
    """Count the source's clients, tainting the domain only when allowed.

    * ``allow_taint``: ``query-spice`` through the monitor passthrough (connection ids,
      channel types and TLS per channel), as long as it answers;
    * otherwise the kernel's sockets of the source QEMU (taint-free), and our embedded
      client's own session when one is attached (its record judges it);
    * neither: a :class:`PreflightError` that says what would work (nothing changed).
    """
    if allow_taint:
        sessions, queried = await source_sessions(src, dom, note)
        if queried:
            return Census("query-spice", sessions)
    kernel: KernelCensus | None = None
    why = "not counted"
    try:
        kernel = await asyncio.to_thread(kernel_census, name, live_xml, src.uri)
        note(f"clients on the source: {kernel.describe()}")
    except errors.AgentError as exc:
        why = str(exc)
    if witness is not None:
        return Census("embedded", witness_sessions(witness.session_id, witness.channels), kernel)
    if kernel is not None:
        return Census("kernel", {}, kernel)
    raise PreflightError(
        f"the SPICE clients of {name} cannot be seen without tainting the domain: {why}. "
        "Run spice-libvirt on the source host as root (it reads the source QEMU's sockets), "
        "or allow libvirt's monitor passthrough (--allow-taint, allow_taint = true; the "
        "domain is then marked tainted 'custom-monitor'). Nothing was changed"
    )


__all__ = [
    "Census",
    "CensusSource",
    "KernelCensus",
    "KernelClient",
    "address_of",
    "census_from_sockets",
    "follow_client",
    "kernel_census",
    "linked_after",
    "linked_counts",
    "reconnected_from",
    "take_census",
    "witness_sessions",
]
