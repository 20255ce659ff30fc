"""``ansible/evacuate.yml`` for real: Ansible drains a host of the two-libvirtd lab over ssh.

The lab (:mod:`spice_libvirt_lab.libvirt_lab`) has hosts A and B, each a namespace with its
own libvirtd and an sshd, and writes an Ansible inventory of them (keys and known_hosts in
the lab directory, strict checking, a ProxyCommand into each host's namespace). The test runs
the playbook with that inventory from the root namespace, as an admin would: ``spice-libvirt
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
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.record import ClientMigrationRecord
from spice_libvirt_lab import libvirt_lab, netns, sshd
from spice_libvirt_lab.libvirt_state import LabState
from tests.rigs.libvirt_lab import cli_dir, lab_marks
from tests.test_ansible_ssh import ANSIBLE, ANSIBLE_PLAYBOOK, BIN
from tests.test_ansible_ssh import _missing as _ssh_missing

pytestmark = lab_marks()

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
        """``ansible-playbook -i <the lab's inventory>`` from the root namespace, as an admin
        runs it: ssh reaches the hosts through the inventory's ProxyCommand."""
        argv = [
            str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory), str(ANSIBLE / "evacuate.yml"),
            "-e", "evacuate_hosts=hostA", "-e", "evacuate_target=hostB", *extra,
        ]  # fmt: skip
        return subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


@pytest.fixture(scope="module")
def fleet(shared_lab: LabState, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """The module's lab as ``lab up --libvirt`` makes it: the inventory is the one it wrote."""
    assert shared_lab.ansible_inventory is not None, shared_lab.notes
    root = cli_dir(shared_lab)  # what `lab --dir ROOT` finds
    ansible_home = tmp_path_factory.mktemp("ansible")
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
            "ANSIBLE_HOME": str(ansible_home / "home"),
            "ANSIBLE_LOCAL_TEMP": str(ansible_home / "tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    return Fleet(shared_lab, root, shared_lab.ansible_inventory, env)


def test_lab_inventory_names_both_hosts_with_private_keys(fleet: Fleet) -> None:
    """``lab status --json`` names the inventory; keys and inventory are 0600, the ssh
    directory 0700; each host's sshd is a lab process ``lab status`` lists."""
    proc = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "lab", "--dir", str(fleet.root),
         "status", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["ansible_inventory"] == str(fleet.inventory)
    sshds = [d for d in status["daemons"] if d["what"].startswith("sshd")]
    assert sorted(d["where"] for d in sshds) == ["A", "B"]
    assert all(d["alive"] for d in sshds)
    inv = json.loads(fleet.inventory.read_text())
    assert sorted(inv["hypervisors"]["hosts"]) == ["hostA", "hostB"]
    ssh_dir = fleet.inventory.parent / "ssh"
    assert fleet.inventory.stat().st_mode & 0o777 == 0o600
    assert ssh_dir.stat().st_mode & 0o777 == 0o700
    assert (ssh_dir / "id_ed25519").stat().st_mode & 0o777 == 0o600
    for name in ("A", "B"):
        host_key = sshd.host_dir(fleet.state.host(name)) / "ssh_host_ed25519_key"
        assert host_key.stat().st_mode & 0o777 == 0o600
    # ad-hoc ansible over the inventory: each host answers as itself (its own UTS name)
    ping = subprocess.run(
        [str(BIN / "ansible"), "-i", str(fleet.inventory), "hypervisors", "-m", "command",
         "-a", "hostname"],
        env=fleet.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert re.search(r"^hostA \| CHANGED \| rc=0 >>\nhostA$", ping.stdout, re.MULTILINE)
    assert re.search(r"^hostB \| CHANGED \| rc=0 >>\nhostB$", ping.stdout, re.MULTILINE)


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
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert not errors, errors
    assert records, "the client saw no migration"
    assert records[0].path == "seamless", records[0]
    assert records[0].connection_id_kept
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
    # `doctor` (the play's readiness check) says ready; `evacuate` prints the recording
    doctor = """case "$1" in doctor) echo '{"ready": true, "checks": []}'; exit 0;; esac\n"""
    script.write_text(f'#!/bin/sh\n{doctor}echo "$@" > {argv_log}\ncat {report}\nexit 8\n')
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
    tls = fleet.play(*venv, "-e", "spice_libvirt_evacuate_migrate_tls=true")
    assert tls.returncode != 0  # the same recorded switch-host
    assert argv_log.read_text().split()[-2:] == ["--migrate-tls", "--json"]

    lenient = fleet.play(*venv, "-e", '{"spice_libvirt_require_seamless": false}')
    assert lenient.returncode == 0, lenient.stdout[-4000:]
    assert _recap(lenient.stdout)["failed"] == 0

    # a domain that failed to migrate fails the host whatever the policy
    failed = dict(_CANNED, domains=[{"domain": "vm-bad", "outcome": "failed", "exit_code": 7,
                                     "report": None, "error": "refused"}])  # fmt: skip
    report.write_text(json.dumps(failed))
    script.write_text(f"#!/bin/sh\n{doctor}cat {report}\nexit 7\n")
    broken = fleet.play(*venv, "-e", '{"spice_libvirt_require_seamless": false}')
    assert broken.returncode != 0
    assert "vm-bad: hostA -> hostB, failed, added 0 ms (refused)" in broken.stdout
