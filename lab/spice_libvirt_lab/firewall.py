"""A firewall in one of the lab's namespaces: the client's packets to a host silently dropped.

What a real deployment gets wrong more often than not: the client can reach the source
hypervisor but a firewall between it and the destination drops its packets (no RST, no
ICMP: the client's SYNs vanish). ``nft`` inside the lab's own namespace, in a table of its
own that is deleted again on the way out; nothing outside the namespace is touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from spice_libvirt_lab import netns

TABLE = "spice_libvirt_lab_drop"


@contextlib.contextmanager
def dropping(ns: str, address: str) -> Iterator[None]:
    """Inside namespace ``ns``, every packet to ``address`` is dropped until the block ends."""
    netns.run_in(ns, ["nft", "add", "table", "inet", TABLE])
    try:
        netns.run_in(ns, ["nft", f"add chain inet {TABLE} out {{ type filter hook output "
                              "priority 0 ; policy accept ; }"])  # fmt: skip
        netns.run_in(ns, ["nft", "add", "rule", "inet", TABLE, "out", "ip", "daddr", address,
                          "drop"])  # fmt: skip
        yield
    finally:
        netns.run_in(ns, ["nft", "delete", "table", "inet", TABLE], check=False)
