"""The kernel's round-trip time of TCP connections, by socket inode (``sock_diag`` netlink).

How long a client takes to link to the destination is about seven of its round trips; the
agent knows the client's SPICE sockets from ``/proc`` (:mod:`spice_libvirt.agent.procnet`)
and asks the kernel -- the same ``INET_DIAG`` query ``ss -ti`` makes -- for their smoothed
RTT, so the hold knows at ``setup`` how long the client will need. Nothing is sent on the
connections. The query runs in the caller's network namespace (the QEMU's, on a
hypervisor the host's own); an answer that cannot be had is None, never an error: the hold
then assumes a link time.

:func:`parse_dump` is pure (tested on built messages); :func:`socket_rtts` does the query.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
NLMSG_ERROR = 2
INET_DIAG_INFO = 2
TCP_ESTABLISHED = 1

_NLMSGHDR = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid
_REQ = struct.Struct("=BBBxI48x")
#: inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue,
#: wqueue, uid, inode
_MSG = struct.Struct("=BBBB48xIIIII")
_RTATTR = struct.Struct("=HH")
#: struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_rtt (microseconds) is the 16th
_TCPI_RTT_OFFSET = 8 + 15 * 4


def _align(n: int) -> int:
    return (n + 3) & ~3


def request(family: int, seq: int = 1) -> bytes:
    """The dump request for established TCP sockets of ``family``, with their tcp_info."""
    body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 1 << TCP_ESTABLISHED)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0)
    return header + body


def parse_dump(data: bytes, wanted: set[int], into: dict[int, float]) -> bool:
    """Add the RTT (seconds) of every ``wanted`` inode in ``data`` to ``into``; True once the
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
            inode = _MSG.unpack_from(data, body)[-1]
            if inode in wanted:
                rtt = _rtt_attribute(data, body + _MSG.size, offset + length)
                if rtt is not None:
                    into[inode] = rtt
        offset += _align(length)
    return False


def _rtt_attribute(data: bytes, start: int, end: int) -> float | None:
    at = start
    while at + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, at)
        if length < _RTATTR.size:
            return None
        if kind == INET_DIAG_INFO and length - _RTATTR.size >= _TCPI_RTT_OFFSET + 4:
            (micros,) = struct.unpack_from("=I", data, at + _RTATTR.size + _TCPI_RTT_OFFSET)
            return int(micros) / 1_000_000.0
        at += _align(length)
    return None


def socket_rtts(inodes: Iterable[int], *, timeout: float = 0.5) -> dict[int, float]:
    """The kernel's smoothed RTT (seconds) of each established TCP socket in ``inodes``;
    the ones it could not tell are missing."""
    wanted = set(inodes)
    found: dict[int, float] = {}
    if not wanted:
        return found
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(timeout)
            for family in (socket.AF_INET, socket.AF_INET6):
                sock.send(request(family))
                while not parse_dump(sock.recv(65536), wanted, found):
                    pass
    except OSError:
        pass
    return found


__all__ = ["parse_dump", "request", "socket_rtts"]
