"""The ssh connection masters a lab's Ansible runs leave behind, and their end.

Ansible shares one ssh connection per host (``ControlMaster=auto``, ``ControlPersist=60s``);
the master detaches into a session of its own (``daemon()``), so ending the process group of
``ansible-playbook`` does not reach it, and it outlives the playbook by its idle time, or for
as long as its host stays silent once the host is gone. A lab points Ansible's control
sockets into a directory of its own (``ansible_control_path_dir``); ssh titles each master
``ssh: <socket> [mux]``, which names that directory, so the lab can find its masters and
no one else's.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from spice_libvirt_lab.netns import ProcRef, terminate
from spice_libvirt_lab.procs import proc_start_time, wait_exit


def masters(control_dir: Path) -> list[int]:
    """PIDs of the ssh masters serving a socket in ``control_dir``."""
    prefix = f"ssh: {control_dir.absolute()}/".encode()
    pids: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (proc / "cmdline").read_bytes().startswith(prefix):
                pids.append(int(proc.name))
    return pids


def end_masters(control_dir: Path, *, timeout: float = 10.0) -> list[int]:
    """Ask every master in ``control_dir`` to exit (``ssh -O exit``), then end by PID what
    did not within ``timeout``; the PIDs of the masters found."""
    found = [
        ProcRef(pid=pid, start_time=start)
        for pid in masters(control_dir)
        if (start := proc_start_time(pid)) is not None
    ]
    sockets = [p for p in control_dir.iterdir() if p.is_socket()] if control_dir.is_dir() else []
    for socket in sockets:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                ["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "lab-host"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
    left = [ref for ref in found if not wait_exit(ref.pid, ref.start_time, timeout)]
    if left:
        terminate(left, timeout=timeout)
    return sorted(ref.pid for ref in found)
