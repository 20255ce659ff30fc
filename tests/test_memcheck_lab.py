"""Held migrations of a memcheck guest on real libvirtds, and the guest's own account after each.

One two-host lab for the module: the memcheck guest (a 32 MiB working set, 4 MiB/s rewritten,
verified every 500 ms) with a ``spice-libvirt watch`` client attached from the client
namespace. Migrations there and back, held by our controller and by the host agent (for a
plain ``virsh migrate``, a caller that is not us); after each the guest itself must say, from
the destination's console: alive, the same boot, a full pass since the migration, 0 errors.
"""

from __future__ import annotations

import subprocess

import pytest

from spice_libvirt_lab import libvirt_agent
from spice_libvirt_lab.libvirt_lab import LabState
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from spice_libvirt_lab.libvirt_status import account_after_pass, guest_accounts
from spice_libvirt_lab.memcheck import GuestAccount, MemcheckOptions
from tests.rigs.libvirt_lab import lab_marks

pytest.importorskip("libvirt")

RTT_MS = 50.0
OPTIONS = MemcheckOptions(working_set_mib=32, dirty_mib_s=4, pass_ms=500)
MIGRATIONS = 6

pytestmark = lab_marks(
    client_rtt_ms=RTT_MS, guest="memcheck", memcheck_options=OPTIONS, clients=True
)


def account(lab: LabState) -> GuestAccount:
    (only,) = guest_accounts(lab.lab_dir)
    return only


def checked_after(lab: LabState, before: GuestAccount, timeout: float = 60.0) -> GuestAccount:
    """The guest's account once it finished a whole pass on the destination."""
    after = account_after_pass(lab.lab_dir, before, timeout)
    assert after.alive, f"the guest is not alive after the migration: {after}"
    assert (after.passes or 0) >= (before.passes or 0) + 2, f"no whole pass since: {after}"
    return after


def assert_intact(before: GuestAccount, after: GuestAccount, destination: str) -> None:
    assert after.host == destination
    assert after.boot == before.boot, "the guest restarted"
    assert after.errors == 0, f"integrity errors: {after.first_bad}"
    assert after.fault is None


def test_controller_holds_there_and_back(shared_lab: LabState) -> None:
    """Both hold modes, alternated: the switchover hold (the default: the bulk moves at the
    domain's speed, the floor only near the end of the pass) and the floor from the start."""
    for i in range(MIGRATIONS):
        mode = ("switchover", "bulk")[i % 2]
        before = account(shared_lab)
        destination = "B" if before.host == "A" else "A"
        report = lab_migrate(shared_lab.lab_dir, watch=False, options={"hold_mode": mode})
        assert report.migration.status == "completed", report.error
        assert report.hold.applied == "libvirt-floor", report.hold.reason
        assert report.hold.mode == mode, report.notes
        assert report.outcome == "seamless", (report.outcome, report.hold.release_reason)
        if mode == "switchover":
            assert report.hold.plan_notes, "the plan said nothing of what it did"
            assert report.hold.samples > 0 or "from the start" in report.hold.plan_notes[0]
        else:
            assert report.hold.floor_ms == report.hold.held_ms
        assert_intact(before, checked_after(shared_lab, before), destination)


def test_agent_holds_plain_virsh_there_and_back(shared_lab: LabState) -> None:
    with libvirt_agent.running_agents(shared_lab):
        for _ in range(MIGRATIONS):
            before = account(shared_lab)
            src, dst = libvirt_agent.running_host(shared_lab)
            seen = len(libvirt_agent.verdicts(shared_lab, src))
            done = subprocess.run(
                libvirt_agent.plain_migrate_argv(shared_lab, src, dst),
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            verdict = libvirt_agent.next_verdict(shared_lab, src, seen)
            assert verdict.get("held_ms"), verdict
            assert_intact(before, checked_after(shared_lab, before), dst)
