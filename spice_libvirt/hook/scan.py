"""One expat pass over a domain XML: refuse what we never read, find name and UUID.

Why a separate module: almost every hook call (prepare, start, started, stopped, release...)
only needs the document checked and its ``<name>`` and ``<uuid>`` for the journal. That is
one pass of expat (a C parser), without ElementTree, whose import alone would be a large
share of the hook's start-up budget (see :mod:`spice_libvirt.hook.qemu_hook`). Only ``migrate
begin``, which may rewrite the document, loads :mod:`spice_libvirt.hook.rewrite` and builds
a tree; it runs this same pass first.

The pass refuses any DOCTYPE (with or without entity declarations) at the declaration,
before an entity could be expanded, so a billion-laughs document costs no more than its own
bytes; and it reads the namespace prefixes the document declares, so that a rewrite keeps
them on output.
"""

from __future__ import annotations

from xml.parsers import expat

from spice_libvirt.errors import HookError

#: libvirt's migratable XML is a few KiB; anything far larger is not a domain and would
#: eat the hook's time budget.
MAX_XML_BYTES = 8 * 1024 * 1024

#: expat's separator between a namespace URI and a local name ("uri name").
_NS_SEP = " "


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


class DomainScan:
    """What one pass found: the root's tag (``{uri}local`` when namespaced, as ElementTree
    names it), ``<name>``, ``<uuid>``, and the namespace prefixes."""

    __slots__ = ("listen_sites", "name", "namespaces", "root", "spice_listens", "uuid")

    def __init__(
        self,
        root: str,
        name: str | None,
        uuid: str | None,
        namespaces: dict[str, str],
        spice_listens: tuple[str, ...] = (),
        listen_sites: tuple[ListenSite, ...] = (),
    ) -> None:
        self.root = root
        self.name = name
        self.uuid = uuid
        #: prefix -> URI of every namespace declared in the input ("" for the default one)
        self.namespaces = namespaces
        #: what :func:`spice_libvirt.hook.rewrite.spice_listen_addresses` finds: the distinct
        #: non-empty addresses of ``/domain/devices/graphics[@type='spice']``'s ``listen``
        #: attribute and ``<listen type='address' address=...>`` children, in document order
        self.spice_listens = spice_listens
        #: every one of those attributes where it stands in the document (duplicates
        #: included), for :mod:`spice_libvirt.hook.patch` to rewrite in place
        self.listen_sites = listen_sites


class ListenSite:
    """One SPICE listen attribute: the UTF-8 byte offset of its element's ``<``, the
    element (``graphics`` or ``listen``), the attribute (``listen`` or ``address``) and
    its value as parsed."""

    __slots__ = ("attribute", "element", "offset", "value")

    def __init__(self, offset: int, element: str, attribute: str, value: str) -> None:
        self.offset = offset
        self.element = element
        self.attribute = attribute
        self.value = value


def check_size(text: str) -> None:
    """Raise :class:`DeclinedXMLError` for a document over :data:`MAX_XML_BYTES`."""
    if len(text) > MAX_XML_BYTES:
        raise DeclinedXMLError(f"domain XML is larger than {MAX_XML_BYTES} bytes; not read")


def scan(text: str) -> DomainScan:
    """Check ``text`` and collect a :class:`DomainScan`; raise :class:`HookError` if it is
    not well-formed XML, :class:`DeclinedXMLError` if it is one we refuse.

    ``name`` and ``uuid`` are what ElementTree would give as the stripped ``.text`` of the
    root's first ``<name>`` / ``<uuid>`` child (text up to its first child element, comment
    or processing instruction; None when empty). The root's tag is not checked here.
    """
    check_size(text)
    if not text.strip():
        raise HookError("no domain XML on stdin")
    return _Scanner().run(text)


class _Scanner:
    """One expat pass over a domain XML: its handlers and what they collect."""

    def __init__(self) -> None:
        self.namespaces: dict[str, str] = {}
        self.found: dict[str, str | None] = {}
        self.root = ""
        self.depth = 0
        #: local names of the open elements (namespaced ones keep their "uri name" form)
        self.path: list[str] = []
        self.listens: list[str] = []
        self.sites: list[ListenSite] = []
        #: the <name>/<uuid> whose text is being collected, and its pieces
        self.capturing: str | None = None
        self.pieces: list[str] = []
        self.graphics_is_spice = False
        self.parser = expat.ParserCreate(namespace_separator=_NS_SEP)

    def run(self, text: str) -> DomainScan:
        parser = self.parser
        parser.StartDoctypeDeclHandler = self.doctype
        parser.EntityDeclHandler = self.entity
        parser.StartNamespaceDeclHandler = self.start_ns
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        parser.CharacterDataHandler = self.chars
        parser.CommentHandler = self.other
        parser.ProcessingInstructionHandler = self.other
        try:
            parser.Parse(text, True)
        except expat.ExpatError as exc:
            raise HookError(f"malformed domain XML: {exc}") from exc
        uri, sep, local = self.root.rpartition(_NS_SEP)
        tag = f"{{{uri}}}{local}" if sep else local  # as ElementTree names it
        return DomainScan(
            tag,
            self.found.get("name"),
            self.found.get("uuid"),
            self.namespaces,
            tuple(self.listens),
            tuple(self.sites),
        )

    @staticmethod
    def doctype(name: str, *_rest: object) -> None:
        raise DeclinedXMLError(f"domain XML has a DOCTYPE ({name}); libvirt never sends one")

    @staticmethod
    def entity(name: str, *_rest: object) -> None:
        raise DeclinedXMLError(f"domain XML declares an entity ({name})")

    def start_ns(self, prefix: str | None, uri: str | None) -> None:
        self.namespaces.setdefault(prefix or "", uri or "")

    def stop_capture(self) -> None:
        if self.capturing is not None:
            self.found[self.capturing] = "".join(self.pieces).strip() or None
            self.capturing = None

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        self.stop_capture()
        self.depth += 1
        depth, path = self.depth, self.path
        path.append(tag)
        if depth == 3 and path[1:] == ["devices", "graphics"]:
            self.graphics_is_spice = attrs.get("type") == "spice"
            if self.graphics_is_spice:
                self.listen("graphics", "listen", attrs.get("listen"))
        elif (
            depth == 4
            and tag == "listen"
            and path[1:3] == ["devices", "graphics"]
            and self.graphics_is_spice
            and attrs.get("type") == "address"
        ):
            self.listen("listen", "address", attrs.get("address"))
        if depth == 1:
            self.root = tag
        elif depth == 2 and tag in ("name", "uuid") and tag not in self.found:
            self.found[tag] = None
            self.capturing = tag
            self.pieces.clear()

    def listen(self, element: str, attribute: str, address: str | None) -> None:
        if address is not None:
            # str input: expat is fed UTF-8 and counts its bytes, whatever the declaration says
            offset = self.parser.CurrentByteIndex
            self.sites.append(ListenSite(offset, element, attribute, address))
        if address and address not in self.listens:
            self.listens.append(address)

    def end(self, _tag: str) -> None:
        self.stop_capture()
        self.depth -= 1
        self.path.pop()

    def other(self, *_args: object) -> None:
        self.stop_capture()

    def chars(self, data: str) -> None:
        if self.capturing is not None:
            self.pieces.append(data)


def scan_domain(text: str) -> DomainScan:
    """:func:`scan`, and the root must be ``<domain>`` (without a namespace)."""
    dom = scan(text)
    if dom.root != "domain":
        raise HookError(f"not a domain XML: root element is <{dom.root}>")
    return dom
