"""On real libvirtds: nobody can stretch a hold, and a client that cannot reach the
destination is named for what happened to it.

One two-host lab for the module (the memcheck guest with 128 MiB of data: the agent's
taint-free hold needs memory to move, and QEMU 7.2's TCG can lose the linux guest on arrival;
client 50 ms away). remote-viewer (a client we do not drive) and our embedded client,
the host agent and our controller, for real:

* a ticket-less TCP connection held open to the source's SPICE port, and an impostor
  process named like the guest, during an agent-held migration: the hold waits for the
  viewer's five channels only, and ends as soon as they are across;
* a firewall in the client's namespace that silently drops its packets to the destination:
  the hold ends as soon as it is clear that nothing of the client reaches the destination
  (not at the bound), the migration completes and the outcome is ``client-lost`` (exit 15)
  with its cause -- for the agent (remote-viewer), our controller (remote-viewer, and
  ``--require-seamless``, which leaves the VM where it was) and our embedded client.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

import pytest

from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.policy import NO_CONTACT
from spice_libvirt_lab import libvirt_agent, libvirt_lab, netns
from spice_libvirt_lab.firewall import dropping
from spice_libvirt_lab.libvirt_agent import next_verdict, verdicts
from spice_libvirt_lab.libvirt_agent import running_agents as agents
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from spice_libvirt_lab.libvirt_state import LabState, save
from spice_libvirt_lab.memcheck import MemcheckOptions
from tests.rigs.libvirt_lab import fresh_state, lab_marks
from tests.rigs.viewer import XServer
from tests.test_agent_lab import viewer, virsh_migrate

pytest.importorskip("libvirt")

RTT_MS = 50.0
pytestmark = lab_marks(
    client_rtt_ms=RTT_MS, guest="memcheck", memcheck_options=MemcheckOptions(working_set_mib=128)
)


def _here(lab: LabState) -> tuple[str, str]:
    """(source, destination) now; the lab's record follows plain virsh migrations."""
    src, dst = libvirt_agent.running_host(lab)
    state = fresh_state(lab)
    if state.active_host != src:
        state.active_host = src
        save(state)
    return src, dst


@contextlib.contextmanager
def impostor(lab: LabState, host: str) -> Iterator[subprocess.Popen[bytes]]:
    """An unprivileged process inside ``host`` whose argv names the guest as QEMU's does."""
    argv = [
        "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
        "/usr/bin/python3", "-c", "import time; time.sleep(600)",
        "-name", f"guest={lab.domain},debug-threads=on",
    ]  # fmt: skip
    proc = subprocess.Popen(lab.host(host).enter_argv(argv), stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_bare_connection_and_an_impostor_do_not_stretch_an_agent_hold(
    shared_lab: LabState, x_server: XServer
) -> None:
    src, dst = _here(shared_lab)
    before = len(verdicts(shared_lab, src))
    with agents(shared_lab), impostor(shared_lab, src):
        # opened once the agents watch: spice-server reports it accepted, never linked
        bare = netns.socket_in(shared_lab.client.netns)
        v = None
        try:
            bare.connect((shared_lab.hosts[src].config.ip, 5900))
            v = viewer(shared_lab, x_server.display, src, "rv-bare")
            virsh_migrate(shared_lab, src, dst)
            verdict = next_verdict(shared_lab, src, before)
        finally:
            bare.close()
            if v is not None:
                v.stop()
    assert verdict["outcome"] == "seamless", verdict
    assert verdict["channels"] == 5  # the viewer's five, not the bare connection
    assert any("never linked a channel" in n for n in verdict["notes"]), verdict["notes"]
    assert verdict["held_ms"] < 10_000  # the bound is 15 s
    assert "channels" in verdict["released_why"]


def test_a_firewalled_client_is_named_lost_by_the_agent(
    shared_lab: LabState, x_server: XServer
) -> None:
    src, dst = _here(shared_lab)
    before = len(verdicts(shared_lab, src))
    with agents(shared_lab):
        v = viewer(shared_lab, x_server.display, src, "rv-agent-firewalled")
        try:
            with dropping(shared_lab.client.netns, shared_lab.hosts[dst].config.ip):
                wall = virsh_migrate(shared_lab, src, dst)
                verdict = next_verdict(shared_lab, src, before)
                v.stop()  # its SYNs to the destination never arrived: nothing half-linked
        finally:
            v.stop()
    assert verdict["outcome"] == "client-lost", verdict
    assert verdict["released_why"].startswith(NO_CONTACT), verdict["released_why"]
    assert verdict["held_ms"] < 5_000  # the cause known after 3 s, not the 15 s bound
    assert verdict["connection_id_kept"] is False
    assert wall < 60


def test_a_firewalled_client_is_named_lost_by_our_controller(
    shared_lab: LabState, x_server: XServer
) -> None:
    src, dst = _here(shared_lab)
    v = viewer(shared_lab, x_server.display, src, "rv-controller-firewalled")
    try:
        with dropping(shared_lab.client.netns, shared_lab.hosts[dst].config.ip):
            t0 = time.monotonic()
            kept = lab_migrate(shared_lab.lab_dir, watch=False, options={"require_seamless": True})
            refused_after = time.monotonic() - t0
            assert libvirt_lab.status(shared_lab.lab_dir).active_host == src
            report = lab_migrate(shared_lab.lab_dir, watch=False)
            v.stop()
    finally:
        v.stop()
    # --require-seamless: given up as soon as the cause was known, the VM where it was
    assert kept.outcome == "cancelled", kept.notes
    assert kept.link_wait.result == "unreachable"
    assert kept.placement == "source"
    assert for_report(kept) is ExitCode.MIGRATION_FAILED
    assert refused_after < 30
    # without it: the VM moved, the client could not follow -- said so, with the cause
    assert report.migration.status == "completed", report.notes
    assert report.outcome == "client-lost", (report.outcome, report.notes)
    assert for_report(report) is ExitCode.CLIENT_LOST
    assert (report.client_lost_cause or "").startswith(NO_CONTACT)
    assert report.hold.held_ms is not None
    assert report.hold.held_ms < 5_000
    assert [c.path for c in report.clients] == ["lost"]


def test_a_firewalled_embedded_client_is_named_lost(shared_lab: LabState) -> None:
    _, dst = _here(shared_lab)
    with dropping(shared_lab.client.netns, shared_lab.hosts[dst].config.ip):
        report = lab_migrate(shared_lab.lab_dir, watch=True)
    assert report.migration.status == "completed", report.notes
    assert report.link_wait.result == "unreachable", report.link_wait
    assert report.hold.held_ms is not None
    # the cause known from the destination's events after 3 s, before the client's own
    # CONNECT_ERROR (8 s) and long before the bound
    assert report.hold.held_ms < 5_000
    assert report.outcome == "client-lost", (report.outcome, report.notes)
    assert for_report(report) is ExitCode.CLIENT_LOST
    [client] = report.clients
    assert client.path == "lost"
    assert client.record is not None
    assert "switch-host reconnect failed" in (client.record.error or "")
