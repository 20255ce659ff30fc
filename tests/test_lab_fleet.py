"""A whole host, for real: ``lab up --libvirt --domains 8`` at 150 ms and ``lab evacuate``.

Eight firmware guests on host A, each with its own ``spice-libvirt watch`` client in the
client namespace behind the 150 ms delaying bridge; ``lab evacuate --parallel 8`` drains A
through ``spice-libvirt evacuate``'s code. Every domain must be seamless by the controller's
verdict (the destination kept the client's connection id) *and* by its client's own record,
then the same back through the command line. ``lab down`` must stop every client and sshd by
PID. (32 domains run in ``benchmarks/bench_evacuate.py``, not here: minutes.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spice_libvirt.exitcodes import ExitCode
from spice_libvirt_lab import libvirt_daemons, libvirt_fleet, libvirt_lab, netns
from spice_libvirt_lab.libvirt_state import LabState
from tests.rigs.libvirt_lab import cli_dir, lab_marks

pytest.importorskip("libvirt")

DOMAINS = 8
RTT_MS = 150.0

pytestmark = lab_marks(client_rtt_ms=RTT_MS, domains=DOMAINS, clients=True, memory_mib=128)


def test_up_starts_every_guest_with_its_own_client(shared_lab: LabState) -> None:
    st = libvirt_lab.status(shared_lab.lab_dir)
    assert st.healthy, st
    a = next(h for h in st.hosts if h.name == "A")
    assert sorted(st.domains) == sorted(a.domains)
    assert len(st.domains) == DOMAINS
    assert all(state == "running" for state in a.domains.values())
    assert sorted(c.domain or "" for c in st.clients) == sorted(st.domains)
    assert all(c.alive and c.where == "C" for c in st.clients)
    # one client per guest: each is connected to its own guest's SPICE port
    assert len({c.address for c in st.clients}) == DOMAINS
    assert sorted(d.what for d in st.daemons) == ["sshd A", "sshd B"]


def test_evacuate_eight_domains_at_150ms_all_seamless_both_ways(shared_lab: LabState) -> None:
    result = libvirt_fleet.lab_evacuate(shared_lab.lab_dir, parallel=8)
    assert (result.source, result.destination) == ("A", "B")
    for d in result.report.domains:
        assert d.outcome == "seamless", (d.domain, d.error, d.report and d.report.notes)
        assert result.clients[d.domain].path == "seamless", (d.domain, result.clients[d.domain])
        assert result.clients[d.domain].connection_id_kept
    assert result.seamless == DOMAINS
    assert result.report.exit_code() == ExitCode.OK
    b = next(h for h in libvirt_lab.status(shared_lab.lab_dir).hosts if h.name == "B")
    assert sorted(b.domains) == sorted(shared_lab.all_domains)
    print(f"lab evacuate, {DOMAINS} domains at {RTT_MS:.0f} ms, --parallel 8: {result.wall_s} s")

    # and back, through the command line (what an operator types)
    proc = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "lab", "--dir", str(cli_dir(shared_lab)),
         "evacuate", "--parallel", "8", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == ExitCode.OK, proc.stderr[-3000:]
    back = json.loads(proc.stdout)
    assert (back["source"], back["destination"]) == ("B", "A")
    assert [d["outcome"] for d in back["report"]["domains"]] == ["seamless"] * DOMAINS
    assert {c["path"] for c in back["clients"].values()} == {"seamless"}
    assert back["seamless"] == DOMAINS  # by both ends, as the summary line counts them
    assert libvirt_lab.status(shared_lab.lab_dir).healthy


def test_a_per_host_daemon_is_recorded_listed_and_stopped_by_down(shared_lab: LabState) -> None:
    """The mechanism the sshds use, for any daemon (an agent): it runs inside the host
    (its UTS name is the host's), ``lab status`` lists it, the rig's ``down`` stops it (and checks it is gone)."""
    state = libvirt_lab.load_state(shared_lab.lab_dir)
    assert state is not None
    argv = ["sh", "-c", "hostname; exec sleep 3600"]
    entry = libvirt_daemons.start_in_host(state, "B", argv, "probe daemon")
    st = libvirt_lab.status(shared_lab.lab_dir)
    [listed] = [d for d in st.daemons if d.what == "probe daemon"]
    assert listed.where == "B"
    assert listed.alive
    assert listed.proc == entry.proc
    log = entry.log
    assert log is not None
    netns.wait_for(lambda: "hostB" in log.read_text(), timeout=10, what="the daemon's output")
    assert log.read_text().split() == ["hostB"]
