"""``python -m spice_libvirt_lab.netns_proxy NETNS HOST PORT``: ssh's ProxyCommand for labs.

The lab's hosts have addresses only inside their network namespaces. This relay enters
``NETNS`` (the whole process: it exists for nothing else), connects to ``HOST:PORT`` there
and copies stdin to the socket and the socket to stdout until either side closes: what
``nc`` would do, without needing netcat on the machine.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from spice_libvirt.errors import LabError
from spice_libvirt_lab import netns


def _pump_stdin(sock: socket.socket) -> None:
    while chunk := os.read(0, 65536):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)


def relay(netns_name: str, host: str, port: int) -> int:
    netns.enter_for_good(netns_name)
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        print(f"netns_proxy: {host}:{port} in {netns_name}: {exc}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
    while chunk := sock.recv(65536):
        view = memoryview(chunk)
        while view:
            view = view[os.write(1, view) :]
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: python -m spice_libvirt_lab.netns_proxy NETNS HOST PORT", file=sys.stderr)
        return 2
    try:
        return relay(argv[0], argv[1], int(argv[2]))
    except (OSError, LabError) as exc:
        print(f"netns_proxy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
