"""A process the lab ended is gone only once its parent has reaped it.

``lab down`` stops the per-host daemons (the agents, sshd) by PID; once the ``lab up`` that
started them has exited, their parent is PID 1, and an ended process stays in the process
table -- a zombie, ``/proc/PID`` still there -- until PID 1 reaps it (up to 1.8 s on this
machine). ``down`` reports nothing left only once they have left the table
(:func:`spice_libvirt_lab.netns.wait_reaped`); these tests pin the two views of a process
that down and the leak check (``tests/rigs/libvirt_lab.py``) rely on.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from spice_libvirt_lab import netns
from spice_libvirt_lab.procs import wait_exit


def test_an_ended_child_is_not_alive_but_present_until_reaped() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    ref = netns.ProcRef.of(proc.pid, "sleep")
    os.kill(proc.pid, signal.SIGKILL)
    assert wait_exit(ref.pid, ref.start_time, 10.0)
    assert not ref.alive()
    assert ref.present()  # a zombie: nobody has reaped it yet
    assert Path(f"/proc/{proc.pid}").exists()
    assert netns.wait_reaped([ref], timeout=5.0) == []  # ours: reaped there
    assert not ref.present()
    assert not Path(f"/proc/{proc.pid}").exists()


def test_an_ended_orphan_is_waited_for_until_its_parent_reaped_it() -> None:
    # a grandchild whose parent exits at once: its parent becomes PID 1 (or a subreaper)
    shell = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    ref = netns.ProcRef.of(int(shell.stdout), "orphan")
    assert netns.terminate([ref], timeout=5.0) == []
    assert not ref.alive()
    assert netns.wait_reaped([ref], timeout=10.0) == []
    assert not Path(f"/proc/{ref.pid}").exists()


def test_a_process_still_running_is_returned_after_the_bound() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        ref = netns.ProcRef.of(proc.pid, "sleep")
        assert netns.wait_reaped([ref], timeout=0.1) == [ref]
    finally:
        proc.kill()
        proc.wait()
