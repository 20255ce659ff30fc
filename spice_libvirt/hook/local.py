"""What counts as *this host* for a SPICE listen address, without ElementTree.

Split from :mod:`spice_libvirt.hook.rewrite` so that ``migrate begin`` can decide whether a
rewrite is needed at all (every address local: nothing to do) from the expat pass of
:mod:`spice_libvirt.hook.scan`, and load ElementTree only when it will change something
(see :mod:`spice_libvirt.hook.qemu_hook`). The rules are in :mod:`~spice_libvirt.hook.rewrite`.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection

_WILDCARDS = frozenset({"0.0.0.0", "::"})


def plainly_local(address: str, configured: str | None) -> bool:
    """True for an address that :func:`is_local_address` calls local whatever this host's
    addresses are: empty, a wildcard, ``localhost``, or the configured SPICE address itself.

    A sufficient condition only (False says nothing); it lets ``migrate begin`` skip reading
    ``/proc`` and importing :mod:`ipaddress` in the common cases.
    """
    value = address.strip()
    return not value or value in ("0.0.0.0", "::", "localhost") or value == configured


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
    if canonical_ipv4(value):
        # Decided without ipaddress (and the functools/collections it imports), a third of
        # a rewrite's cost: a string that parses as IPv4 is already in this canonical form,
        # so no other entry of local_addresses can mean the same address.
        return value.startswith("127.") or value == "0.0.0.0" or value in local_addresses
    import ipaddress  # here, not at the top: plainly_local() must stay free of it

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


def canonical_ipv4(value: str) -> bool:
    """True for a dotted quad exactly as ``ipaddress`` writes it (no leading zeros)."""
    parts = value.split(".")
    return len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and (p == "0" or p[0] != "0") and int(p) < 256
        for p in parts
    )


def ipv6_text(raw: str) -> str:
    """``str(ipaddress.IPv6Address(bytes.fromhex(raw)))`` for 32 hex digits, without the
    import: groups without leading zeros, the first longest run of two or more zero
    groups as ``::`` (RFC 5952)."""
    groups = [format(int(raw[i : i + 4], 16), "x") for i in range(0, 32, 4)]
    best, best_len, run_start, run_len = -1, 0, -1, 0
    for i, g in enumerate(groups):
        if g == "0":
            if run_len == 0:
                run_start = i
            run_len += 1
            if run_len > best_len:
                best, best_len = run_start, run_len
        else:
            run_len = 0
    if best_len < 2:
        return ":".join(groups)
    return ":".join(groups[:best]) + "::" + ":".join(groups[best + best_len :])


def host_addresses(proc: str | os.PathLike[str] = "/proc") -> frozenset[str]:
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
        with open(os.path.join(proc, "net", "fib_trie"), encoding="utf-8") as f:
            for line in f:
                stripped = line.strip()
                if stripped.startswith("|--"):
                    previous = stripped[3:].strip()
                elif stripped == "/32 host LOCAL" and previous:
                    found.add(previous)
    except OSError:
        pass
    try:
        with open(os.path.join(proc, "net", "if_inet6"), encoding="utf-8") as f:
            for line in f:
                raw = line.split()[0] if line.split() else ""
                if len(raw) == 32:
                    found.add(ipv6_text(raw))
    except (OSError, ValueError):
        pass
    return frozenset(found)
