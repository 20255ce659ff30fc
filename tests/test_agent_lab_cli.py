"""The host agent as an admin would try it: ``lab up --libvirt --agent --guest linux
--client-rtt-ms 300``, remote-viewer in the client namespace, a plain ``virsh migrate --live
--p2p`` started by hand -- seamless by remote-viewer's own log, no ``custom-monitor`` taint;
``lab status --json`` lists the agents, ``lab down`` stops them with everything else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spice_libvirt_lab import libvirt_lab, netns
from spice_libvirt_lab.libvirt_agent import verdicts
from tests.rigs.libvirt_lab import LIBVIRT_LAB, assert_lab_gone, lab_processes
from tests.rigs.viewer import XServer
from tests.test_agent_lab import migrate_watched, tainted

pytest.importorskip("libvirt")

pytestmark = LIBVIRT_LAB


def lab_cli(top: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SPICE_LIBVIRT_LAB_DIR=str(top))
    return subprocess.run(
        [sys.executable, "-m", "spice_libvirt.cli", "lab", *args],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip


def test_lab_up_agent_makes_a_hand_started_virsh_migration_seamless(
    libvirt_lab_dir: Path, x_server: XServer
) -> None:
    top = libvirt_lab_dir.parent
    up = lab_cli(top, "up", "--libvirt", "--agent", "--guest", "linux", "--client-rtt-ms", "300")
    assert up.returncode == 0, up.stderr
    status = json.loads(lab_cli(top, "status", "--json").stdout)
    agents = [d for d in status["daemons"] if d["what"].startswith("agent")]
    assert sorted(d["where"] for d in agents) == ["A", "B"]
    assert all(d["alive"] for d in agents)
    state = libvirt_lab.load_state(top / "libvirt")
    assert state is not None
    for i in range(2):  # there and back
        path, verdict, _ = migrate_watched(state, x_server.display, f"rv-cli-{i}")
        assert path == "seamless"
        assert verdict is not None
        assert verdict["outcome"] == "seamless"
    assert tainted(state) == []
    assert len(verdicts(state, "A")) == 1
    assert len(verdicts(state, "B")) == 1
    processes = lab_processes(state)
    down = lab_cli(top, "down", "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["leftovers"] == []
    assert_lab_gone(state, processes)
    # this very process (not a recycled PID) gone from the process table: ended and reaped
    # by its parent, PID 1 once the "lab up" that started it had exited
    assert [d["what"] for d in agents if netns.ProcRef(**d["proc"]).present()] == []


def test_a_near_empty_guest_is_said_unholdable_and_held_by_qmp_only_when_allowed(
    libvirt_lab_dir: Path, x_server: XServer
) -> None:
    """The firmware guest moves in about a second even at 1 MiB/s: the taint-free hold
    cannot keep it for a 300 ms client. The journal says so; with ``allow_taint`` the agent
    throttles it through QMP (and says the domain is tainted).

    Whatever happened, the agent's verdict is the client's own word. ``virsh migrate``
    without ``--bandwidth`` is unlimited: the guest's first pass is over in about 0.1 s, and
    an agent that throttles it later than that (a busy host's agent may) holds
    nothing -- the release says so (``migration-ended``: QEMU completed during the
    hold), and so do the verdict's notes. A hold that kept the guest until the client
    linked (``linked``) must have made it seamless.
    """
    from spice_libvirt_lab.libvirt_agent import running_agents as agents

    top = libvirt_lab_dir.parent
    up = lab_cli(top, "up", "--libvirt", "--client-rtt-ms", "300")
    assert up.returncode == 0, up.stderr
    state = libvirt_lab.load_state(top / "libvirt")
    assert state is not None
    allow = state.run_dir / "allow-taint.toml"
    allow.write_text("allow_taint = true\n")
    with agents(state):
        path, verdict, _ = migrate_watched(state, x_server.display, "rv-fw-0")
    assert verdict is not None
    assert verdict["hold"] == "taint-free"
    assert verdict["tainted"] is False
    assert path == "switch-host"
    assert verdict["outcome"] == path
    assert any("too little memory to move" in n for n in verdict["notes"])
    assert tainted(state) == []
    with agents(state, ["--config", str(allow)]):
        path, verdict, _ = migrate_watched(state, x_server.display, "rv-fw-1")
    assert verdict is not None
    assert verdict["hold"] == "qmp-throttle"
    assert verdict["tainted"] is True
    assert verdict["outcome"] == path, verdict
    if verdict["release"] == "migration-ended":  # the first pass was over before the throttle
        assert path == "switch-host", verdict
        assert any("QEMU's throttle was in place" in n for n in verdict["notes"]), verdict
    else:
        assert verdict["release"] == "linked", verdict
        assert path == "seamless", verdict
    assert tainted(state) != []
