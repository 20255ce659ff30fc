"""The kernel's table of TCP sockets and their round-trip times (``sock_diag`` netlink).

How long a client takes to link to the destination is about seven of its round trips; the
agent knows the client's SPICE sockets from ``/proc`` (:mod:`spice_libvirt.host.procnet`)
and asks the kernel -- the same ``INET_DIAG`` query ``ss -ti`` makes -- for their smoothed
RTT, so the hold knows at ``setup`` how long the client will need. Nothing is sent on the
connections. The query runs in the caller's network namespace (the QEMU's, on a
hypervisor the host's own); an answer that cannot be had is None, never an error: the hold
then assumes a link time.

The same dump is the agent's view of a process's sockets (:func:`tcp_sockets`): the text
table ``/proc/<pid>/net/tcp`` costs the kernel about 9 ms of CPU per read on a host whose
connection hash table is large (measured here: 24 GiB of RAM, a 4-line table), the binary
dump 1.6 ms. It also says how many bytes each socket's owner sent that the peer
acknowledged (``tcpi_bytes_acked``): a SPICE connection on which QEMU never answered a link
is no client (:mod:`spice_libvirt.libvirt.real_clients`). A process in another network
namespace (a lab's host) is asked through a netlink socket made in that namespace.

:func:`parse_dump` is pure (tested on built messages); :func:`socket_rtts` and
:func:`tcp_sockets` do the query.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
NLMSG_ERROR = 2
INET_DIAG_INFO = 2
TCP_ESTABLISHED = 1
TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid
_REQ = struct.Struct("=BBBxI48x")
#: inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue,
#: wqueue, uid, inode
_MSG = struct.Struct("=BBBB48xIIIII")
#: inet_diag_sockid inside it: sport, dport (big-endian), src[16], dst[16], if, cookie
_SOCKID = struct.Struct(">HH16s16s")
_RTATTR = struct.Struct("=HH")
#: struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_rtt (microseconds) is the 16th
_TCPI_RTT_OFFSET = 8 + 15 * 4
#: tcpi_bytes_acked (u64, Linux >= 4.1): after 24 u32s and the two u64 pacing rates
_TCPI_BYTES_ACKED_OFFSET = 8 + 24 * 4 + 2 * 8
CLONE_NEWNET = 0x40000000


def _align(n: int) -> int:
    return (n + 3) & ~3


@dataclasses.dataclass(frozen=True)
class DiagSocket:
    """One TCP socket of the dump."""

    family: int
    state: int
    local: str
    local_port: int
    remote: str
    remote_port: int
    inode: int
    #: smoothed RTT (s), when asked for
    rtt: float | None = None
    #: bytes sent and acknowledged by the peer (a connecting end's SYN counts one), when
    #: asked for
    acked: int | None = None


def _address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    ip6 = ipaddress.IPv6Address(raw)
    return str(ip6.ipv4_mapped or ip6)


def request(
    family: int, seq: int = 1, *, states: int = 1 << TCP_ESTABLISHED, info: bool = True
) -> bytes:
    """The dump request for TCP sockets of ``family`` in ``states`` (a bit mask), with
    their tcp_info when ``info``."""
    ext = 1 << (INET_DIAG_INFO - 1) if info else 0
    body = _REQ.pack(family, socket.IPPROTO_TCP, ext, states)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0)
    return header + body


def parse_sockets(data: bytes, keep: Callable[[int], bool], into: list[DiagSocket]) -> bool:
    """Add every socket of ``data`` whose inode ``keep`` accepts to ``into``; True once the
    dump is over (or broken: a truncated answer ends the query, it does not fail it)."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return True
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return True
        body = offset + _NLMSGHDR.size
        if kind == SOCK_DIAG_BY_FAMILY and length - _NLMSGHDR.size >= _MSG.size:
            family, state = data[body], data[body + 1]
            inode = _MSG.unpack_from(data, body)[-1]
            if keep(inode):
                sport, dport, src, dst = _SOCKID.unpack_from(data, body + 4)
                rtt, acked = _info_attribute(data, body + _MSG.size, offset + length)
                into.append(
                    DiagSocket(
                        family, state, _address(family, src), sport, _address(family, dst),
                        dport, inode, rtt, acked,
                    )
                )  # fmt: skip
        offset += _align(length)
    return False


def parse_dump(data: bytes, wanted: set[int], into: dict[int, float]) -> bool:
    """Add the RTT (seconds) of every ``wanted`` inode in ``data`` to ``into``; True once the
    dump is over."""
    found: list[DiagSocket] = []
    over = parse_sockets(data, wanted.__contains__, found)
    into.update({s.inode: s.rtt for s in found if s.rtt is not None})
    return over


def _netlink_socket(netns: Path | None) -> socket.socket:
    """A sock_diag socket of this network namespace, or of ``netns`` (``/proc/<pid>/ns/net``).

    A socket keeps the namespace it was made in, so it is made by a thread of its own that
    enters ``netns`` and ends right after: the process's other threads stay where they are.
    Entering needs CAP_SYS_ADMIN (an :class:`OSError` otherwise).
    """
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    made: list[socket.socket | OSError] = []

    def enter_and_make() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {netns}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG))
        except OSError as exc:
            made.append(exc)

    thread = threading.Thread(target=enter_and_make, name="sock_diag in a namespace")
    thread.start()
    thread.join()
    (result,) = made
    if isinstance(result, OSError):
        raise result
    return result


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _dump(
    states: int,
    info: bool,
    keep: Callable[[int], bool],
    timeout: float,
    netns: Path | None = None,
) -> list[DiagSocket]:
    found: list[DiagSocket] = []
    with _netlink_socket(netns) as sock:
        sock.settimeout(timeout)
        for family in (socket.AF_INET, socket.AF_INET6):
            sock.send(request(family, states=states, info=info))
            while not parse_sockets(sock.recv(65536), keep, found):
                pass
    return found


def tcp_sockets(
    inodes: Iterable[int], *, timeout: float = 0.5, netns: Path | None = None
) -> list[DiagSocket]:
    """The listening and established TCP sockets among ``inodes``, with their tcp_info, in
    this network namespace or in ``netns``.

    :raise OSError: the kernel did not answer, or ``netns`` cannot be entered (the caller
        reads ``/proc`` instead)
    """
    wanted = set(inodes)
    states = (1 << TCP_ESTABLISHED) | (1 << TCP_LISTEN)
    return _dump(states, True, wanted.__contains__, timeout, netns)


def _info_attribute(data: bytes, start: int, end: int) -> tuple[float | None, int | None]:
    """(smoothed RTT in seconds, bytes acknowledged) from a socket's tcp_info attribute;
    None for what it does not carry."""
    at = start
    while at + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, at)
        if length < _RTATTR.size:
            return None, None
        size = length - _RTATTR.size
        if kind == INET_DIAG_INFO and size >= _TCPI_RTT_OFFSET + 4:
            info = at + _RTATTR.size
            (micros,) = struct.unpack_from("=I", data, info + _TCPI_RTT_OFFSET)
            acked: int | None = None
            if size >= _TCPI_BYTES_ACKED_OFFSET + 8:
                (acked,) = struct.unpack_from("=Q", data, info + _TCPI_BYTES_ACKED_OFFSET)
            return int(micros) / 1_000_000.0, acked
        at += _align(length)
    return None, None


def socket_rtts(inodes: Iterable[int], *, timeout: float = 0.5) -> dict[int, float]:
    """The kernel's smoothed RTT (seconds) of each established TCP socket in ``inodes``;
    the ones it could not tell are missing."""
    wanted = set(inodes)
    if not wanted:
        return {}
    try:
        found = _dump(1 << TCP_ESTABLISHED, True, wanted.__contains__, timeout)
    except OSError:
        return {}
    return {s.inode: s.rtt for s in found if s.rtt is not None}


__all__ = ["DiagSocket", "parse_dump", "parse_sockets", "request", "socket_rtts", "tcp_sockets"]
