"""Held migrations of a memcheck guest on real libvirtds, and the guest's own account after each.

One two-host lab for the module: the memcheck guest (a 32 MiB working set, 4 MiB/s rewritten,
verified every 500 ms) with a ``spice-libvirt watch`` client attached from the client
namespace. Migrations there and back, held by our controller and by the host agent (for a
plain ``virsh migrate``, a caller that is not us); after each the guest itself must say, from
the destination's console: alive, the same boot, a full pass since the migration, 0 errors.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt.errors import HookError
from spice_libvirt.hook.journal import Journal
from spice_libvirt_lab import libvirt_agent, libvirt_lab, netns
from spice_libvirt_lab.libvirt_lab import LabState
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from spice_libvirt_lab.libvirt_status import guest_accounts
from spice_libvirt_lab.memcheck import GuestAccount, MemcheckOptions
from tests.lab_marks import LIBVIRT_LAB

pytest.importorskip("libvirt")

pytestmark = LIBVIRT_LAB

RTT_MS = 50.0
OPTIONS = MemcheckOptions(working_set_mib=32, dirty_mib_s=4, pass_ms=500)
MIGRATIONS = 6


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    top = Path(tempfile.mkdtemp(prefix="sl-"))
    path = top / "lab"
    try:
        yield libvirt_lab.up(
            path, client_rtt_ms=RTT_MS, guest="memcheck", memcheck_options=OPTIONS, clients=True
        )
    finally:
        try:
            assert libvirt_lab.down(path).leftovers == []
        finally:
            shutil.rmtree(top, ignore_errors=True)


def account(lab: LabState) -> GuestAccount:
    (only,) = guest_accounts(lab.lab_dir)
    return only


def checked_after(lab: LabState, before: GuestAccount, timeout: float = 60.0) -> GuestAccount:
    """The guest's account once it finished a whole pass on the destination."""
    assert before.passes is not None
    deadline = time.monotonic() + timeout
    now = account(lab)
    while time.monotonic() < deadline:
        now = account(lab)
        if now.alive and now.passes is not None and now.passes >= before.passes + 2:
            return now
        time.sleep(0.2)
    raise AssertionError(f"the guest did not finish a pass after the migration: {now}")


def assert_intact(before: GuestAccount, after: GuestAccount, destination: str) -> None:
    assert after.host == destination
    assert after.boot == before.boot, "the guest restarted"
    assert after.errors == 0, f"integrity errors: {after.first_bad}"
    assert after.fault is None


def test_controller_holds_there_and_back(lab: LabState) -> None:
    for _ in range(MIGRATIONS):
        before = account(lab)
        destination = "B" if before.host == "A" else "A"
        report = lab_migrate(lab.lab_dir, watch=False)
        assert report.migration.status == "completed", report.error
        assert report.hold.applied != "none", report.hold.reason
        assert_intact(before, checked_after(lab, before), destination)


@contextlib.contextmanager
def agents(lab: LabState) -> Iterator[None]:
    refs = [libvirt_agent.start_agent(lab, host) for host in ("A", "B")]
    try:
        yield
    finally:
        netns.terminate([r for r in refs if r.alive()], timeout=15.0)


def agent_verdicts(lab: LabState, host: str) -> list[dict[str, Any]]:
    journal = libvirt_agent.journal_path(lab, host)
    try:
        entries = Journal(journal).entries(limit=50) if journal.exists() else []
    except HookError:  # created, its table not yet
        return []
    return [json.loads(e.detail) for e in entries if e.source == "agent"]


def next_verdict(lab: LabState, host: str, seen: int, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = agent_verdicts(lab, host)
        if len(found) > seen:
            return found[0]  # newest first
        time.sleep(0.1)
    raise AssertionError(f"no agent verdict on host {host} within {timeout} s")


def test_agent_holds_plain_virsh_there_and_back(lab: LabState) -> None:
    with agents(lab):
        for _ in range(MIGRATIONS):
            before = account(lab)
            src, dst = libvirt_agent.running_host(lab)
            seen = len(agent_verdicts(lab, src))
            done = subprocess.run(
                libvirt_agent.plain_migrate_argv(lab, src, dst),
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            verdict = next_verdict(lab, src, seen)
            assert verdict.get("held_ms"), verdict
            assert_intact(before, checked_after(lab, before), dst)
