"""Checks before a QMP migration changes anything, and the facts they leave behind.

Everything here only reads: QMP queries on both ends, and -- when a QEMU is local -- its
command line (``seamless-migration=on`` on the source; ``tls-channel`` and
``plaintext-channel`` on the destination, to know which channels it would accept in plain
text). A refusal raises :class:`~spice_libvirt.errors.MigrationError` ``("preflight", ...)``
with both QEMUs untouched.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from spice_libvirt import errors
from spice_libvirt.migration.evidence import Sessions, absorb, sessions_from_query_spice
from spice_libvirt.migration.policy import ChannelSecurity, security_from_qemu_spice
from spice_libvirt.migration.report import Endpoint
from spice_libvirt.qemu.qmp import EventStream, QMPConnection

#: migration states in which another migration is still under way
BUSY_STATES = frozenset({"setup", "active", "pre-switchover", "device", "cancelling"})


def qemu_pid_of_socket(path: str) -> int | None:
    """The PID listening on a unix socket (SO_PEERCRED), or None if it cannot be told."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", raw)
    return pid or None


def spice_options_of(pid: int) -> list[str] | None:
    """The comma-separated ``-spice`` options of QEMU ``pid`` (None: unknown)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    found: list[str] | None = None
    for i, arg in enumerate(argv[:-1]):
        if arg in (b"-spice", b"--spice"):
            # QEMU merges repeated -spice options into one set
            found = (found or []) + argv[i + 1].decode(errors="replace").split(",")
    return found


def seamless_option_of(pid: int) -> bool | None:
    """Whether QEMU ``pid`` runs with ``-spice ...,seamless-migration=on`` (None: unknown)."""
    opts = spice_options_of(pid)
    if opts is None:
        return None
    return any(o in ("seamless-migration=on", "seamless-migration=yes") for o in opts)


@dataclasses.dataclass(frozen=True)
class PreflightFacts:
    #: the source runs with seamless-migration=on (None: its command line is unknown)
    seamless_on: bool | None
    #: which channels the destination accepts in plain text (None: unknown)
    destination_security: ChannelSecurity | None


async def preflight(
    src: QMPConnection,
    dst: QMPConnection,
    source: Endpoint,
    destination: Endpoint,
    pids: tuple[int | None, int | None],
    note: Callable[[str], None],
    require_seamless: bool,
) -> PreflightFacts:
    """Check both ends and fill their :class:`Endpoint`; raise before anything changed."""

    def fail(message: str) -> errors.MigrationError:
        return errors.MigrationError("preflight", message)

    for conn, end, role in ((src, source, "source"), (dst, destination, "destination")):
        await _describe(conn, end, role, fail)
    if source.status_before not in ("running", "paused"):
        raise fail(f"the source is in state {source.status_before!r}, not running/paused")
    if destination.status_before != "inmigrate":
        raise fail(
            f"the destination is in state {destination.status_before!r}, not 'inmigrate' "
            "(start it with -incoming)"
        )
    mig = await src.execute_retrying("query-migrate")
    if mig.get("status") in BUSY_STATES:
        raise fail(f"a migration is already running on the source ({mig.get('status')})")
    for what, a, b in (
        ("QEMU versions", source.qemu_version, destination.qemu_version),
        ("spice-server versions", source.spice_version, destination.spice_version),
    ):
        if a != b:
            note(f"{what} differ: source {a}, destination {b}")
    src_pid, dst_pid = pids
    seamless_on = seamless_option_of(src_pid) if src_pid else None
    if seamless_on is False:
        message = "the source QEMU runs without -spice seamless-migration=on"
        if require_seamless:
            raise fail(message + " (--require-seamless)")
        note(message + ": the client can at best migrate semi-seamlessly")
    elif seamless_on is None:
        note("could not read the source command line: seamless-migration not checked")
    dst_opts = spice_options_of(dst_pid) if dst_pid else None
    security = (
        security_from_qemu_spice(dst_opts, plain_port=destination.spice_port is not None)
        if dst_opts is not None
        else None
    )
    return PreflightFacts(seamless_on, security)


async def _describe(
    conn: QMPConnection, end: Endpoint, role: str, fail: Callable[[str], errors.MigrationError]
) -> None:
    version = await conn.execute_retrying("query-version")
    q = version.get("qemu", {})
    end.qemu_version = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
    end.status_before = (await conn.execute_retrying("query-status"))["status"]
    spice = await conn.execute_retrying("query-spice")
    if not spice.get("enabled"):
        raise fail(f"SPICE is not enabled on the {role} QEMU")
    end.spice_version = spice.get("compiled-version")
    end.spice_host = spice.get("host")
    end.spice_port = spice.get("port")
    end.spice_tls_port = spice.get("tls-port")


async def source_sessions(src: QMPConnection, src_spice: EventStream) -> Sessions:
    """Clients on the source: ``query-spice`` plus the SPICE_INITIALIZED seen since connect.

    query-spice may list fewer channels than the client has (test-guest.md pitfall 4),
    so both are merged; an event only adds channels to a session query-spice showed.
    """
    sessions = sessions_from_query_spice(await src.execute_retrying("query-spice"))
    for event in src_spice.drain():
        if event.name != "SPICE_INITIALIZED":
            continue
        extra: Sessions = {}
        cid = absorb(extra, event.data)
        if cid is not None and cid in sessions:
            for channel, tls in extra[cid].channels.items():
                sessions[cid].add(channel, tls)
    return sessions


async def spice_sessions(conn: QMPConnection) -> Sessions:
    """One ``query-spice`` as sessions; empty if QEMU does not answer (it may be gone)."""
    try:
        return sessions_from_query_spice(await conn.execute("query-spice", timeout=3))
    except errors.QMPError:
        return {}


__all__ = [
    "PreflightFacts",
    "preflight",
    "qemu_pid_of_socket",
    "seamless_option_of",
    "source_sessions",
    "spice_options_of",
    "spice_sessions",
]
