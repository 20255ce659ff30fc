"""Other people's callers with the host agent: tunnelled, post-copy, VDSM's policies.

One two-host lab for the module (the memcheck guest with 128 MiB of data: memory to move, and
immune to QEMU 7.2's TCG dirty-page bug that can lose the linux guest on arrival, see
docs/findings.md; client 150 ms away), an agent inside each host.
The oracle is remote-viewer's own log (a fresh viewer per migration); the agent must neither
break nor stall what the caller asked for, and its verdict must say what happened to the
client:

* ``virsh migrate --tunnelled``: the stream goes through libvirtd, so the source QEMU has no
  migration connection of its own; the agent watches every known destination instead;
* ``virsh migrate --postcopy`` and ``virsh migrate-postcopy`` early in the migration: the
  guest moves when the caller says so; the hold is released at once and the verdict says the
  client had not linked yet (the viewer's own log says switch-host);
* the VDSM-like caller (``benchmarks/vdsm_caller.py``) with "Suspend workload if needed"
  (auto-converge, compression, a 5 s last step) and a short monitor interval: seamless, and
  its bandwidth (52 MiB/s) and downtime are what libvirt reports once the hold is released.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from typing import Any

import pytest

from benchmarks.vdsm_caller import Caller, Options
from spice_libvirt_lab import libvirt_agent
from spice_libvirt_lab.libvirt_agent import next_verdict, verdicts
from spice_libvirt_lab.libvirt_agent import running_agents as agents
from spice_libvirt_lab.libvirt_lab import LabState
from spice_libvirt_lab.memcheck import MemcheckOptions
from tests.rigs.libvirt_lab import lab_marks
from tests.rigs.viewer import XServer
from tests.test_agent_lab import VERDICT_S, outcome, viewer

libvirt = pytest.importorskip("libvirt")

pytestmark = lab_marks(
    client_rtt_ms=150.0, guest="memcheck", memcheck_options=MemcheckOptions(working_set_mib=128)
)


def _job_running(lab: LabState, host: str, timeout: float = 60.0) -> None:
    """Until the domain's outgoing job moves memory (libvirt set its capabilities then)."""
    conn = libvirt.open(lab.hosts[host].uri_unix)
    try:
        dom = conn.lookupByName(lab.domain)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if int(dom.jobStats(0).get("memory_remaining", 0)) > 0:
                    return
            except libvirt.libvirtError:
                pass
            time.sleep(0.02)
        raise AssertionError("the migration never started moving memory")
    finally:
        conn.close()


def _watched(
    lab: LabState, display: str, name: str, migrate: Any
) -> tuple[str | None, dict[str, Any], Any, float]:
    """Run ``migrate(src, dst)`` with a fresh remote-viewer: (its path, the agent's verdict,
    what ``migrate`` returned, wall seconds)."""
    src, dst = libvirt_agent.running_host(lab)
    before = len(verdicts(lab, src))
    v = viewer(lab, display, src, name)
    try:
        mark = len(v.log_text())
        t0 = time.monotonic()
        result = migrate(src, dst)
        wall = time.monotonic() - t0
        path = outcome(v, mark)
        verdict = next_verdict(lab, src, before, timeout=VERDICT_S)  # the viewer still there
        v.wait_relinked(mark)
    finally:
        v.stop()
    return path, verdict, result, wall


def _virsh(lab: LabState, src: str, dst: str, extra: Sequence[str]) -> subprocess.Popen[str]:
    argv = libvirt_agent.plain_migrate_argv(lab, src, dst, extra)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_tunnelled_migration_is_held_through_the_known_destinations(
    shared_lab: LabState, x_server: XServer
) -> None:
    def migrate(src: str, dst: str) -> int:
        proc = _virsh(shared_lab, src, dst, ["--tunnelled"])
        _out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        return proc.returncode

    with agents(shared_lab):
        path, verdict, _, _ = _watched(shared_lab, x_server.display, "rv-tunnelled", migrate)
    assert path == "seamless"
    assert verdict["outcome"] == "seamless"
    assert any("tunnelled" in n for n in verdict["notes"]), verdict["notes"]


def test_post_copy_moves_the_guest_when_the_caller_says_and_the_verdict_says_so(
    shared_lab: LabState, x_server: XServer
) -> None:
    def migrate(src: str, dst: str) -> str:
        proc = _virsh(shared_lab, src, dst, ["--postcopy"])
        _job_running(shared_lab, src)
        time.sleep(0.2)  # well before the client can link (about 1.2 s at 150 ms)
        switch = subprocess.run(
            ["virsh", "-c", shared_lab.hosts[src].uri_unix, "migrate-postcopy", shared_lab.domain],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        _out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err  # not broken: the migration completed
        return switch.stderr

    with agents(shared_lab):
        path, verdict, switch_error, wall = _watched(
            shared_lab, x_server.display, "rv-postcopy", migrate
        )
    assert switch_error == ""
    assert wall < 60  # not stalled: the hold went as the guest moved
    assert "post-copy" in verdict["released_why"]
    assert any("not linked yet" in n for n in verdict["notes"]), verdict["notes"]
    assert path == "switch-host"  # the client's own account: it had not linked
    assert verdict["outcome"] in ("switch-host", "not-linked")
    assert verdict["caller_restored"]["speed_mibs"] > 1


def test_vdsm_suspend_workload_policy_is_seamless_and_its_values_restored(
    shared_lab: LabState, x_server: XServer
) -> None:
    def migrate(src: str, dst: str) -> Any:
        options = Options(
            source_uri=shared_lab.hosts[src].uri_unix,
            destination=shared_lab.hosts[dst].config.hostname,
            policy="suspend",
            monitor_interval_s=0.5,
        )
        return Caller(options).migrate(shared_lab.domain)

    with agents(shared_lab):
        path, verdict, record, _ = _watched(shared_lab, x_server.display, "rv-suspend", migrate)
    assert record.ok, record.error
    assert {"AUTO_CONVERGE", "COMPRESSED"} <= set(record.flags)
    assert path == "seamless"
    assert verdict["outcome"] == "seamless"
    # the caller's values: in force again after the release (its downtime schedule steps on
    # meanwhile: each look shows one it had set by then), and what the agent restored
    assert verdict["caller_restored"]["speed_mibs"] == 52
    assert verdict["caller_restored"]["downtime_ms"] in record.downtimes_set_by(float("inf")), (
        verdict
    )
    for look in record.looks_after_hold():
        assert look["speed_mibs"] == 52, record.looks
        assert look["downtime_ms"] in record.downtimes_set_by(look["t"]), record.looks
