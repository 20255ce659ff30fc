"""Named Linux network namespaces for the lab: create, wire, enter, empty and delete them.

The libvirt lab builds whole "hosts" out of network namespaces, so everything here is about
doing that without touching anything outside the lab:

* namespaces are made and removed with ``ip netns`` so they appear in ``ip netns list`` and
  any administrator can see (and clean) them with the usual tools;
* links (bridges, veth pairs) are created *inside* the namespaces, so their names never clash
  with the root namespace or with another lab;
* :func:`pids_in` finds processes by the namespace they live in, which is how the lab finds
  (and ends) exactly the processes it started, even after a crash lost their PIDs;
* :func:`call_in` and :func:`socket_in` enter a namespace from one *thread* only (``setns``
  affects the calling thread), so the rest of the process, including an asyncio loop, stays
  where it is. A socket keeps the namespace it was created in for its whole life, which lets
  the embedded SPICE client talk from the client namespace without a subprocess.

Processes are tracked as :class:`ProcRef` (PID plus kernel start time) so a recycled PID is
never mistaken for one of ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import tenacity
from pydantic import BaseModel

from spice_libvirt.errors import LabError
from spice_libvirt_lab.procs import (
    proc_start_time,
    same_process_alive,
    same_process_present,
    wait_exit,
)

#: Where ``ip netns`` keeps the bind mounts that name network namespaces.
NETNS_RUN_DIR = Path("/run/netns")
#: Where ``ip netns exec`` looks for per-namespace replacements of files in /etc.
NETNS_ETC_DIR = Path("/etc/netns")

_CLONE_NEWNET = 0x40000000
_IP = "ip"
_DEFAULT_TIMEOUT = 20.0

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _run(argv: Sequence[str], *, timeout: float = _DEFAULT_TIMEOUT, what: str = "") -> str:
    """Run a short administrative command; failures become :class:`LabError` with its stderr."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: install it (iproute2/util-linux)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what or ' '.join(argv)}: timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise LabError(f"{what or ' '.join(argv)}: {detail}")
    return proc.stdout


# --------------------------------------------------------------------------- namespaces


def exists(name: str) -> bool:
    """Whether a named network namespace exists."""
    return (NETNS_RUN_DIR / name).exists()


def list_names() -> list[str]:
    """Names of all network namespaces known to ``ip netns``."""
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def add(name: str) -> None:
    """Create a named network namespace with its loopback up.

    Raises :class:`LabError` if the name is taken: a lab never adopts a namespace it did not
    create, because it would later delete it.
    """
    if exists(name):
        raise LabError(f"network namespace {name!r} already exists")
    _run([_IP, "netns", "add", name], what=f"create network namespace {name}")
    ip(name, "link", "set", "lo", "up")


def delete(name: str, *, kill_timeout: float = 5.0) -> None:
    """End every process still inside the namespace, then delete it. Missing is fine.

    The processes are found by namespace identity (see :func:`pids_in`), so only processes
    living in this namespace are signalled.
    """
    if not exists(name):
        return
    terminate(pids_in(name), timeout=kill_timeout)
    _run([_IP, "netns", "delete", name], what=f"delete network namespace {name}")
    etc = NETNS_ETC_DIR / name
    if etc.is_dir():
        for child in etc.iterdir():
            child.unlink()
        etc.rmdir()


def inode(name: str) -> int:
    """The namespace's inode number: its identity, as in ``/proc/<pid>/ns/net``."""
    try:
        return os.stat(NETNS_RUN_DIR / name).st_ino
    except FileNotFoundError as exc:
        raise LabError(f"network namespace {name!r} does not exist") from exc


def pids_in(name: str) -> list[int]:
    """PIDs of all processes whose network namespace is ``name`` (like ``ip netns pids``)."""
    if not exists(name):
        return []
    wanted = inode(name)
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino == wanted:
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return sorted(found)


def write_etc_file(name: str, filename: str, content: str) -> Path:
    """Write ``/etc/netns/<name>/<filename>``, which ``ip netns exec`` binds over /etc/<filename>.

    Used for a client namespace's ``hosts`` file so programs started there resolve lab hosts.
    :func:`delete` removes the directory again.
    """
    directory = NETNS_ETC_DIR / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(content)
    return path


# --------------------------------------------------------------------------- links


def ip(name: str | None, *args: str) -> str:
    """Run ``ip [-n name] args...`` and return its stdout."""
    argv = [_IP, *(["-n", name] if name else []), *args]
    return _run(argv, what=f"ip {' '.join(argv[1:])}")


def add_bridge(ns: str, bridge: str) -> None:
    """Create a Linux bridge inside ``ns`` and bring it up."""
    ip(ns, "link", "add", bridge, "type", "bridge")
    ip(ns, "link", "set", "dev", bridge, "up")


def add_veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """Create a veth pair with one end ``if_a`` in ``ns_a`` and the other ``if_b`` in ``ns_b``.

    The pair is created inside ``ns_a`` and the peer moved at creation time, so no interface
    ever appears in the root namespace (where its name could clash).
    """
    ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)


def link_up(ns: str, ifname: str, *, master: str | None = None, promisc: bool = False) -> None:
    """Bring an interface up, optionally enslaved to a bridge and/or promiscuous."""
    args = ["link", "set", "dev", ifname]
    if master:
        args += ["master", master]
    if promisc:
        args += ["promisc", "on"]
    ip(ns, *args, "up")


def add_address(ns: str, ifname: str, cidr: str) -> None:
    """Assign an address (``10.251.7.1/24``) and bring the interface up."""
    ip(ns, "addr", "add", cidr, "dev", ifname)
    ip(ns, "link", "set", "dev", ifname, "up")


def set_sysctl(ns: str, key: str, value: str) -> None:
    """Write a per-namespace sysctl (``net.ipv6.conf.all.disable_ipv6``) from inside ``ns``."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as fh:
            fh.write(value)

    call_in(ns, write)


# --------------------------------------------------------------------------- entering


@contextlib.contextmanager
def _entered(name: str) -> Iterator[None]:
    """Move the *calling thread* into ``name`` and back. Use only from a private thread."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
    except FileNotFoundError as exc:
        os.close(home)
        raise LabError(f"network namespace {name!r} does not exist") from exc
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home, _CLONE_NEWNET) != 0:  # pragma: no cover - kernel refused
                err = ctypes.get_errno()
                raise LabError(f"cannot return from namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(home)


def enter_for_good(name: str) -> None:
    """Move the calling thread into ``name`` without a way back.

    Meant for single-threaded helper processes (the delay bridge) that exist only to work
    inside one namespace.
    """
    try:
        fd = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise LabError(f"network namespace {name!r} does not exist") from exc
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"cannot enter network namespace {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(name: str, fn: Callable[[], T], *, timeout: float = _DEFAULT_TIMEOUT) -> T:
    """Call ``fn()`` in a fresh thread that lives in network namespace ``name``; return its result.

    Only the helper thread changes namespace, so this is safe from a program running an
    asyncio loop. Exceptions raised by ``fn`` propagate. Blocking ``fn`` is bounded by
    ``timeout`` (the thread is left to finish on its own if it overruns).
    """
    box: dict[str, object] = {}

    def runner() -> None:
        try:
            with _entered(name):
                box["result"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=runner, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"call in network namespace {name!r} timed out after {timeout:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def socket_in(
    name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket that belongs to network namespace ``name`` for its whole life.

    Connect or bind it from any thread; pass it to ``asyncio.open_connection(sock=...)``.
    """
    return call_in(name, lambda: socket.socket(family, type))


def tcp_connect_ms(name: str, host: str, port: int, *, timeout: float = 5.0) -> float:
    """Milliseconds for one TCP handshake from namespace ``name`` to ``host:port``.

    A connect completes after SYN / SYN-ACK, i.e. one round trip: this is how the lab measures
    the client RTT (the machine has no ``ping``).
    """
    sock = socket_in(name)
    try:
        sock.settimeout(timeout)
        start = time.perf_counter()
        try:
            sock.connect((host, port))
        except OSError as exc:
            raise LabError(f"{host}:{port} unreachable from namespace {name}: {exc}") from exc
        return (time.perf_counter() - start) * 1000.0
    finally:
        sock.close()


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ``argv`` inside namespace ``name`` (with its /etc/netns files)."""
    return [_IP, "netns", "exec", name, *argv]


def run_in(
    name: str, argv: Sequence[str], *, timeout: float = _DEFAULT_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion inside namespace ``name``; capture its output."""
    try:
        proc = subprocess.run(
            exec_argv(name, argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} in {name}: timed out after {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise LabError(f"{' '.join(argv)} in {name}: {detail}")
    return proc


# --------------------------------------------------------------------------- processes


class ProcRef(BaseModel):
    """A process we started: its PID and kernel start time (jiffies since boot).

    The start time makes the reference immune to PID reuse: after a crash and a reboot or a
    long pause, a recorded PID may belong to somebody else, and we must never signal that.
    """

    pid: int
    start_time: int
    what: str = ""

    @classmethod
    def of(cls, pid: int, what: str = "") -> ProcRef:
        start = proc_start_time(pid)
        if start is None:
            raise LabError(f"{what or 'process'} {pid} exited right after it started")
        return cls(pid=pid, start_time=start, what=what)

    def alive(self) -> bool:
        """Whether this very process (not a recycled PID) still runs (zombies count as gone)."""
        return same_process_alive(self.pid, self.start_time)

    def present(self) -> bool:
        """Whether this very process is still in the process table: alive, or ended and not
        yet reaped by its parent."""
        return same_process_present(self.pid, self.start_time)


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our own child (otherwise PID 1 will)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def terminate(
    targets: Sequence[int | ProcRef], *, timeout: float = 5.0, sig: int = signal.SIGTERM
) -> list[int]:
    """Send ``sig`` to each target, wait up to ``timeout`` s, then SIGKILL what is left.

    Plain ints are PIDs found by namespace membership (they are ours by construction);
    :class:`ProcRef` targets are only signalled while their start time still matches.
    Returns the PIDs that had to be killed with SIGKILL.
    """
    refs: list[ProcRef] = []
    for target in targets:
        if isinstance(target, ProcRef):
            if target.alive():
                refs.append(target)
        else:
            start = proc_start_time(target)
            if start is not None:
                refs.append(ProcRef(pid=target, start_time=start))
    for ref in refs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(ref.pid, sig)
    if not _wait_all_exit(refs, timeout):
        killed: list[int] = []
        for ref in refs:
            if ref.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ref.pid, signal.SIGKILL)
                killed.append(ref.pid)
        _wait_all_exit(refs, 30.0)
        return killed
    return []


def wait_reaped(
    refs: Sequence[ProcRef], *, timeout: float, interval: float = 0.02
) -> list[ProcRef]:
    """Wait until each of ``refs`` has left the process table; those still in it after
    ``timeout`` s (alive, or ended and not reaped).

    An ended process is gone once its parent reaps it: ours are reaped here; one whose
    parent is PID 1 (a daemon a finished command started) when PID 1 gets to it, which on
    this machine takes up to 1.8 s (its init reaps every 1.2-1.8 s; systemd at once).
    """
    deadline = time.monotonic() + timeout
    while True:
        left = [ref for ref in refs if ref.present()]
        for ref in left:
            _reap(ref.pid)
        left = [ref for ref in left if ref.present()]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(interval)


def _wait_all_exit(refs: Sequence[ProcRef], timeout: float) -> bool:
    """Await every process's end on its pidfd (one deadline for all), reaping our children."""
    deadline = time.monotonic() + timeout
    for ref in refs:
        wait_exit(ref.pid, ref.start_time, max(0.0, deadline - time.monotonic()))
        _reap(ref.pid)
    return not any(ref.alive() for ref in refs)


def _transient(exc: BaseException) -> bool:
    """Errors that mean "not yet" while something starts: a socket or file not there yet."""
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError | BlockingIOError):
        return True
    return isinstance(exc, OSError) and exc.errno in (
        errno.ENOENT,
        errno.ECONNREFUSED,
        errno.EAGAIN,
    )


def wait_for(
    predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it holds; :class:`LabError` naming ``what`` after ``timeout`` s.

    "Not yet" is a false result or a transient :class:`OSError` (see :func:`_transient`);
    any other exception ends the wait at once and propagates.
    """
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(interval),
        retry=tenacity.retry_if_result(lambda ok: not ok) | tenacity.retry_if_exception(_transient),
        reraise=False,
    )
    try:
        retrying(predicate)
    except tenacity.RetryError as exc:
        raise LabError(f"timed out after {timeout:.1f} s waiting for {what}") from exc
