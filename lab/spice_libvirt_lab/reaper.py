"""A lab host's subreaper: its QEMUs are reaped the moment they exit, as on a hypervisor.

libvirt ends the source QEMU of a finished migration with SIGTERM and then looks every
200 ms (``kill(pid, 0)``) whether it is gone before the migration call returns; a zombie
still counts as there. A QEMU that libvirt started is daemonized, so its parent is the
nearest subreaper or PID 1. On a hypervisor PID 1 (systemd) reaps at once; this machine's
PID 1 reaps every 1.2-1.8 s, and every lab migration's return waited for it, in 200 ms
steps (``docs/findings.md``). A subreaper above libvirtd is the parent of libvirtd's
daemonized children, reaps them when they exit, and leaves nothing to wait for.

Run as ``python -I -m spice_libvirt_lab.reaper PIDFILE -- libvirtd -d ...`` where the
host's daemons start: it detaches (the starting command returns once the daemon has),
becomes a subreaper, runs the daemon's own command (which daemonizes under it), and reaps
until it has no child left.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

#: prctl(2) option
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_until_alone() -> None:
    """Reap every child (and adopted orphan) as it exits; return when none is left."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m spice_libvirt_lab.reaper PIDFILE -- COMMAND...", file=sys.stderr)
        return 2
    pidfile, command = Path(argv[0]), argv[2:]
    read_end, write_end = os.pipe()
    if os.fork() > 0:  # the caller's process: return the daemon's start status
        os.close(write_end)
        with os.fdopen(read_end, "rb") as status:
            answer = status.read()
        return int(answer) if answer.strip().lstrip(b"-").isdigit() else 1
    os.close(read_end)
    os.setsid()
    become_subreaper()
    pidfile.write_text(f"{os.getpid()}\n")
    rc = subprocess.call(command, stdin=subprocess.DEVNULL)  # daemonizes: returns at once
    with os.fdopen(write_end, "wb") as status:
        status.write(str(rc).encode())
    if rc == 0:
        reap_until_alone()
    return 0


if __name__ == "__main__":  # pragma: no cover - run by the host's namespace script
    sys.exit(main(sys.argv[1:]))
