"""Free TCP ports for lab processes on a machine shared with other test runs.

Several QEMUs and libvirtds run here at once, started by people and tests we know nothing
about, so a fixed port such as 5900 is never safe. The kernel knows which ports are free:
binding to port 0 makes it choose one. The choice is only a hint (the port is free again
the moment we close our socket, and someone else may take it before QEMU binds it), so
callers that pick ports this way must still treat "address already in use" as a reason to
retry with new ports; :func:`spice_libvirt_lab.qemu_process.start_qemu` does.

Two measures make collisions unlikely in practice:

* ports asked for together are bound *at the same time*, so they are distinct;
* ports this process has handed out recently are not handed out again, because Linux
  readily returns a just-closed ephemeral port to the next ``bind(0)``.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading

from spice_libvirt.errors import LabError

#: How many recently handed-out ports this process remembers and avoids.
_RECENT_LIMIT = 512
_recent: collections.deque[int] = collections.deque(maxlen=_RECENT_LIMIT)
_lock = threading.Lock()


def _family_for(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_tcp_ports(count: int, host: str = "127.0.0.1", *, attempts: int = 20) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago.

    The ports are bound simultaneously and released together just before returning, and
    none of them was returned by an earlier call in this process (within the last
    ``_RECENT_LIMIT`` ports). Raises :class:`LabError` if the kernel will not give enough.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    family = _family_for(host)
    with _lock:
        held: list[socket.socket] = []
        ports: list[int] = []
        try:
            for _ in range(count * attempts):
                if len(ports) == count:
                    break
                sock = socket.socket(family, socket.SOCK_STREAM)
                held.append(sock)
                try:
                    sock.bind((host, 0))
                except OSError as exc:
                    raise LabError(f"cannot bind a TCP port on {host}: {exc}") from exc
                port = int(sock.getsockname()[1])
                if port in _recent or port in ports:
                    continue  # keep it bound so the kernel moves on to another one
                ports.append(port)
            if len(ports) < count:
                raise LabError(f"could not find {count} unused TCP ports on {host}")
            _recent.extend(ports)
            return ports
        finally:
            for sock in held:
                with contextlib.suppress(OSError):
                    sock.close()


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """Return one TCP port that was free on ``host`` a moment ago (see :func:`free_tcp_ports`)."""
    return free_tcp_ports(1, host)[0]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``port`` can be bound on ``host`` right now (a probe, not a reservation)."""
    with socket.socket(_family_for(host), socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
