"""Checks that ask the running libvirt daemon: its version and each running domain's SPICE
listen address; and which process it is, to date its start against the hook shim.

Read-only throughout (:mod:`.access`: a read-only connection or ``virsh --readonly``):
nothing is defined, started or changed, so running the doctor on a production host (or before a drain) is harmless.
"""

from __future__ import annotations

import os
import socket
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from spice_libvirt.doctor.access import Daemon, DaemonAccessError, open_daemon
from spice_libvirt.doctor.model import Check, fail, ok, skip, warn

#: libvirt runs ``hooks/qemu.d/`` scripts since 6.5.0.
QEMU_D_SINCE = (6, 5, 0)
_SOCKETS = ("/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock")


class DomainListen:
    """One running domain's SPICE graphics as the live XML shows it."""

    __slots__ = ("address", "kind", "name", "tls")

    def __init__(self, name: str, kind: str, address: str | None, tls: bool) -> None:
        self.name = name
        #: ``address``, ``network``, ``socket``, ``none`` or ``absent`` (no SPICE graphics)
        self.kind = kind
        self.address = address
        self.tls = tls


def open_read_only(uri: str) -> tuple[Daemon | None, Check | None]:
    """Read-only access to the daemon, or the failed check that says why there is none."""
    try:
        return open_daemon(uri), None
    except DaemonAccessError as exc:
        return None, fail("libvirt", str(exc),
                          "start libvirtd (systemctl start libvirtd) or fix --connect")  # fmt: skip


def check_version(daemon: Daemon) -> Check:
    """The *running* daemon's version (not the installed binary's): qemu.d/ needs 6.5."""
    version = daemon.version()
    text = ".".join(map(str, version))
    if version < QEMU_D_SINCE:
        return fail("libvirt-version", f"libvirt {text} does not run hooks/qemu.d/ scripts",
                    "upgrade libvirt to 6.5 or later")  # fmt: skip
    return ok("libvirt-version", f"libvirt {text} runs hooks/qemu.d/ scripts")


def running_domains(daemon: Daemon) -> list[DomainListen]:
    return [_listen_of(name, ET.fromstring(xml)) for name, xml in daemon.running()]


def _listen_of(name: str, root: ET.Element) -> DomainListen:
    graphics = root.find("./devices/graphics[@type='spice']")
    if graphics is None:
        return DomainListen(name, "absent", None, False)
    tls = graphics.get("tlsPort") not in (None, "-1")
    listen = graphics.find("listen")
    kind = listen.get("type", "address") if listen is not None else "address"
    address = (listen.get("address") if listen is not None else None) or graphics.get("listen")
    return DomainListen(name, kind, address, tls)


def check_domains(domains: list[DomainListen]) -> list[Check]:
    """Each running domain's SPICE listens where a client on another machine can reach it."""
    if not domains:
        return [skip("domains", "no running domain")]
    return [_check_domain(d) for d in domains]


def _check_domain(d: DomainListen) -> Check:
    import ipaddress

    name = f"domain:{d.name}"
    fix = (f"virsh edit {d.name}: <listen type='address' address='HOST_ADDRESS'/> in its "
           "SPICE graphics (or spice_listen in qemu.conf); takes effect at the next start")  # fmt: skip
    if d.kind == "absent":
        return skip(name, "no SPICE graphics")
    if d.kind in ("socket", "none"):
        return fail(name, f"SPICE listens on {d.kind}: no network client can reach it", fix)
    if d.address is None:
        return warn(name, "SPICE listen address not shown by libvirt", fix)
    try:
        loopback = ipaddress.ip_address(d.address.strip("[]")).is_loopback
    except ValueError:
        loopback = d.address.lower().rstrip(".") in ("localhost", "localhost.localdomain")
    if loopback:
        return fail(name, f"SPICE listens on {d.address} (loopback): clients cannot reach it", fix)
    return ok(name, f"SPICE listens on {d.address}" + (" (TLS port too)" if d.tls else ""))


def local_socket(uri: str) -> Path | None:
    """The UNIX socket of a local URI (``qemu:///system``, ``...+unix:///system?socket=``)."""
    parts = urlsplit(uri)
    if parts.hostname or ("+" in parts.scheme and not parts.scheme.endswith("+unix")):
        return None
    named = parse_qs(parts.query).get("socket")
    if named:
        return Path(named[0])
    for path in _SOCKETS:
        if os.path.exists(path):
            return Path(path)
    return None


def daemon_process(sock: Path | None) -> tuple[int, float] | None:
    """(pid, wall-clock start) of the daemon listening on ``sock``, from SO_PEERCRED and
    ``/proc``; None when that cannot be known (remote URI, no permission, another pid
    namespace)."""
    if sock is None:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(str(sock))
            cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", cred)[0]
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return pid, boot + ticks / os.sysconf("SC_CLK_TCK")
