"""A mark on a domain that says "spice-libvirt's controller holds this migration".

The host agent holds every outgoing migration with SPICE clients; our own ``migrate`` and
``evacuate`` hold theirs themselves. Both holding one migration would fight over its speed,
so the controller marks the domain before it migrates and the agent leaves marked domains
alone. The mark is live domain metadata in our own XML namespace: public API, no taint, and
visible to an agent on the source host whatever machine the controller runs on. It carries
an expiry, so a controller that died without removing it cannot disable the agent for that
domain for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from spice_libvirt.errors import LibvirtError
from spice_libvirt.libvirt.connection import Connection, require_libvirt

CLAIM_NAMESPACE = "https://spice-libvirt.org/xmlns/claim/1"
CLAIM_KEY = "spice-libvirt-claim"

#: how long the controller's mark holds: the agent reads it at QEMU's ``setup``, a moment
#: after ``migrateToURI3``; it then expires by itself on both hosts (live metadata migrates).
#: Also the longest any mark is honoured (see :func:`claim_active`).
CONTROLLER_CLAIM_S = 120.0


def claim_xml(holder: str, until: float, host: str | None = None) -> str:
    attrs = {"holder": holder, "until": f"{until:.0f}"}
    if host:
        attrs["host"] = host
    element = ET.Element("claim", attrs)
    return ET.tostring(element, encoding="unicode")


def claim_active(
    metadata: str | None, now: float, *, seen_at: float | None = None, host: str | None = None
) -> str | None:
    """The holder named in ``metadata`` while the claim has not expired, else None.

    A mark names the host the controller migrated the domain *from* (libvirt's hostname
    there); live metadata travels with the domain, so on any other host (``host``, the
    reader's) the mark is a left-over of a migration that is over: not honoured.

    No mark lasts longer than the controller's own (:data:`CONTROLLER_CLAIM_S`): an expiry
    further out than that from when the mark was first seen (``seen_at``, else ``now``) is
    treated as that window -- a far-future mark cannot exempt a domain from the agent.
    """
    if not metadata:
        return None
    try:
        element = ET.fromstring(metadata)
        until = float(element.get("until", "0"))
    except (ET.ParseError, ValueError):
        return None
    marked_on = element.get("host")
    if marked_on and host and marked_on != host:
        return None
    until = min(until, (now if seen_at is None else seen_at) + CONTROLLER_CLAIM_S)
    return element.get("holder") or "?" if until > now else None


class ClaimClock:
    """When the agent first saw each domain's mark, so that :func:`claim_active` bounds a
    mark by its first sighting and not by each reading (a mark that is read again at every
    migration would otherwise be "new" every time). A changed mark starts a new window; the
    memory is the agent's (a restarted agent grants a mark at most one more window)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}
        self._host: str | None = None

    async def local_host(self, conn: Connection) -> str | None:
        """This host's name as libvirt gives it (asked once): a mark naming another host is
        a left-over of a migration out of there."""
        if self._host is None:
            self._host = await host_name(conn)
        return self._host

    def holder(
        self, domain: str, metadata: str | None, now: float, host: str | None = None
    ) -> str | None:
        if not metadata:
            self._seen.pop(domain, None)
            return None
        seen = self._seen.get(domain)
        if seen is None or seen[0] != metadata:
            seen = self._seen[domain] = (metadata, now)
        return claim_active(metadata, now, seen_at=seen[1], host=host)


def _live() -> int:
    lv = require_libvirt()
    return int(lv.VIR_DOMAIN_AFFECT_LIVE)


async def host_name(conn: Connection) -> str | None:
    """libvirt's name for the host ``conn`` reaches (what a claim names), None if it will not say."""
    try:
        return str(await conn.call(conn.conn.getHostname, "host name"))
    except LibvirtError:
        return None


async def set_claim(conn: Connection, dom: Any, holder: str, valid_s: float) -> None:
    """Mark ``dom`` held by ``holder`` for ``valid_s`` seconds (live metadata only), on the
    host ``conn`` reaches (the source of the migration the mark is for)."""
    lv = require_libvirt()
    text = claim_xml(holder, time.time() + valid_s, await host_name(conn))
    await conn.call(
        lambda: dom.setMetadata(
            lv.VIR_DOMAIN_METADATA_ELEMENT, text, CLAIM_KEY, CLAIM_NAMESPACE, _live()
        ),
        "mark the domain held by spice-libvirt",
    )


async def claim_for_controller(conn: Connection, dom: Any, note: Callable[[str], None]) -> None:
    """Mark ``dom`` as held by this controller, so a host agent leaves this migration alone;
    a libvirt that refuses the mark is noted, never fatal (the agent's own check that the
    migration already runs at the hold's speed still applies)."""
    holder = f"spice-libvirt migrate (pid {os.getpid()})"
    try:
        await set_claim(conn, dom, holder, CONTROLLER_CLAIM_S)
    except LibvirtError as exc:
        note(f"could not mark the domain for host agents: {exc}")


async def unclaim(src: Connection, dst: Connection, name: str, bound_s: float = 5.0) -> None:
    """The controller's migration is over: take the mark off wherever the domain runs now
    (live metadata travels with the domain), so that the next migration -- started by
    anyone -- is the agent's again. Best effort and bounded; an expired mark is ignored by
    the agent anyway."""
    with contextlib.suppress(TimeoutError, LibvirtError):
        async with asyncio.timeout(bound_s):
            for conn in (dst, src):
                with contextlib.suppress(LibvirtError):
                    await clear_claim(conn, await conn.lookup(name))


async def clear_claim(conn: Connection, dom: Any) -> None:
    lv = require_libvirt()
    await conn.call(
        lambda: dom.setMetadata(
            lv.VIR_DOMAIN_METADATA_ELEMENT, None, None, CLAIM_NAMESPACE, _live()
        ),
        "remove spice-libvirt's hold mark",
    )


def read_claim(dom: Any) -> str | None:
    """The claim's XML on ``dom`` (blocking; None when there is none)."""
    lv = require_libvirt()
    try:
        return str(dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, CLAIM_NAMESPACE, _live()))
    except lv.libvirtError as exc:
        if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
