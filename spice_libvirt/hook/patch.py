"""Rewrite SPICE listen addresses *in place*, from the expat pass, without ElementTree.

Why: ``migrate begin`` on the destination must return the incoming XML with a foreign
SPICE address replaced. Building an ElementTree for that and serialising it back cost the
hook ~10 ms of imports (ElementTree, ``re``, ``enum``...) on top of a ~10 ms interpreter:
the one call that took 3x a bare interpreter (``benchmarks/bench_hook.py``). The expat pass
of :mod:`spice_libvirt.hook.scan` already knows where each SPICE listen attribute stands
(its element's byte offset); this module replaces exactly those attribute values in the
original bytes and leaves every other byte alone: comments, namespace prefixes, quoting
and whitespace arrive as libvirt sent them (ElementTree re-serialised the whole document).

The decisions are :mod:`spice_libvirt.hook.rewrite`'s (same rules, same ``changes`` text,
``tests/test_hook_patch.py`` checks that both give the same tree); the attribute is written
back as ``name="ADDRESS"`` (the configured address is an IP or a host name: nothing to
escape).
"""

from __future__ import annotations

from spice_libvirt.errors import HookError
from spice_libvirt.hook.local import is_local_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection

    from spice_libvirt.hook.scan import ListenSite

_SPACE = b" \t\r\n"


def attribute_span(raw: bytes, offset: int, name: str) -> tuple[int, int]:
    """(start, end) of ``name="..."`` in the start tag that begins at ``raw[offset]``.

    The tag is well-formed (expat read it), so a small scan suffices: attribute values
    cannot hold their own quote character, and ``>`` ends the tag only outside of them.
    """
    want = name.encode()
    i = offset + 1
    while raw[i] not in _SPACE and raw[i] not in b"/>":  # the element's name
        i += 1
    while True:
        while raw[i] in _SPACE:
            i += 1
        if raw[i] in b"/>":
            raise HookError(f"attribute {name} not found in the tag at byte {offset}")
        start = i
        i = raw.index(b"=", i)
        attr = raw[start:i].rstrip(_SPACE)
        i += 1
        while raw[i] in _SPACE:
            i += 1
        end = raw.index(raw[i : i + 1], i + 1) + 1
        if attr == want:
            return start, end
        i = end


def rewrite_sites(
    text: str,
    sites: tuple[ListenSite, ...],
    new_address: str,
    local_addresses: Collection[str],
    *,
    hostname: str | None = None,
) -> tuple[str | None, tuple[str, ...]]:
    """``text`` with every non-local site set to ``new_address``; (None, ()) if none is."""
    keep = {*local_addresses, new_address}
    raw = text.encode("utf-8")
    edits: list[tuple[int, int, bytes]] = []
    changes: list[str] = []
    for site in sites:
        if is_local_address(site.value, keep, hostname=hostname):
            continue
        start, end = attribute_span(raw, site.offset, site.attribute)
        edits.append((start, end, f'{site.attribute}="{new_address}"'.encode()))
        what = "graphics listen" if site.element == "graphics" else "listen address"
        changes.append(f"{what} {site.value} -> {new_address}")
    if not edits:
        return None, ()
    for start, end, replacement in reversed(edits):
        raw = raw[:start] + replacement + raw[end:]
    return raw.decode("utf-8"), tuple(changes)
