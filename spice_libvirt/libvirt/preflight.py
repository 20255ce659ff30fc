"""Checks before a libvirt migration changes anything, and the facts they leave behind.

Read-only: the domain's state and XML, both hypervisors' type and version, the clients on
the source (:mod:`spice_libvirt.libvirt.census`), and which channels the
destination graphics would accept in plain text -- the destination domain is built from
the source's XML, so its ``<graphics>`` (``defaultMode``, ``<channel mode>``, a plain
``port``) says it. A refusal raises :class:`PreflightError` with nothing changed.

One exception to read-only, and only when asked: a SPICE ticket that would expire before
the client can link to the destination is extended (``extend_ticket_s``, as VDSM does);
without that request such a ticket is refused like everything else.
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, cast

from spice_libvirt import errors
from spice_libvirt.libvirt.connection import Connection, require_libvirt
from spice_libvirt.libvirt.errors import PreflightError
from spice_libvirt.libvirt.request import LibvirtMigrationReport, LibvirtMigrationRequest
from spice_libvirt.migration.evidence import Sessions, sessions_from_query_spice
from spice_libvirt.migration.policy import (
    ChannelMode,
    ChannelSecurity,
    counted_tls_risk,
    libvirt_plain_port_risk,
)
from spice_libvirt.migration.progress import RunLog


def spice_graphics(xml: str) -> tuple[str | None, int | None, int | None] | None:
    """(listen, port, tls_port) of the domain's first SPICE graphics, None if it has none."""
    root = ET.fromstring(xml)
    node = root.find("./devices/graphics[@type='spice']")
    if node is None:
        return None
    port = int(node.get("port", "-1"))
    tls = int(node.get("tlsPort", "-1"))
    return node.get("listen"), (port if port > 0 else None), (tls if tls > 0 else None)


def graphics_security(xml: str) -> ChannelSecurity | None:
    """Which channels the domain's SPICE graphics accept in plain text (None: no SPICE).

    ``defaultMode`` and ``<channel name mode>`` map to QEMU's tls-channel/plaintext-channel;
    a plain port exists when the running domain shows one (``port`` > 0).
    """
    root = ET.fromstring(xml)
    node = root.find("./devices/graphics[@type='spice']")
    if node is None:
        return None
    modes: dict[str, ChannelMode] = {}
    for channel in node.findall("channel"):
        mode = channel.get("mode", "any")
        if mode in ("any", "secure", "insecure") and channel.get("name"):
            modes[str(channel.get("name"))] = cast(ChannelMode, mode)
    default = node.get("defaultMode", "any")
    return ChannelSecurity(
        default=cast(ChannelMode, default if default in ("secure", "insecure") else "any"),
        modes=modes,
        plain_port=int(node.get("port", "-1")) > 0,
    )


def graphics_uri_without_plain_port(uri: str) -> str:
    """``spice://h:5900?tlsPort=5901&tlsSubject=..`` -> ``spice://h?tlsPort=5901&...``."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


#: from the preflight to libvirt's client_migrate_info (Begin, Prepare with the destination
#: QEMU's start): measured 0.7 s in the lab, doubled for a loaded host
TICKET_PREPARE_S = 2.0
#: round trips a client needs to link every channel to the destination, TLS handshakes
#: included (6 measured in plain TCP, rtt-seamless.md; TLS adds about 2)
TICKET_LINK_RTTS = 10


def ticket_valid_to(xml: str) -> dt.datetime | None:
    """When the SPICE ticket expires (``passwdValidTo``, UTC), None when it never does.

    libvirt shows ``passwdValidTo`` without the secure flag; the ticket itself never
    appears in the XML read here.
    """
    node = ET.fromstring(xml).find("./devices/graphics[@type='spice']")
    value = node.get("passwdValidTo") if node is not None else None
    if not value:
        return None
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)


def ticket_needed_s(req: LibvirtMigrationRequest) -> float:
    """How long the ticket must stay valid for the client to link to the destination: the
    preparation, then the link -- from the client's measured RTT when known, bounded by
    the link wait (``hold_timeout``) and taken as that bound when the RTT is unknown."""
    link = req.hold_timeout
    if req.witness_one_way_ms is not None:
        rtt = 2.0 * req.witness_one_way_ms / 1000.0
        link = min(req.hold_timeout, TICKET_LINK_RTTS * rtt + 1.0)
    return TICKET_PREPARE_S + link


async def check_ticket(
    src: Connection, dom: Any, xml: str, req: LibvirtMigrationRequest, note: Callable[[str], None]
) -> None:
    """Refuse (or, with ``extend_ticket_s``, extend) a ticket that would expire before the
    client can link to the destination: the destination QEMU gets the same expiry, and a
    client refused there falls back to switch-host and then loses its session."""
    valid_to = ticket_valid_to(xml)
    if valid_to is None:
        return
    if req.plain:  # the baseline is libvirt as it is: no check of ours
        note(f"plain migration: the SPICE ticket (valid to {valid_to:%H:%M:%S} UTC) not checked")
        return
    now = dt.datetime.now(dt.UTC)
    left = (valid_to - now).total_seconds()
    needed = ticket_needed_s(req)
    if left >= needed:
        note(
            f"SPICE ticket valid until {valid_to:%H:%M:%S} UTC ({left:.0f} s; needed ~{needed:.0f} s)"
        )
        return
    expired = "expired" if left <= 0 else f"expires in {left:.0f} s"
    if req.extend_ticket_s is None:
        raise PreflightError(
            f"the SPICE ticket {expired} (passwdValidTo {valid_to:%Y-%m-%dT%H:%M:%S} UTC); the "
            f"client needs about {needed:.0f} s to link to the destination and would be "
            "refused there. Extend it for the migration (extend_ticket_s, --extend-ticket S; "
            "VDSM uses 120 s) or set a new ticket. Nothing was changed"
        )
    extend = max(req.extend_ticket_s, needed)
    new_to = (now + dt.timedelta(seconds=extend)).replace(microsecond=0)
    await _set_ticket_expiry(src, dom, new_to)
    note(
        f"SPICE ticket {expired}: extended to {new_to:%H:%M:%S} UTC (+{extend:.0f} s, "
        "connected='keep') for the migration"
    )


async def _set_ticket_expiry(src: Connection, dom: Any, valid_to: dt.datetime) -> None:
    """A new ``passwdValidTo`` on the live graphics, the ticket unchanged (read with the
    secure flag, written back through virDomainUpdateDeviceFlags, never logged)."""
    lv = require_libvirt()
    secure = await src.call(lambda: dom.XMLDesc(lv.VIR_DOMAIN_XML_SECURE), "domain XML (secure)")
    node = ET.fromstring(secure).find("./devices/graphics[@type='spice']")
    if node is None or not node.get("passwd"):
        raise PreflightError("the SPICE ticket could not be read back to extend it")
    node.set("passwdValidTo", valid_to.strftime("%Y-%m-%dT%H:%M:%S"))
    node.set("connected", "keep")
    node.tail = None
    device = ET.tostring(node, encoding="unicode")
    await src.call(
        lambda: dom.updateDeviceFlags(device, lv.VIR_DOMAIN_AFFECT_LIVE),
        "extend the SPICE ticket",
    )


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


async def preflight(
    src: Connection,
    dst: Connection,
    req: LibvirtMigrationRequest,
    report: LibvirtMigrationReport,
    log: RunLog,
) -> tuple[Any, str]:
    """Check the domain and both hosts; (the domain, its live XML). Raises PreflightError."""
    lv = require_libvirt()
    start = time.monotonic()
    dom = await src.lookup(req.domain)
    name = await src.call(dom.name, "domain name")
    report.domain = name
    state = (await src.call(dom.state, "domain state"))[0]
    if state != lv.VIR_DOMAIN_RUNNING:
        raise PreflightError(
            f"domain {name} is not running on {src.uri} (state {state}); nothing was changed"
        )
    xml = await src.call(dom.XMLDesc, "domain XML")
    spice = spice_graphics(xml)
    if spice is None or (spice[1] is None and spice[2] is None):
        raise PreflightError(
            f"domain {name} has no SPICE graphics with a port; "
            "use plain 'virsh migrate' for it (nothing was changed)"
        )
    report.source.spice_host, report.source.spice_port, report.source.spice_tls_port = spice
    report.source.status_before = "running"
    await _check_destination(src, dst, dom, name, report)
    log.record("preflight", start, detail=f"{name}: SPICE {spice}")
    return dom, xml


async def _check_destination(
    src: Connection, dst: Connection, dom: Any, name: str, report: LibvirtMigrationReport
) -> None:
    """Reachable (it is: dst is open), same hypervisor, QEMU not older, not running there."""
    lv = require_libvirt()
    uuid = await src.call(dom.UUIDString, "domain UUID")
    src_type = await src.call(src.conn.getType, "type")
    dst_type = await dst.call(dst.conn.getType, "type")
    if src_type != dst_type:
        raise PreflightError(f"destination runs {dst_type}, the source {src_type}")
    src_ver = await src.call(src.conn.getVersion, "hypervisor version")
    dst_ver = await dst.call(dst.conn.getVersion, "hypervisor version")
    report.source.qemu_version = _version(src_ver)
    report.destination.qemu_version = _version(dst_ver)
    if dst_ver < src_ver:
        raise PreflightError(
            f"destination QEMU {_version(dst_ver)} is older than the source's "
            f"{_version(src_ver)}: a migration to an older QEMU is not supported"
        )

    def running_there() -> bool:
        try:
            other = dst.conn.lookupByUUIDString(uuid)
        except lv.libvirtError:
            return False
        return bool(other.isActive())

    if await dst.call(running_there, "look up the domain on the destination"):
        raise PreflightError(f"domain {name} already runs on the destination {dst.uri}")


async def source_sessions(
    src: Connection, dom: Any, note: Callable[[str], None]
) -> tuple[Sessions, bool]:
    """The clients on the source (query-spice lists every channel here), and whether the
    passthrough answered at all. It taints the domain: only when the operator allowed it."""
    try:
        reply = await src.qemu_monitor(dom, {"execute": "query-spice"})
    except errors.LibvirtError as exc:
        note(f"query-spice on the source failed ({exc}): no hold, QMP-less verdict")
        return {}, False
    return sessions_from_query_spice(reply), True


def check_tls(
    req: LibvirtMigrationRequest,
    clients: Sessions,
    xml: str,
    note: Callable[[str], None],
    counted_tls: int | None = None,
) -> str | None:
    """TLS never downgraded, on the libvirt path: the graphics URI to use, or a refusal.

    libvirt tells the client the destination's plain port from its migration cookie even
    when the graphics URI names none (``qemuMigrationSrcGraphicsRelocate`` keeps the
    cookie's port unless the URI has one), so the URI cannot withhold it. The protection is
    the domain's own graphics: a channel the destination refuses in plain text
    (``defaultMode='secure'`` or ``<channel mode='secure'>``) gets NEED_SECURED and the
    client links it on TLS -- there the URI keeps its port (the client's NAT view, and the
    plain link spice-gtk needs to get NEED_SECURED). A client channel on TLS that the
    destination would accept in plain text is a downgrade risk: refused by default, or
    with ``warn`` migrated with a note and a URI without a plain port of ours.

    ``counted_tls``: the clients' channels on TLS as the kernel counts them (taint-free,
    types unknown), which then decides instead of ``clients``.
    """
    uri = req.graphics_uri
    security = graphics_security(xml)
    risk: str | None = None
    if security is not None:
        risk = (
            libvirt_plain_port_risk(clients, security)
            if counted_tls is None
            else counted_tls_risk(counted_tls, security)
        )
    if risk is None:
        return uri
    if req.tls_downgrade_policy == "refuse" or req.require_seamless:
        raise PreflightError(
            f"TLS downgrade risk: {risk}; refused (tls_downgrade_policy=refuse; 'warn' "
            "migrates anyway). Nothing was changed"
        )
    note(f"TLS downgrade risk (tls_downgrade_policy=warn): {risk}")
    if uri and urllib.parse.urlsplit(uri).port is not None:
        uri = graphics_uri_without_plain_port(uri)
        note(f"graphics URI without its plain port ({uri}); libvirt's cookie may still add one")
    return uri


__all__ = [
    "TICKET_LINK_RTTS",
    "TICKET_PREPARE_S",
    "check_ticket",
    "check_tls",
    "graphics_security",
    "graphics_uri_without_plain_port",
    "preflight",
    "source_sessions",
    "spice_graphics",
    "ticket_needed_s",
    "ticket_valid_to",
]
