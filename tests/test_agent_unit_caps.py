"""The agent's unit bounds its capabilities; libvirt must still start the ssh of a qemu+ssh peer.

libvirt sets the capabilities of every helper it starts (the ssh of ``qemu+ssh://``); with a
bounding set that lacks CAP_SETPCAP the child fails before ssh runs ("cannot apply process
capabilities", a closed client socket) and the agent never reaches an ssh peer -- found in the
Vagrant hosts under systemd. This machine has no systemd, so the unit's bounding set is
applied with ``setpriv`` (util-linux) to a real ``virsh`` that dials a loopback port nobody
listens on: ssh itself running (its "Connection refused") is the proof.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources

import pytest

pytestmark = pytest.mark.root

URI = "qemu+ssh://root@127.0.0.1:1/system?no_verify=1"


def _bounding_set() -> list[str]:
    unit = resources.files("spice_libvirt.agent").joinpath("spice-libvirt-agent.service")
    found = re.search(r"^CapabilityBoundingSet=(.+)$", unit.read_text(), re.M)
    assert found is not None
    return [c.removeprefix("CAP_").lower() for c in found.group(1).split()]


def _dial(caps: list[str]) -> str:
    for tool in ("setpriv", "virsh", "ssh"):
        assert shutil.which(tool), f"{tool} is part of this machine's setup"
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    argv = ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "virsh", "-c", URI, "list"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0  # nobody listens there
    return done.stderr


def test_the_units_capabilities_let_libvirt_start_ssh() -> None:
    caps = _bounding_set()
    assert {"sys_ptrace", "dac_read_search", "setpcap"} == set(caps)
    assert "ssh: connect to host 127.0.0.1 port 1" in _dial(caps)


def test_without_setpcap_the_ssh_of_a_peer_never_starts() -> None:
    stderr = _dial([c for c in _bounding_set() if c != "setpcap"])
    assert "ssh: connect to host" not in stderr, stderr
