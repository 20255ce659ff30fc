"""Can this host reach its peers' libvirt, migration and SPICE ports?

A drain to a peer whose migration ports a firewall drops hangs until libvirt gives up; a
peer whose SPICE ports are dropped lets the migration finish and the client fall back to
switch-host (or lose the session). Both are found here in a few seconds per peer.

What "reachable" means per port: libvirt's port must *accept* a connection (a daemon
listens there all the time). QEMU's migration port (49152, the first of libvirt's range) and
SPICE's first port (5900) have a listener only while a migration or a guest uses them, so
for them a refused connection (the peer answered with a reset) counts as reachable, and only
a timeout or an ICMP error (a firewall dropping or rejecting, no route) fails.
"""

from __future__ import annotations

import errno
import socket
from urllib.parse import urlsplit

from spice_libvirt.doctor.model import Check, fail, ok

#: libvirt's listening ports by URI transport
_LIBVIRT_PORTS = {"tcp": 16509, "tls": 16514, "ssh": 22, "libssh": 22, "libssh2": 22}
#: qemu.conf's migration_port_min and SPICE's first autoport (remote_display_port_min)
MIGRATION_PORT = 49152
SPICE_PORT = 5900
_REACHED = {errno.ECONNREFUSED}


def peer_host(uri: str) -> tuple[str, str]:
    """(host, transport) of a libvirt URI such as ``qemu+tcp://hostB/system``."""
    parts = urlsplit(uri)
    if not parts.hostname:
        raise ValueError(f"{uri}: no host name in the URI")
    _, _, transport = parts.scheme.partition("+")
    return parts.hostname, transport or "tls"


def probe(host: str, port: int, timeout: float) -> str | None:
    """None when the connection was accepted, else the errno name (``ECONNREFUSED``...)
    or ``timeout``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def check_peer(uri: str, timeout: float) -> list[Check]:
    try:
        host, transport = peer_host(uri)
    except ValueError as exc:
        return [fail(f"peer:{uri}", str(exc), "give --peer as a libvirt URI with a host")]
    checks = []
    port = _LIBVIRT_PORTS.get(transport, 16514)
    res = probe(host, port, timeout)
    name = f"peer:{host}:libvirt"
    if res is None:
        checks.append(ok(name, f"{host}:{port} ({transport}) accepts connections"))
    else:
        checks.append(fail(name, f"{host}:{port} ({transport}): {res}",
                           f"open TCP {port} from this host to {host} (and start libvirtd there)"))  # fmt: skip
    for what, port in (("migration", MIGRATION_PORT), ("spice", SPICE_PORT)):
        res = probe(host, port, timeout)
        name = f"peer:{host}:{what}"
        if res is None or res in {errno.errorcode[e] for e in _REACHED}:
            state = "open" if res is None else "closed but answering"
            checks.append(ok(name, f"{host}:{port}: {state} (not filtered)"))
        else:
            checks.append(fail(name, f"{host}:{port}: {res} (filtered or no route)",
                               f"allow TCP {port} and up from this host and clients to {host}"))  # fmt: skip
    return checks
