"""The in-place rewrite (:mod:`spice_libvirt.hook.patch`) gives ElementTree's tree, and keeps
every other byte.

The hook's ``migrate begin`` now rewrites from the expat pass's byte offsets instead of
building an ElementTree: the same decisions and ``changes`` as
:func:`~spice_libvirt.hook.rewrite.rewrite_graphics_listen` (the reference, still used by
``--self-test``), compared here on canonical XML (C14N 2.0) over generated documents with
awkward quoting, entity references, ``>`` and ``=`` inside other attributes, multi-byte text
before the graphics, comments and namespaces.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st

from spice_libvirt.hook.patch import attribute_span, rewrite_sites
from spice_libvirt.hook.rewrite import rewrite_graphics_listen
from spice_libvirt.hook.scan import scan_domain

NEW = "198.51.100.2"
LOCAL = frozenset({NEW, "10.0.0.1"})

_GRAPHICS = st.sampled_from(
    [
        "<graphics type='spice' listen='{a}'><listen type='address' address='{b}'/></graphics>",
        '<graphics passwd="x>y=z" type="spice" listen = "{a}" ><listen address="{b}"  type="address"/></graphics>',
        "<graphics type='spice'>\n  <listen type='address' address='{a}'/>\n  <listen type='address' address='{b}'/></graphics>",
        "<graphics type='spice' listen='{a}'/>",
        "<graphics type='vnc' listen='{a}'><listen type='address' address='{b}'/></graphics>",
        "<graphics type='spice'><listen type='network' network='default' address='{a}'/></graphics>",
        "<x:graphics xmlns:x='urn:x' type='spice' listen='{a}'/>",
        "<!-- <graphics type='spice' listen='{a}'/> --><graphics type='spice' listen='{b}'/>",
    ]
)
_ADDRESSES = st.sampled_from(
    ["198.51.100.1", "&#49;98.51.100.1", NEW, "127.0.0.1", "0.0.0.0", "hv9.example",
     "2001:db8::7", "", "localhost", "hv1", "203.0.113.&#55;"]
)  # fmt: skip


def _c14n(xml: str) -> str:
    return ET.canonicalize(xml_data=xml, strip_text=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_GRAPHICS, _ADDRESSES, _ADDRESSES), max_size=3), st.booleans())
def test_in_place_rewrite_is_elementtrees(
    graphics: list[tuple[str, str, str]], unicode_before: bool
) -> None:
    devices = "".join(g.format(a=a, b=b) for g, a, b in graphics)
    title = "<title>Ünïcode ✓ guest</title><!-- kept -->" if unicode_before else ""
    xml = f"<domain type='kvm'><name>vm</name>{title}<devices>{devices}</devices></domain>\n"
    reference = rewrite_graphics_listen(xml, NEW, LOCAL, hostname="hv1")
    dom = scan_domain(xml)
    patched, changes = rewrite_sites(xml, dom.listen_sites, NEW, LOCAL, hostname="hv1")
    assert changes == reference.changes
    if reference.xml is None:
        assert patched is None
        return
    assert patched is not None
    assert _c14n(patched) == _c14n(reference.xml)
    if unicode_before:
        assert "<title>Ünïcode ✓ guest</title><!-- kept -->" in patched
    # nothing but the rewritten attributes changed: the rest is byte for byte the input
    assert patched.count(f'="{NEW}"') - xml.count(f'="{NEW}"') == len(changes)


def test_attribute_span_finds_the_attribute_not_a_lookalike() -> None:
    raw = b"<listen daddress='1' address = \"2\" type='address'/>"
    start, end = attribute_span(raw, 0, "address")
    assert raw[start:end] == b'address = "2"'
