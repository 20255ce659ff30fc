"""What the kernel knows about a QEMU process's TCP connections, read from ``/proc``.

The agent must not ask QEMU (the monitor passthrough taints the domain) and libvirt does not
say where an outgoing migration goes nor which SPICE channels are open right now (its
graphics events only tell what happened *since* one subscribed). The kernel knows both,
for the process that owns the sockets: every SPICE channel is one established connection
on a SPICE listening port, and the migration stream is the one established connection the
process opened itself (its local port is none of its listening ports).

Parsing is pure (:func:`parse_tcp_table`, :func:`spice_channels`, :func:`migration_peers`,
tested on captured text); :func:`snapshot` does the reading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from spice_libvirt.errors import AgentError
from spice_libvirt.host import tcpinfo

#: /proc/net/tcp state codes we care about
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"


@dataclasses.dataclass(frozen=True)
class TcpSocket:
    """One row of ``/proc/<pid>/net/tcp{,6}``."""

    local: str
    local_port: int
    remote: str
    remote_port: int
    state: str
    inode: int
    #: bytes the process sent on it that the peer acknowledged (a connecting end's SYN counts
    #: one), from the kernel's tcp_info; None when only the text table could be read
    sent: int | None = None
    #: the kernel's smoothed RTT of the connection (s); None when only the text table could
    #: be read
    rtt: float | None = None

    @property
    def peer(self) -> str:
        """``address:port`` of the other end (the key libvirt's graphics events use)."""
        return f"{self.remote}:{self.remote_port}"


def _address(hex_addr: str) -> tuple[str, int]:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[::-1])
    elif len(raw) == 16:
        # four little-endian 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        ip6 = ipaddress.IPv6Address(words)
        ip = ip6.ipv4_mapped or ip6
    else:
        raise ValueError(f"address of {len(raw)} bytes")
    return str(ip), int(port, 16)


def parse_tcp_table(text: str) -> list[TcpSocket]:
    """The rows of a ``/proc/net/tcp`` or ``tcp6`` table; malformed rows are skipped (the
    table is the kernel's, but a truncated read must not stop a hold)."""
    rows: list[TcpSocket] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            local, lport = _address(fields[1])
            remote, rport = _address(fields[2])
            rows.append(TcpSocket(local, lport, remote, rport, fields[3].upper(), int(fields[9])))
        except ValueError:
            continue
    return rows


@dataclasses.dataclass(frozen=True)
class ProcessSockets:
    """The TCP sockets one process owns (matched by inode against its fds)."""

    pid: int
    sockets: tuple[TcpSocket, ...]

    @property
    def listening_ports(self) -> frozenset[int]:
        return frozenset(s.local_port for s in self.sockets if s.state == TCP_LISTEN)

    @property
    def established(self) -> tuple[TcpSocket, ...]:
        return tuple(s for s in self.sockets if s.state == TCP_ESTABLISHED)


def spice_sockets(sockets: ProcessSockets, spice_ports: Iterable[int]) -> list[TcpSocket]:
    """The established connections on the SPICE ports: one per client channel."""
    ports = set(spice_ports)
    return [s for s in sockets.established if s.local_port in ports]


def spice_channels(sockets: ProcessSockets, spice_ports: Iterable[int]) -> list[str]:
    """The SPICE channels open now, as ``address:port`` of the client end (one per channel,
    the same key libvirt's graphics events use)."""
    return sorted(s.peer for s in spice_sockets(sockets, spice_ports))


def migration_peers(sockets: ProcessSockets) -> list[str]:
    """Addresses the process connected *out* to: its local port is none of its listening
    ports. For a source QEMU during a migration, that is the destination host (the
    migration stream; NBD storage copies go to the same host)."""
    listening = sockets.listening_ports
    return sorted({s.remote for s in sockets.established if s.local_port not in listening})


def _socket_inodes(pid: int, proc: Path) -> set[int]:
    inodes: set[int] = set()
    fd_dir = proc / str(pid) / "fd"
    for entry in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / entry)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


#: sock_diag's state numbers as ``/proc/net/tcp`` writes them
_STATES = {tcpinfo.TCP_ESTABLISHED: TCP_ESTABLISHED, tcpinfo.TCP_LISTEN: TCP_LISTEN}


def _same_netns(pid: int, proc: Path) -> bool:
    try:
        return os.readlink(proc / str(pid) / "ns" / "net") == os.readlink(proc / "self/ns/net")
    except OSError:
        return False


def snapshot(pid: int, *, proc: Path = Path("/proc")) -> ProcessSockets:
    """The TCP sockets of process ``pid`` now, as the kernel sees them in *its* network
    namespace: the binary ``sock_diag`` dump (a fraction of the text table's cost, and what
    the process sent on each), asked in that namespace; ``/proc/<pid>/net/tcp{,6}`` when
    the dump cannot be had (another namespace without CAP_SYS_ADMIN)."""
    try:
        inodes = _socket_inodes(pid, proc)
        if proc == Path("/proc"):
            netns = None if _same_netns(pid, proc) else proc / str(pid) / "ns" / "net"
            with contextlib.suppress(OSError):
                rows = [
                    TcpSocket(s.local, s.local_port, s.remote, s.remote_port,
                              _STATES[s.state], s.inode, s.acked, s.rtt)
                    for s in tcpinfo.tcp_sockets(inodes, netns=netns)
                ]  # fmt: skip
                return ProcessSockets(pid, tuple(rows))
        text_rows: list[TcpSocket] = []
        for table in ("tcp", "tcp6"):
            path = proc / str(pid) / "net" / table
            if path.exists():
                text_rows.extend(parse_tcp_table(path.read_text()))
    except OSError as exc:
        raise AgentError(f"cannot read the sockets of process {pid}: {exc}") from exc
    return ProcessSockets(pid, tuple(r for r in text_rows if r.inode in inodes))


def _first_word(line: str) -> str:
    return line.split(None, 1)[0] if line.strip() else ""


def _mapping_size(line: str) -> int | None:
    """The size of the mapping a ``maps``/``smaps`` header line names (None: not one)."""
    head = _first_word(line)
    if "-" not in head or head.endswith(":"):
        return None
    start, _, end = head.partition("-")
    try:
        return int(end, 16) - int(start, 16)
    except ValueError:
        return 0


def _is_guest_ram(size: int, size_bytes: int, slack: int) -> bool:
    return size_bytes <= size <= size_bytes + slack


def parse_smaps_resident(
    lines: Iterable[str], size_bytes: int, slack: int = 4 << 20, expected: int | None = None
) -> int | None:
    """The resident bytes of the mapping(s) of ``/proc/<pid>/smaps`` whose size is the
    guest RAM's (``size_bytes`` up to ``slack`` more); None when there is none. With
    ``expected`` (how many such mappings ``maps`` lists) the reading stops after the last
    of them: the kernel writes smaps as it is read, walking each mapping's pages, and a
    QEMU has hundreds of mappings after its guest RAM (4.5 ms for a whole read here)."""
    resident: int | None = None
    size = 0
    found = 0
    for line in lines:
        mapping = _mapping_size(line)
        if mapping is not None:
            size = mapping
        elif _first_word(line) == "Rss:" and _is_guest_ram(size, size_bytes, slack):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                resident = (resident or 0) + int(parts[1]) * 1024
                found += 1
                if expected is not None and found >= expected:
                    break
    return resident


def guest_ram_resident(
    pid: int, ram_bytes: int, *, proc: Path = Path("/proc"), slack: int = 4 << 20
) -> int | None:
    """How much of the guest's RAM the QEMU process has resident: pages the guest never
    touched are not, and are zero; a migration moves the rest as data. None: unknown.
    ``maps`` (cheap: no page walk) says how many mappings have the guest RAM's size, so
    ``smaps`` is read only up to the last of them."""
    try:
        maps = (proc / str(pid) / "maps").read_text().splitlines()
        expected = sum(_is_guest_ram(_mapping_size(line) or 0, ram_bytes, slack) for line in maps)
        if not expected:
            return None
        with (proc / str(pid) / "smaps").open() as smaps:
            return parse_smaps_resident(smaps, ram_bytes, slack, expected)
    except OSError:
        return None
