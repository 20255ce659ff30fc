"""``ansible/evacuate.yml`` for real: Ansible drains a host of the two-libvirtd lab over ssh.

The lab (:mod:`spice_libvirt.lab.libvirt_lab`) has hosts A and B, each a namespace with its
own libvirtd, and a client namespace on the same switch; the guest runs on A. This test adds
an sshd inside host A (keys and known_hosts in a temp dir, strict checking) and runs the
playbook from the client namespace, as an admin's workstation would: ``spice-libvirt
evacuate --from qemu:///system --to qemu+tcp://hostB/system --json`` runs *on* A (A's
``qemu:///system`` is A's private libvirtd), the guest ends up on B, and the play prints one
line per domain. spice-libvirt is the checkout's venv, which the namespace sees as is.

The policy (``spice_libvirt_require_seamless``) is checked with a stand-in ``spice-libvirt``
on the same host that prints a recorded report in which one domain fell back to
switch-host: the play must fail that host under the policy and pass without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from spice_libvirt.lab import libvirt_lab, netns
from spice_libvirt.lab.libvirt_state import LabState
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.record import ClientMigrationRecord
from tests.test_ansible_ssh import ANSIBLE, ANSIBLE_PLAYBOOK, BIN, start_sshd
from tests.test_ansible_ssh import _missing as _ssh_missing

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

VENV = Path(sys.prefix)

if (_why := _ssh_missing()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_why))
elif not (VENV / "bin" / "spice-libvirt").exists():
    pytestmark.append(pytest.mark.skip(reason="spice-libvirt not installed in the venv"))


@dataclass
class Fleet:
    state: LabState
    root: Path
    inventory: Path
    env: dict[str, str]

    def play(self, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        argv = netns.exec_argv(
            self.state.client.netns,
            [
                str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory), str(ANSIBLE / "evacuate.yml"),
                "-e", "evacuate_hosts=hostA", "-e", "evacuate_target=hostB", *extra,
            ],
        )  # fmt: skip
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    root = Path(tempfile.mkdtemp(prefix="slev-"))
    lab_dir = root / "lab"
    sshd_pid: int | None = None
    try:
        state = libvirt_lab.up(lab_dir)
        a = state.host("A")
        ip_a = state.hosts["A"].config.ip
        ssh_dir = root / "ssh"
        sshd_pid = start_sshd(a, ssh_dir, ip_a)
        inventory = root / "inventory.yml"
        inventory.write_text(
            yaml.safe_dump(
                {
                    "hypervisors": {
                        "hosts": {
                            "hostA": {
                                "ansible_host": ip_a,
                                "ansible_user": "root",
                                "ansible_become": False,  # root already; no sudo here
                                "ansible_python_interpreter": "/usr/bin/python3",
                                "ansible_ssh_private_key_file": str(ssh_dir / "id_ed25519"),
                                "ansible_ssh_common_args": (
                                    f"-F /dev/null -o UserKnownHostsFile={ssh_dir / 'known_hosts'}"
                                    " -o GlobalKnownHostsFile=/dev/null"
                                    " -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
                                ),
                                "ansible_remote_tmp": str(root / "remote-tmp"),
                                "spice_libvirt_venv": str(VENV),
                                "spice_libvirt_evacuate_transport": "tcp",  # the lab's libvirtds
                            }
                        }
                    }
                }
            )
        )
        env = dict(os.environ)
        env.update(
            {
                "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
                "ANSIBLE_HOME": str(root / "ansible-home"),
                "ANSIBLE_LOCAL_TEMP": str(root / "ansible-tmp"),
                "ANSIBLE_HOST_KEY_CHECKING": "True",
                "ANSIBLE_NOCOLOR": "1",
                "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            }
        )
        yield Fleet(state, root, inventory, env)
    finally:
        if sshd_pid is not None:
            netns.terminate([sshd_pid])
        libvirt_lab.down(lab_dir)
        shutil.rmtree(root, ignore_errors=True)


def _recap(output: str) -> dict[str, int]:
    m = re.search(r"^hostA\s+:\s+(.*)$", output, re.MULTILINE)
    assert m, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def test_evacuate_playbook_drains_a_lab_host(fleet: Fleet) -> None:
    """The guest, with our SPICE client attached from the client namespace, moves seamlessly."""
    domain = fleet.state.domain
    a, b = fleet.state.host("A"), fleet.state.host("B")
    assert domain in a.run(["virsh", "list", "--name"]).split()
    spice = libvirt_lab.status(fleet.state.lab_dir).spice
    assert spice is not None

    # the client stays connected until the play is over: the controller checks its session
    # on the destination after the switchover
    linked, release = threading.Event(), threading.Event()
    records: list[ClientMigrationRecord] = []
    errors: list[BaseException] = []

    async def follow() -> None:
        client = SpiceClient(ClientOptions(host=spice.address, port=spice.port, link_timeout=10))
        await client.connect()
        try:
            linked.set()
            records.append(await client.next_migration(timeout=120))
            await asyncio.to_thread(release.wait, 120)
        finally:
            await client.close()

    def run_client() -> None:
        try:
            netns.call_in(fleet.state.client.netns, lambda: asyncio.run(follow()), timeout=150)
        except BaseException as exc:
            errors.append(exc)
        finally:
            linked.set()

    thread = threading.Thread(target=run_client, daemon=True)
    thread.start()
    assert linked.wait(30)
    assert not errors, errors

    try:
        proc = fleet.play()
    finally:
        release.set()
        thread.join(60)
    assert not errors, errors
    assert records, "the client saw no migration"
    assert records[0].path == "seamless", records[0]
    assert records[0].connection_id_kept
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    recap = _recap(proc.stdout)
    assert recap["failed"] == 0
    assert recap["changed"] == 1  # the evacuation itself
    # one line per domain: domain, from, to, outcome, added time
    line = re.search(rf"{domain}: hostA -> hostB, seamless, added (\d+) ms", proc.stdout)
    assert line, proc.stdout[-4000:]
    assert "Fleet summary" in proc.stdout
    assert domain not in a.run(["virsh", "list", "--name"]).split()
    assert domain in b.run(["virsh", "list", "--name"]).split()
    print(f"evacuate.yml: {line.group(0)}")


_CANNED = {
    "source_uri": "qemu:///system",
    "destination_uri": "qemu+tcp://hostB/system",
    "started_at": "2026-11-29T11:00:00Z",
    "duration_ms": 1234.0,
    "parallel": 1,
    "domains": [
        {"domain": "vm-ok", "outcome": "seamless", "exit_code": 0,
         "report": {"hold": {"held_ms": 41.6}}},
        {"domain": "vm-late", "outcome": "switch-host", "exit_code": 8,
         "report": {"hold": {"held_ms": 15000.0}}},
    ],
    "skipped": [{"domain": "vm-vnc", "reason": "no SPICE graphics"}],
    "counts": {"seamless": 1, "switch-host": 1},
    "all_seamless": False,
}  # fmt: skip


def test_evacuate_playbook_enforces_the_seamless_policy(fleet: Fleet) -> None:
    """A recorded report with a switch-host domain (exit 8) through the real playbook."""
    fake = fleet.root / "fake-venv"
    (fake / "bin").mkdir(parents=True)
    report = fleet.root / "canned.json"
    report.write_text(json.dumps(_CANNED))
    argv_log = fleet.root / "argv.txt"
    script = fake / "bin" / "spice-libvirt"
    script.write_text(f'#!/bin/sh\necho "$@" > {argv_log}\ncat {report}\nexit 8\n')
    script.chmod(0o755)
    venv = ["-e", f"spice_libvirt_venv={fake}"]

    strict = fleet.play(*venv)
    assert strict.returncode != 0
    assert _recap(strict.stdout)["failed"] == 1
    assert "hostA not drained as required" in strict.stdout
    assert "vm-late" in strict.stdout.split("not drained as required", 1)[1][:400]
    assert "vm-ok: hostA -> hostB, seamless, added 42 ms" in strict.stdout
    assert "vm-late: hostA -> hostB, switch-host, added 15000 ms" in strict.stdout
    assert "vm-vnc: not moved (no SPICE graphics)" in strict.stdout
    assert argv_log.read_text().split() == [
        "evacuate", "--from", "qemu:///system", "--to", "qemu+tcp://hostB/system",
        "--parallel", "1", "--timeout", "300", "--json",
    ]  # fmt: skip

    lenient = fleet.play(*venv, "-e", '{"spice_libvirt_require_seamless": false}')
    assert lenient.returncode == 0, lenient.stdout[-4000:]
    assert _recap(lenient.stdout)["failed"] == 0

    # a domain that failed to migrate fails the host whatever the policy
    failed = dict(_CANNED, domains=[{"domain": "vm-bad", "outcome": "failed", "exit_code": 7,
                                     "report": None, "error": "refused"}])  # fmt: skip
    report.write_text(json.dumps(failed))
    script.write_text(f"#!/bin/sh\ncat {report}\nexit 7\n")
    broken = fleet.play(*venv, "-e", '{"spice_libvirt_require_seamless": false}')
    assert broken.returncode != 0
    assert "vm-bad: hostA -> hostB, failed, added 0 ms (refused)" in broken.stdout
