"""Rewrite the SPICE listen address of an incoming domain XML, as pure functions.

Why: a domain whose XML pins ``<graphics type='spice' listen='192.0.2.1'>`` to the
*source* host's address cannot start on the destination (QEMU fails to bind an address the
destination does not have), so the migration fails; and if it could, ``client_migrate_info``
would send the client to the wrong host. libvirt lets the destination's ``migrate begin``
hook return a replacement XML; this module computes it.

What counts as *local*, so that we leave it alone:

* no address at all (``<listen type='address'/>``): libvirt fills in the destination's own
  ``spice_listen`` from ``qemu.conf``;
* loopback (``127.0.0.0/8``, ``::1``, ``localhost``): the same meaning on every host;
* wildcard (``0.0.0.0``, ``::``): binds on every host; libvirt then sends the client the
  host name of the migration URI, which is the administrator's choice;
* one of this host's own addresses (see :func:`host_addresses`), or this host's name;
* the configured SPICE address itself (nothing to change).

Anything else (another host's IP or name) is rewritten to the configured address, in the
``listen`` attribute of ``<graphics>`` and in every ``<listen type='address'>`` child (libvirt
insists the two agree). ``type='network'`` and ``type='socket'`` listens are not
addresses we own and stay as they are. Only ``type='spice'`` graphics are touched: this
project configures SPICE, and a VNC address is someone else's decision.

Reading this host's addresses is the only impure part and lives in :func:`host_addresses`;
:func:`rewrite_graphics_listen` takes them as an argument so tests need no network setup.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from spice_libvirt.errors import HookError
from spice_libvirt.hook.local import host_addresses, is_local_address
from spice_libvirt.hook.scan import MAX_XML_BYTES, DeclinedXMLError, check_size, scan

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = [
    "MAX_XML_BYTES",
    "DeclinedXMLError",
    "DomainXML",
    "RewriteResult",
    "host_addresses",
    "is_local_address",
    "parse_domain",
    "rewrite_graphics_listen",
    "serialize",
    "spice_listen_addresses",
]


class DomainXML:
    """A parsed domain document plus what the journal wants to know about it.

    Plain classes here and in :class:`RewriteResult`, not dataclasses: ``dataclasses``
    pulls in ``inspect``, a measurable share of the hook's start-up budget.
    """

    __slots__ = ("name", "namespaces", "root", "uuid")

    def __init__(
        self,
        root: ET.Element,
        name: str | None,
        uuid: str | None,
        namespaces: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.name = name
        self.uuid = uuid
        #: prefix -> URI of every namespace declared in the input, to keep prefixes on output
        self.namespaces = {} if namespaces is None else namespaces


class RewriteResult:
    """The outcome of :func:`rewrite_graphics_listen`.

    ``xml`` is None when nothing had to change (the hook then prints nothing, which libvirt
    reads as "unchanged"); ``changes`` says what changed, one item per attribute.
    """

    __slots__ = ("changes", "name", "seen", "uuid", "xml")

    def __init__(
        self,
        xml: str | None,
        changes: tuple[str, ...],
        name: str | None,
        uuid: str | None,
        seen: tuple[str, ...] = (),
    ) -> None:
        self.xml = xml
        self.changes = changes
        self.name = name
        self.uuid = uuid
        #: every SPICE listen address the input carried (attribute and children), for the
        #: journal
        self.seen = seen

    def __repr__(self) -> str:
        return (
            f"RewriteResult(xml={self.xml!r}, changes={self.changes!r}, name={self.name!r},"
            f" uuid={self.uuid!r}, seen={self.seen!r})"
        )


def parse_domain(text: str) -> DomainXML:
    """Parse a libvirt domain XML document; raise :class:`HookError` with one line if it is not.

    Raises :class:`DeclinedXMLError` for documents over :data:`MAX_XML_BYTES` and for any
    DOCTYPE (with or without entity declarations): libvirt never sends one, and entity
    expansion is the classic way to make an XML parser eat memory and time.
    """
    check_size(text)
    if not text.strip():
        raise HookError("no domain XML on stdin")
    # The expat pass first: it refuses a DOCTYPE before any entity could be expanded.
    namespaces = scan(text).namespaces
    try:
        builder = ET.TreeBuilder(insert_comments=True, insert_pis=True)
        parser = ET.XMLParser(target=builder)
        parser.feed(text)
        root = parser.close()
    except ET.ParseError as exc:
        raise HookError(f"malformed domain XML: {exc}") from exc
    if root.tag != "domain":
        raise HookError(f"not a domain XML: root element is <{root.tag}>")
    return DomainXML(
        root=root,
        name=_text(root.find("name")),
        uuid=_text(root.find("uuid")),
        namespaces=namespaces,
    )


def _text(elem: ET.Element | None) -> str | None:
    if elem is None or elem.text is None:
        return None
    return elem.text.strip() or None


def rewrite_graphics_listen(
    text: str,
    new_address: str | None,
    local_addresses: Collection[str],
    *,
    hostname: str | None = None,
) -> RewriteResult:
    """Return the domain XML with non-local SPICE listen addresses replaced by ``new_address``.

    With ``new_address`` None nothing is rewritten (the host has no configured SPICE
    address), but the XML is still parsed, so malformed input is reported all the same.
    """
    dom = parse_domain(text)
    seen = tuple(spice_listen_addresses(dom))
    if new_address is None:
        return RewriteResult(None, (), dom.name, dom.uuid, seen)
    keep = {*local_addresses, new_address}
    changes: list[str] = []
    for graphics in dom.root.iterfind("./devices/graphics"):
        if graphics.get("type") != "spice":
            continue
        attr = graphics.get("listen")
        if attr is not None and not is_local_address(attr, keep, hostname=hostname):
            graphics.set("listen", new_address)
            changes.append(f"graphics listen {attr} -> {new_address}")
        for listen in graphics.iterfind("listen"):
            if listen.get("type") != "address":
                continue
            addr = listen.get("address")
            if addr is not None and not is_local_address(addr, keep, hostname=hostname):
                listen.set("address", new_address)
                changes.append(f"listen address {addr} -> {new_address}")
    if not changes:
        return RewriteResult(None, (), dom.name, dom.uuid, seen)
    return RewriteResult(serialize(dom), tuple(changes), dom.name, dom.uuid, seen)


def spice_listen_addresses(dom: DomainXML) -> list[str]:
    """The distinct addresses in SPICE ``listen`` attributes and address listens, in order.

    Empty when the XML leaves the address to the host's ``spice_listen``: libvirt omits an
    address that came from ``qemu.conf`` from the XML it migrates.
    """
    found: list[str] = []
    for graphics in dom.root.iterfind("./devices/graphics"):
        if graphics.get("type") != "spice":
            continue
        candidates = [graphics.get("listen")] + [
            listen.get("address")
            for listen in graphics.iterfind("listen")
            if listen.get("type") == "address"
        ]
        for c in candidates:
            if c and c not in found:
                found.append(c)
    return found


def serialize(dom: DomainXML) -> str:
    """Serialise ``dom`` keeping the input's namespace prefixes (e.g. ``qemu:``)."""
    for prefix, uri in dom.namespaces.items():
        if not prefix:
            continue
        try:
            ET.register_namespace(prefix, uri)
        except ValueError:
            continue  # a prefix ElementTree reserves (ns0, ns1...): it will pick its own
    return ET.tostring(dom.root, encoding="unicode") + "\n"
