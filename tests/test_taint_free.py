"""Our own migrations and evacuations are taint-free by default, and stay seamless.

One two-host libvirt lab for the module (the memcheck guest with 128 MiB of data, which
libvirt's 1 MiB/s speed floor holds for minutes and QEMU 7.2's TCG cannot lose on arrival as
it can the linux guest; a client 300 ms away). Connections to the SPICE port that never
link a channel -- bare, or sending garbage -- are no clients: they neither stretch the hold
nor make a client of nobody (the census the agent takes too, ``libvirt/real_clients.py``). ``spice-libvirt migrate`` and ``evacuate``
run as an operator runs them on the source host: no ``--allow-taint``. The oracle for the
path is remote-viewer's own SPICE_DEBUG log (or our embedded client's record); the oracle
for the taint is libvirt's own per-domain log on both hosts, which must never gain a
``custom-monitor`` line (``tests/test_agent_lab.py`` reads it the same way).
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from spice_libvirt.exitcodes import ExitCode
from spice_libvirt_lab import libvirt_agent, netns
from spice_libvirt_lab.libvirt_lab import LabState
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from spice_libvirt_lab.libvirt_status import where
from spice_libvirt_lab.memcheck import MemcheckOptions
from tests import faults
from tests.rigs.libvirt_lab import cli_dir, cli_json, fresh_state, lab_marks
from tests.rigs.viewer import XServer
from tests.test_agent_lab import outcome, tainted, viewer

RTT_MS = 300.0

pytestmark = lab_marks(
    client_rtt_ms=RTT_MS, guest="memcheck", memcheck_options=MemcheckOptions(working_set_mib=128)
)


@pytest.fixture(scope="module")
def lab(shared_lab: LabState) -> LabState:
    return shared_lab


@pytest.fixture(scope="module")
def display(x_server: XServer) -> str:
    return x_server.display


def _migrate_cli(lab: LabState, src: str, dst: str) -> tuple[int, dict[str, Any], str]:
    return cli_json(
        "migrate", lab.domain,
        "--from", lab.hosts[src].uri_unix,
        "--to", lab.hosts[dst].uri_tcp,
        "--to-connect", lab.hosts[dst].uri_unix,
        "--json",
    )  # fmt: skip


def _migrate_watched(
    lab: LabState, display: str, name: str
) -> tuple[str | None, int, dict[str, Any]]:
    """``spice-libvirt migrate`` without flags, a fresh remote-viewer watching: (its path,
    the exit code, the report)."""
    src, dst = libvirt_agent.running_host(lab)
    v = viewer(lab, display, src, name)
    try:
        mark = len(v.log_text())
        rc, report, _ = _migrate_cli(lab, src, dst)
        return outcome(v, mark), rc, report
    finally:
        v.stop()


def _assert_taint_free_hold(report: dict[str, Any], census: str) -> None:
    hold = report["hold"]
    assert report["tainted"] is False
    assert hold["tainted"] is False
    assert hold["applied"] == "libvirt-floor"
    assert hold["escalated"] is None
    assert hold["census"] == census
    assert "taint-free" in hold["reason"]
    assert hold["downtime_before_ms"] is not None
    # one migration at a time, its QEMU's memory readable: the switchover hold, which says
    # what it did (paced the first pass, put the floor back near its end)
    assert hold["mode"] == "switchover", report["notes"]
    assert hold["plan_notes"], hold
    # the client needs ~6 RTT to link: the floors really held it
    assert hold["held_ms"] is not None
    assert 5 * RTT_MS < hold["held_ms"] < 15_000
    assert not any("custom-monitor" in n for n in report["notes"])


def test_migrate_with_a_remote_viewer_is_seamless_and_leaves_no_taint(
    lab: LabState, display: str
) -> None:
    """``spice-libvirt migrate`` without flags: the clients from the source QEMU's sockets,
    the hold through libvirt's speed and downtime, the verdict from graphics events."""
    path, rc, report = _migrate_watched(lab, display, "rv-taint-free-migrate")
    assert path == "seamless"
    assert rc == 0, report
    assert report["outcome"] == "seamless"
    _assert_taint_free_hold(report, "kernel")
    (client,) = report["clients"]
    assert client["evidence"] == "graphics-events"
    assert client["path"] == "seamless"
    assert client["connection_id_before"] is None
    assert client["address"] == lab.client.ip
    # the caller's downtime was put back at the release (the job ran with it)
    assert report["migration"]["downtime_limit_ms"] == report["hold"]["downtime_before_ms"]
    assert tainted(lab) == []


def test_the_embedded_client_stays_seamless(lab: LabState) -> None:
    """``lab migrate`` (our embedded client attached): it is the census, and its own record
    -- BEGIN_SEAMLESS, MIGRATE, MIGRATE_DATA, its connection id kept -- the verdict."""
    report = lab_migrate(lab.lab_dir)
    data = json.loads(report.model_dump_json())
    assert report.outcome == "seamless"
    _assert_taint_free_hold(data, "embedded")
    (client,) = report.clients
    assert client.record is not None
    assert client.record.path == "seamless"
    assert client.connection_id_kept is True
    assert client.connection_id_after == client.connection_id_before
    assert tainted(lab) == []


def test_evacuate_with_a_remote_viewer_is_seamless_and_leaves_no_taint(
    lab: LabState, display: str
) -> None:
    src, dst = libvirt_agent.running_host(lab)
    v = viewer(lab, display, src, "rv-taint-free-evacuate")
    try:
        mark = len(v.log_text())
        rc, report, _ = cli_json(
            "evacuate",
            "--from", lab.hosts[src].uri_unix,
            "--to", lab.hosts[dst].uri_tcp,
            "--to-connect", lab.hosts[dst].uri_unix,
            "--json",
        )  # fmt: skip
        path = outcome(v, mark)
    finally:
        v.stop()
    assert path == "seamless"
    assert rc == 0, report
    assert report["all_seamless"] is True
    (domain,) = report["domains"]
    assert domain["outcome"] == "seamless"
    _assert_taint_free_hold(domain["report"], "kernel")
    assert tainted(lab) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_while_the_plan_paces_the_first_pass(lab: LabState, sig: int) -> None:
    """``lab migrate`` interrupted while the switchover plan lets the first pass run at its
    pace (the speed neither the domain's own nor libvirt's floor): the job undone, the
    domain on the source with the speed it had."""
    state = fresh_state(lab)
    uris = {name: h.uri_unix for name, h in state.hosts.items()}
    source = where(state)
    before = faults.libvirt_host_view(uris[source], state.domain, qmp=False)

    def pacing() -> bool:
        view = faults.libvirt_host_view(uris[source], state.domain, qmp=False)
        return bool(view.job) and view.max_speed_mibs not in (None, 1, before.max_speed_mibs)

    run = faults.run_cli_interrupted(
        ["lab", "--dir", str(cli_dir(lab)), "migrate", "--json"], pacing, sig
    )
    assert run.signalled_after_s is not None, run.stderr
    expected = ExitCode.INTERRUPTED if sig == signal.SIGINT else ExitCode.TERMINATED
    assert run.returncode == expected, run.stderr
    assert "the domain runs on: source" in run.stderr, run.stderr
    views = functools.partial(faults.libvirt_views, uris, state.domain, qmp=False)
    assert faults.wait_for(lambda: faults.settled(views()), 10.0, 0.1), views()
    after = faults.libvirt_host_view(uris[source], state.domain, qmp=False)
    assert after.state == "running"
    assert after.max_speed_mibs == before.max_speed_mibs, (before, after)
    assert tainted(lab) == []  # nor did this test taint it


def test_the_qmp_hold_is_refused_without_allow_taint(lab: LabState) -> None:
    """``--hold qmp`` taints: without ``--allow-taint`` it is a usage error, nothing moved."""
    src, dst = libvirt_agent.running_host(lab)
    done = subprocess.run(
        [
            sys.executable, "-m", "spice_libvirt", "migrate", lab.domain,
            "--from", lab.hosts[src].uri_unix, "--to", lab.hosts[dst].uri_tcp,
            "--hold", "qmp",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "allow_taint" in done.stderr
    assert done.stderr.count("\n") == 1
    assert libvirt_agent.running_host(lab)[0] == src


@contextlib.contextmanager
def strangers(lab: LabState, host: str) -> Iterator[None]:
    """Connections to ``host``'s SPICE port from the client's own address that never link:
    a bare one, one stalled inside a link header (the magic, then garbage, then nothing),
    and one that sends only garbage (spice-server refuses and closes it). Held open
    throughout."""
    with contextlib.ExitStack() as stack:
        for payload in (
            b"",
            b"REDQ" + struct.pack("<III", 2, 2, 100) + b"\x99" * 10,
            b"\x00junk" * 8,
        ):
            sock = stack.enter_context(netns.socket_in(lab.client.netns))
            sock.settimeout(10.0)
            sock.connect((lab.hosts[host].config.ip, 5900))
            sock.sendall(payload)
        time.sleep(1.0)  # past spice-server's answer to the garbage
        yield


def _strangers_named(report: dict[str, Any]) -> bool:
    return any(
        n.startswith("clients on the source:") and "that never linked a channel" in n
        for n in report["notes"]
    )


def test_connections_that_never_link_are_no_client(lab: LabState) -> None:
    """Only strangers on the port: the census says no client, nothing is held."""
    src, dst = libvirt_agent.running_host(lab)
    with strangers(lab, src):
        rc, report, stderr = _migrate_cli(lab, src, dst)
    assert rc == 0, stderr
    assert report["outcome"] == "no-client", report
    assert report["link_wait"]["result"] == "no-client"
    assert report["hold"]["census"] == "kernel"
    assert report["hold"]["expected_channels"] is None
    assert report["tainted"] is False
    assert _strangers_named(report), report["notes"]
    assert libvirt_agent.running_host(lab)[0] == dst


def test_connections_that_never_link_do_not_stretch_the_hold(lab: LabState, display: str) -> None:
    """Strangers from the client's own address, then remote-viewer: the hold waits for the
    viewer's five channels and is released when they linked (not at the 15 s bound)."""
    with strangers(lab, libvirt_agent.running_host(lab)[0]):
        path, rc, report = _migrate_watched(lab, display, "rv-taint-free-strangers")
    assert path == "seamless"
    assert rc == 0, report
    assert report["outcome"] == "seamless"
    _assert_taint_free_hold(report, "kernel")
    assert report["hold"]["expected_channels"] == 5
    assert report["link_wait"]["result"] == "linked"
    assert _strangers_named(report), report["notes"]
    (client,) = report["clients"]
    assert client["path"] == "seamless"
    assert tainted(lab) == []
