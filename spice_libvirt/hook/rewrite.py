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

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from spice_libvirt.errors import HookError

#: libvirt's migratable XML is a few KiB; anything far larger is not a domain and would
#: eat the hook's time budget.
MAX_XML_BYTES = 8 * 1024 * 1024

_WILDCARDS = frozenset({"0.0.0.0", "::"})


class DeclinedXMLError(HookError):
    """A document the hook will not process at all: too large, or with a DOCTYPE.

    Not evidence that the guest operation is wrong, so the hook always fails open on it,
    even with ``fail_closed``: it prints nothing, which libvirt reads as "keep your own
    XML". Why that is the right answer for a *rewrite* hook: libvirt parses the document
    itself whatever we do (our output can only replace it, never vet it), and the worst an
    unrewritten document can do is fail to start on the destination, which libvirt reports
    as a failed migration with the guest still running on the source. Refusing instead
    would turn a hook's caution into a blocked VM operation. And a document with a DOCTYPE
    cannot be rewritten faithfully anyway: ElementTree drops the DOCTYPE and its entity
    declarations on output.
    """


@dataclass(frozen=True)
class DomainXML:
    """A parsed domain document plus what the journal wants to know about it."""

    root: ET.Element
    name: str | None
    uuid: str | None
    #: prefix -> URI of every namespace declared in the input, to keep prefixes on output
    namespaces: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RewriteResult:
    """The outcome of :func:`rewrite_graphics_listen`.

    ``xml`` is None when nothing had to change (the hook then prints nothing, which libvirt
    reads as "unchanged"); ``changes`` says what changed, one item per attribute.
    """

    xml: str | None
    changes: tuple[str, ...]
    name: str | None
    uuid: str | None
    #: every SPICE listen address the input carried (attribute and children), for the journal
    seen: tuple[str, ...] = ()


def parse_domain(text: str) -> DomainXML:
    """Parse a libvirt domain XML document; raise :class:`HookError` with one line if it is not.

    Raises :class:`DeclinedXMLError` for documents over :data:`MAX_XML_BYTES` and for any
    DOCTYPE (with or without entity declarations): libvirt never sends one, and entity
    expansion is the classic way to make an XML parser eat memory and time.
    """
    if len(text) > MAX_XML_BYTES:
        raise DeclinedXMLError(f"domain XML is larger than {MAX_XML_BYTES} bytes; not read")
    if not text.strip():
        raise HookError("no domain XML on stdin")
    namespaces = _prescan(text)
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


def _prescan(text: str) -> dict[str, str]:
    """One expat pass before ElementTree's: refuse a DOCTYPE, collect namespace prefixes.

    The DOCTYPE handler fires at the declaration, before any entity it declares could be
    expanded, so a billion-laughs document costs no more than its own bytes.
    """
    namespaces: dict[str, str] = {}

    def doctype(name: str, *_rest: object) -> None:
        raise DeclinedXMLError(f"domain XML has a DOCTYPE ({name}); libvirt never sends one")

    def entity(name: str, *_rest: object) -> None:
        raise DeclinedXMLError(f"domain XML declares an entity ({name})")

    def start_ns(prefix: str | None, uri: str | None) -> None:
        namespaces.setdefault(prefix or "", uri or "")

    scanner = expat.ParserCreate(namespace_separator=" ")
    scanner.StartDoctypeDeclHandler = doctype
    scanner.EntityDeclHandler = entity
    scanner.StartNamespaceDeclHandler = start_ns
    try:
        scanner.Parse(text, True)
    except expat.ExpatError as exc:
        raise HookError(f"malformed domain XML: {exc}") from exc
    return namespaces


def _text(elem: ET.Element | None) -> str | None:
    if elem is None or elem.text is None:
        return None
    return elem.text.strip() or None


def is_local_address(
    address: str,
    local_addresses: Collection[str],
    *,
    hostname: str | None = None,
) -> bool:
    """True if ``address`` means *this host* here too (see the module docstring)."""
    value = address.strip()
    if not value:
        return True
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        name = value.lower().rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            return True
        if hostname:
            own = hostname.lower().rstrip(".")
            if name in (own, own.split(".")[0]):
                return True
        return name in {a.lower() for a in local_addresses}
    if ip.is_loopback or str(ip) in _WILDCARDS:
        return True
    normalised = set()
    for a in local_addresses:
        try:
            normalised.add(ipaddress.ip_address(a))
        except ValueError:
            continue
    return ip in normalised


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


def host_addresses(proc: Path = Path("/proc")) -> frozenset[str]:
    """This network namespace's own IPv4 and IPv6 addresses, read from ``/proc``.

    ``/proc/net/fib_trie`` lists the IPv4 addresses of the local routing table (each one
    followed by ``/32 host LOCAL``) and ``/proc/net/if_inet6`` the IPv6 ones. Both are
    per network namespace, which is what the hook needs: it runs in libvirtd's namespace.
    Unreadable files yield fewer addresses, never an error: the caller then rewrites more
    eagerly, which is still correct for a migration's destination.
    """
    found: set[str] = set()
    try:
        previous = ""
        for line in (proc / "net" / "fib_trie").read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("|--"):
                previous = stripped[3:].strip()
            elif stripped == "/32 host LOCAL" and previous:
                found.add(previous)
    except OSError:
        pass
    try:
        for line in (proc / "net" / "if_inet6").read_text().splitlines():
            raw = line.split()[0] if line.split() else ""
            if len(raw) == 32:
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    except (OSError, ValueError):
        pass
    return frozenset(found)
