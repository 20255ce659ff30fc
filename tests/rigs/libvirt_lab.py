"""The two-host libvirt lab for tests: its marks, one way to build it, one leak check.

A module that shares one lab across its tests sets ``pytestmark = lab_marks(**options)``
(the options of :func:`spice_libvirt_lab.libvirt_lab.up`) and takes the module-scoped
``libvirt_lab`` fixture (``tests/conftest.py``); a test that builds its own lab (odd
options, a lab it breaks on purpose) takes ``libvirt_lab_dir`` and calls ``up`` itself. Either
way, at the end :func:`down_and_check` tears the lab down and fails the test if anything the
lab started survived.

The lab lives in ``<short temp dir>/libvirt``, the place ``spice-libvirt lab --dir <temp
dir>`` looks for it, so a test can drive the same lab through the CLI (:func:`cli_dir`).
Other labs (other test runs, other engineers) come and go on the machine meanwhile, so the
checks are about this lab's own processes, namespaces and mounts, never global lists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt_lab import libvirt_agent, libvirt_lab, netns
from spice_libvirt_lab.labdir import LIBVIRT_SUBDIR
from spice_libvirt_lab.libvirt_state import DownReport, LabState, recorded_processes

#: the marks of every module that builds the lab
LIBVIRT_LAB = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("libvirtd") is None, reason="libvirtd is not installed"),
]


def lab_marks(**options: Any) -> list[pytest.MarkDecorator]:
    """A module's ``pytestmark``: the lab's marks and the options of its shared lab."""
    return [*LIBVIRT_LAB, pytest.mark.libvirt_lab(**options)]


def cli_dir(state: LabState) -> Path:
    """What ``spice-libvirt lab --dir`` takes to reach this lab."""
    return state.lab_dir.parent


def cli_json(*argv: str, timeout: float = 300) -> tuple[int, dict[str, Any], str]:
    """``spice-libvirt ARGV`` (with ``--json`` among them): its exit status, its report and
    its stderr; a run that printed no report fails the test with what it said."""
    done = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout), done.stderr


def lab_processes(state: LabState) -> list[netns.ProcRef]:
    """Every process of the lab: the recorded ones (delay bridge, libvirtd, virtlogd, their
    subreaper, sshd, agents, clients) and whatever lives in its namespaces now (guests included)."""
    found = recorded_processes(state)
    for name in state.namespaces:
        for pid in netns.pids_in(name):
            with contextlib.suppress(Exception):  # gone between the listing and the look
                found.append(netns.ProcRef.of(pid))
    return found


def assert_lab_gone(state: LabState, processes: list[netns.ProcRef]) -> None:
    """None of ``processes`` alive -- and none the lab recorded still in the process table,
    which ``lab down`` waits for --, no namespace with the lab's prefix, no mount of it."""
    recorded = {(r.pid, r.start_time) for r in recorded_processes(state)}
    left = [
        f"{p.what or 'pid'} {p.pid}"
        for p in processes
        if (p.present() if (p.pid, p.start_time) in recorded else p.alive())
    ]
    assert left == [], f"lab {state.id} left processes behind: {left}"
    names = [n for n in netns.list_names() if n.startswith(state.prefix)]
    assert names == [], f"lab {state.id} left namespaces: {names}"
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if state.prefix in line or str(state.run_dir) in line
    ]
    assert mounts == [], f"lab {state.id} left mounts: {mounts}"


def down_and_check(path: Path) -> DownReport:
    """``lab down`` on ``path`` (a lab directory, built or not), then the leak check."""
    state = libvirt_lab.load_state(path)
    processes = lab_processes(state) if state is not None else []
    report = libvirt_lab.down(path)  # a LabError if down itself saw something survive
    if state is not None:
        assert_lab_gone(state, processes)
    return report


@contextlib.contextmanager
def lab_directory() -> Iterator[Path]:
    """A fresh ``<temp>/libvirt`` for a lab; torn down and checked afterwards, also when the
    block failed."""
    top = Path(tempfile.mkdtemp(prefix="sl-"))
    path = top / LIBVIRT_SUBDIR
    try:
        yield path
    finally:
        try:
            down_and_check(path)
        finally:
            shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def running_lab(**options: Any) -> Iterator[LabState]:
    """``libvirt_lab.up(**options)`` in a fresh directory for the block; checked after."""
    with lab_directory() as path:
        yield libvirt_lab.up(path, **options)


def fresh_state(state: LabState) -> LabState:
    """The lab's state as it is on disk now (where the guest runs, what was started)."""
    now = libvirt_lab.load_state(state.lab_dir)
    assert now is not None, f"no lab in {state.lab_dir}"
    return now


@contextlib.contextmanager
def guest_kept_running(state: LabState) -> Iterator[None]:
    """For a test of a shared lab that may leave its guest running nowhere -- libvirt's own
    rule when a libvirtd ends mid-migration at the wrong moment: the source paused for the
    caller to decide, the destination's incoming domain dropped. Afterwards (also when the
    block failed) a guest that runs on neither host is started again on A
    (:func:`libvirt_lab.restart_guest`), so the module's later tests start from a running
    guest, whatever this one found (the test asserts what happened)."""
    try:
        yield
    finally:
        if libvirt_agent.where_running(libvirt_agent.domain_states(state)) is None:
            libvirt_lab.restart_guest(state.lab_dir)
