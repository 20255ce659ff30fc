"""The Vagrant lab: two hypervisor VMs from a locally built box, provisioned by the project's role.

The fast tests check the pieces that need no VM: the box's cache key, the driver choice, the
``vagrant ssh-config`` parser and the inventory written from it. The ``vagrant`` test brings
the whole lab up for real (box, private libvirtd, ``vagrant up`` of hv1 and hv2 under TCG
while hv2's Debian package is built, ``lab.yml`` over ssh: hv1 from the wheelhouse, hv2 from
the package, the firmware guest on hv1), checks both hosts' sandboxed agents (systemd's view
of the unit, connected to libvirt and to their peer over qemu+ssh and qemu+tls), migrates
there (our controller), back and on again (plain libvirt, held by the source's agent) with
the embedded client attached from this machine, reads both hosts' hook journals over ssh,
purges and reinstalls hv2's package, tears it down and checks that nothing is left. It
prints each stage's time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt.errors import LabError
from spice_libvirt_lab import ssh_masters, vagrant_box, vagrant_lab
from spice_libvirt_lab.vagrant_state import (
    HOST_IPS,
    HOST_MACS,
    HOST_SETUP,
    VagrantLabState,
    load_state,
    parse_ssh_config,
    remote_cli,
    write_access_files,
)
from spice_libvirt_lab.vagrant_state import ssh as vagrant_ssh

REPO = Path(__file__).resolve().parent.parent

SSH_CONFIG = """\
Host hv1
  HostName 192.168.150.11
  User vagrant
  Port 22
  UserKnownHostsFile /dev/null
  IdentityFile /lab/dot-vagrant/machines/hv1/libvirt/private_key
  IdentityFile /root/.vagrant.d/insecure_private_key
  IdentitiesOnly yes

Host hv2
  HostName 192.168.150.12
  User vagrant
  Port 2222
  IdentityFile "/lab/dot-vagrant/machines/hv2/libvirt/private_key"
"""


def test_ssh_config_gives_the_inserted_keys() -> None:
    hosts = parse_ssh_config(SSH_CONFIG)
    assert set(hosts) == {"hv1", "hv2"}
    # ssh uses the first IdentityFile: the key Vagrant inserted, not the insecure one
    assert hosts["hv1"].key == Path("/lab/dot-vagrant/machines/hv1/libvirt/private_key")
    assert hosts["hv2"].key == Path("/lab/dot-vagrant/machines/hv2/libvirt/private_key")
    assert (hosts["hv1"].address, hosts["hv1"].port, hosts["hv2"].port) == (
        "192.168.150.11",
        22,
        2222,
    )


def test_inventory_and_ssh_config_written_from_it(tmp_path: Path) -> None:
    state = VagrantLabState(directory=tmp_path, hosts=parse_ssh_config(SSH_CONFIG))
    write_access_files(state)
    inv = state.inventory.read_text()
    assert "[hypervisors]" in inv
    for name, ip in HOST_IPS.items():
        line = next(x for x in inv.splitlines() if x.startswith(f"{name} "))
        assert f"spice_libvirt_spice_address={ip}" in line
        assert " spice_libvirt_lab_host=vagrant " in line  # lab.yml accepts only these
        method, transport = HOST_SETUP[name]
        assert f" spice_libvirt_install_method={method}" in line
        assert f" spice_libvirt_lab_agent_transport={transport} " in line
        assert f" spice_libvirt_lab_pki={state.pki_dir(name)}" in line
        assert f"ansible_ssh_private_key_file=/lab/dot-vagrant/machines/{name}" in line
        assert "insecure" not in line
    # both of the role's install methods, and both secure transports for the agents
    assert sorted(HOST_SETUP.values()) == [("deb", "tls"), ("wheelhouse", "ssh")]
    assert f"spice_libvirt_lab_root_ssh_key={state.root_ssh_key}" in inv
    cfg = state.ssh_config.read_text()
    assert "Port 2222" in cfg
    assert "insecure" not in cfg


def test_box_digest_follows_its_inputs(tmp_path: Path) -> None:
    script, packages = tmp_path / "build.sh", tmp_path / "packages.txt"
    script.write_text("echo build\n")
    packages.write_text("qemu-system-x86\n")
    first = vagrant_box.box_digest(script, packages)
    assert vagrant_box.box_digest(script, packages) == first
    packages.write_text("qemu-system-x86\nsudo\n")
    assert vagrant_box.box_digest(script, packages) != first


def test_box_bakes_in_what_the_role_installs() -> None:
    """The lab network has no mirror: every package the role wants must be in the box."""
    import yaml  # type: ignore[import-untyped]

    wanted = yaml.safe_load((REPO / "ansible/roles/spice_libvirt/vars/main.yml").read_text())[
        "spice_libvirt_hypervisor_packages"
    ]
    baked = {
        line.strip()
        for line in vagrant_box.PACKAGES_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert set(wanted) <= baked
    assert {"openssh-server", "sudo", "python3-apt", "python3-venv"} <= baked
    # and what the Debian package depends on (hv2 installs it, offline)
    control = (REPO / "debian" / "control").read_text()
    depends = control.split("\nDepends:", 1)[1].split("\nDescription:", 1)[0]
    names = {d.split()[0].rstrip(",") for d in depends.split("\n") if d.strip()}
    assert {n for n in names if not n.startswith("$")} <= baked | {"python3"}


def test_driver_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vagrant_lab.DRIVER_ENV, "kvm")
    assert vagrant_lab.choose_driver() == "kvm"
    monkeypatch.setenv(vagrant_lab.DRIVER_ENV, "qemu")
    assert vagrant_lab.choose_driver() == "qemu"
    monkeypatch.setenv(vagrant_lab.DRIVER_ENV, "xen")
    with pytest.raises(LabError):
        vagrant_lab.choose_driver()
    monkeypatch.delenv(vagrant_lab.DRIVER_ENV)
    nested = "hypervisor" in Path("/proc/cpuinfo").read_text()
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    assert vagrant_lab.choose_driver() == ("kvm" if usable and not nested else "qemu")


def test_network_reserves_the_vagrantfile_addresses() -> None:
    xml = vagrant_lab._network_xml()
    text = (REPO / "vagrant" / "Vagrantfile").read_text()
    for name, ip in HOST_IPS.items():
        assert f"<host mac='{HOST_MACS[name]}' ip='{ip}' name='{name}'/>" in xml
        assert f'"{name}" => {{ ip: "{ip}", mac: "{HOST_MACS[name]}"' in text
    assert "<forward mode='none'/>" in xml  # isolated: no route out of the lab


def test_guest_is_tcg_firmware_with_spice_and_qxl(tmp_path: Path) -> None:
    xml = vagrant_lab.guest_xml(VagrantLabState(directory=tmp_path))
    assert "<domain type='qemu'>" in xml
    assert "<graphics type='spice'" in xml
    assert "<model type='qxl'/>" in xml
    assert "<kernel>" not in xml  # SeaBIOS only


# --- the whole lab, for real -------------------------------------------------------------


def _cli() -> list[str]:
    """The project's CLI if ``lab up`` knows ``--vagrant``, else this lab's own entry point."""
    cli = [sys.executable, "-m", "spice_libvirt.cli"]
    helptext = subprocess.run(
        [*cli, "lab", "up", "--help"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    if "--vagrant" in helptext:
        return [*cli, "lab"]
    return [sys.executable, "-m", "spice_libvirt_lab.command_vagrant"]


def _run(argv: list[str], timeout: float) -> tuple[int, str, float]:
    """A lab command; past ``timeout``, or when the run is interrupted, it gets SIGTERM (the
    lab undoes what it started) and the test fails (or the interrupt goes on)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        sys.stderr.write(err[-3000:])
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise AssertionError(f"{argv} timed out after {timeout:.0f} s") from None
    took = time.monotonic() - t0
    if proc.returncode != 0:
        sys.stderr.write(err[-3000:])
    return proc.returncode, out, took


def _libvirt_chains() -> list[str]:
    """libvirt's iptables chains in this network namespace (the lab's network adds them)."""
    out = subprocess.run(
        ["iptables", "-w", "-S"], capture_output=True, text=True, check=False
    ).stdout
    return sorted(line for line in out.splitlines() if "LIBVIRT_" in line)


def _lab_process_nice(base: Path) -> dict[str, int]:
    """Nice value of every process whose command line names the lab directory."""
    found: dict[str, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if str(base).encode() in cmdline:
            fields = stat.rsplit(")", 1)[1].split()
            program = cmdline.split(b"\0")[0].decode(errors="replace")
            found[f"{proc.name} {program}"] = int(fields[16])
    return found


def _on(base: Path, host: str, script: str, timeout: float = 180) -> str:
    """``script`` as root on a lab host (over the lab's ssh); its stdout, or the test fails."""
    state = load_state(vagrant_lab.vagrant_lab_dir(base))
    assert state is not None
    proc = vagrant_ssh(state, host, ["sh", "-c", script], timeout=timeout)
    assert proc.returncode == 0, f"{host}: {script}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _host_checks(base: Path, host: str) -> dict[str, object]:
    """What the role left on ``host``: doctor's checks, the agent's unit and status."""
    cli = remote_cli(host)
    doctor = json.loads(_on(base, host, f"{cli} doctor --json || test $? = 13"))
    unit = _on(
        base, host,
        "systemctl is-active spice-libvirt-agent; systemctl show spice-libvirt-agent "
        "-p FragmentPath -p ProtectSystem -p ProtectHome -p NoNewPrivileges "
        "-p CapabilityBoundingSet -p ReadWritePaths -p StateDirectory",
    )  # fmt: skip
    status = json.loads(_on(base, host, f"{cli} agent status --json"))
    return {
        "checks": {c["name"]: c["status"] for c in doctor["checks"]},
        "unit": unit.splitlines(),
        "status": status,
    }


def _assert_sandboxed_agent_reaches_its_peer(base: Path, host: str) -> None:
    peer = "hv2" if host == "hv1" else "hv1"
    method, transport = HOST_SETUP[host]
    found = _host_checks(base, host)
    checks = found["checks"]
    assert isinstance(checks, dict)
    assert checks["hook-installed"] == checks["hook-trust"] == "ok", checks
    assert checks["agent-unit-trust"] == "ok", checks
    unit = found["unit"]
    assert isinstance(unit, list)
    assert unit[0] == "active", unit
    where = "/lib" if method == "deb" else "/etc"
    for line in (
        f"FragmentPath={where}/systemd/system/spice-libvirt-agent.service",
        "ProtectSystem=strict", "ProtectHome=read-only", "NoNewPrivileges=yes",
        "CapabilityBoundingSet=cap_dac_read_search cap_setpcap cap_sys_ptrace",
        "ReadWritePaths=-/var/lib/spice-libvirt", "StateDirectory=spice-libvirt/agent",
    ):  # fmt: skip
        assert line in unit, (host, line, unit)
    status = found["status"]
    assert isinstance(status, dict)
    assert status["running"] is True
    assert status["connected"] is True, status  # libvirt's socket, from the sandbox
    # the peer is subscribed in the background (an ssh handshake between two TCG VMs takes
    # seconds): its status says so once it answered, the agent's journal says why not
    uri = f"qemu+{transport}://{peer}/system"
    deadline = time.monotonic() + 120
    while uri not in status["destinations"] and time.monotonic() < deadline:
        time.sleep(5)
        status = _agent_status(base, host)
    journal = "" if uri in status["destinations"] else _on(
        base, host, "journalctl -u spice-libvirt-agent --no-pager -n 40 || true"
    )  # fmt: skip
    assert uri in status["destinations"], (status, journal)


def _agent_status(base: Path, host: str) -> dict[str, Any]:
    status = json.loads(_on(base, host, f"{remote_cli(host)} agent status --json"))
    assert isinstance(status, dict)
    return status


def _agent_verdict_after(base: Path, host: str, seen_before: int) -> dict[str, Any]:
    """The agent's verdict on the next migration it saw after ``seen_before`` (it settles
    within its bounded wait: a minute covers it between these slow VMs)."""
    deadline = time.monotonic() + 60
    status = _agent_status(base, host)
    while status["seen"] <= seen_before and time.monotonic() < deadline:
        time.sleep(2)
        status = _agent_status(base, host)
    assert status["seen"] > seen_before, status
    verdict = status["recent"][seen_before - status["seen"]]
    assert isinstance(verdict, dict)
    return verdict


_PURGE_LEFTOVERS = (
    "dpkg-query -W spice-libvirt 2>/dev/null | grep . && echo PACKAGE;"
    " pgrep -f '[s]pice-libvirt agent run' && echo AGENT;"
    " find / -xdev \\( -path /proc -o -path /sys -o -path /var/cache/spice-libvirt \\) -prune"
    " -o \\( -name '*spice-libvirt*' -o -name '*spice_libvirt*' \\) -print;"
    " test -e /etc/libvirt/hooks/qemu.d/50-spice-libvirt && echo SHIM; true"
)


def _purge_and_reinstall_the_package(base: Path, host: str) -> dict[str, float]:
    """``apt purge`` leaves nothing of the package (the guest and libvirtd untouched), then
    ``apt install ./spice-libvirt_*.deb`` as an admin would: doctor sees the hook, the agent
    runs."""
    times: dict[str, float] = {}
    pid = "systemctl show -p MainPID --value libvirtd"
    before = _on(base, host, f"{pid}; virsh -r list --name").split()
    t0 = time.monotonic()
    _on(base, host, "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q spice-libvirt", 300)
    times["apt purge"] = round(time.monotonic() - t0, 1)
    left = _on(base, host, _PURGE_LEFTOVERS).split()
    assert left == [], left
    assert _on(base, host, f"{pid}; virsh -r list --name").split() == before  # reloaded only
    t0 = time.monotonic()
    _on(
        base, host, "cd /var/cache/spice-libvirt/deb && DEBIAN_FRONTEND=noninteractive "
        "apt install -y -q ./spice-libvirt_*.deb", 300,
    )  # fmt: skip
    times["apt install ./deb"] = round(time.monotonic() - t0, 1)
    found = _host_checks(base, host)
    checks = found["checks"]
    assert isinstance(checks, dict)
    assert checks["hook-installed"] == checks["hook-trust"] == "ok", checks
    unit = found["unit"]
    assert isinstance(unit, list)
    assert unit[0] == "active", unit
    assert _on(base, host, f"{pid}; virsh -r list --name").split() == before
    return times


@pytest.mark.vagrant
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (libvirtd, loop devices)")
@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed")
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap is not installed")
def test_vagrant_lab_up_migrate_there_and_back_down(tmp_path: Path) -> None:
    """hv1 installed from the wheelhouse, its agent reaching hv2 over qemu+ssh; hv2 from the
    Debian package, its agent reaching hv1 over qemu+tls; both agents sandboxed by their
    units. Our controller moves the guest to hv2 (hv1's agent steps aside), then plain
    libvirt moves it back and on again, each time held by the source's agent; then hv2's
    package is purged (nothing left, the guest and libvirtd untouched) and installed again
    with apt."""
    base = tmp_path / "lab"
    cli = _cli()
    chains_before = _libvirt_chains()
    times: dict[str, object] = {}
    try:
        rc, out, times["up (all stages)"] = _run(
            [*cli, "--dir", str(base), "up", "--vagrant", "--json"], 2700
        )
        assert rc == 0, out
        state = json.loads(out)
        assert state["phase"] == "up"
        assert state["location"] == "hv1"
        for stage in ("box", "up", "up+deb", "provision", "guest"):
            times[stage] = state["timings"][stage]
        # the lab's daemons and the VMs' QEMUs run at the lowest priority (shared machine)
        # the provisioning's ssh masters (detached from its process group) are gone with it
        assert ssh_masters.masters(base / "vagrant" / "cp") == []
        niced = _lab_process_nice(base)
        assert niced, "no process of the lab found"
        assert set(niced.values()) == {19}, niced
        t0 = time.monotonic()
        for host in ("hv1", "hv2"):
            _assert_sandboxed_agent_reaches_its_peer(base, host)
        times["host checks"] = round(time.monotonic() - t0, 1)

        # (destination, plain libvirt?): the source's agent steps aside for our controller
        # and holds libvirt's own migration; its verdict must say what our client lived
        steps = [("hv2", False), ("hv1", True), ("hv2", True)]
        source = "hv1"
        for n, (destination, plain) in enumerate(steps, 1):
            seen_before = _agent_status(base, source)["seen"]
            argv = [*cli, "--dir", str(base), "migrate", "--json", *(["--plain"] if plain else [])]
            rc, out, times[f"migrate {n} {source}->{destination}"] = _run(argv, 600)
            report = json.loads(out)
            assert rc == 0, json.dumps(report, indent=1)[-3000:]
            assert report["outcome"] == "seamless", report
            assert report["migration"]["status"] == "completed"
            m = report["migration"]
            times[f"migrate {n}: total/downtime/link (ms)"] = [
                m["total_time_ms"],
                m["downtime_ms"],
                round(report["link_wait"]["duration_ms"] or 0),
            ]
            # the hook the role (hv1) or the package (hv2) installed saw this migration on
            # both hosts: the guest arriving on the destination and leaving the source
            journals = report["hook_journals"]
            assert journals["seen_on_both"], journals
            arrived = " ".join(journals["entries"][destination])
            left = " ".join(journals["entries"][source])
            assert "migrate begin ok" in arrived, journals
            assert "prepare begin ok" in arrived, journals
            assert "stopped end ok" in left or "release end ok" in left, journals
            # the source's agent (its peer over ssh or tls, sandboxed): its verdict comes once
            # the evidence settles, after our command may have returned
            verdict = _agent_verdict_after(base, source, seen_before)
            if plain:
                assert verdict["held_by"] == "agent", verdict
                assert verdict["outcome"] == report["outcome"], verdict
            else:
                assert verdict["outcome"] == "skipped", verdict
            rc, out, _ = _run([*cli, "--dir", str(base), "status", "--json"], 120)
            st = json.loads(out)
            assert (rc, st["location"], st["migrations"]) == (0, destination, n)
            source = destination

        times.update(_purge_and_reinstall_the_package(base, "hv2"))
    finally:
        rc, out, times["down"] = _run([*cli, "--dir", str(base), "down", "--json"], 600)
        sys.stderr.write(f"\nvagrant lab stage times (s): {json.dumps(times)}\n")
    down = json.loads(out)
    assert rc == 0, down
    assert down["leftovers"] == []
    # nothing of the lab left: no process mentions its directory, no bridge, no disks
    marker = str(base)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                assert marker.encode() not in (proc / "cmdline").read_bytes(), proc.name
            except OSError:
                continue
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True)
    assert "192.168.150." not in routes.stdout
    assert not (base / "vagrant" / "pool").exists()
    # libvirt's firewall chains for the lab network are gone with it
    assert _libvirt_chains() == chains_before


def test_ssh_hands_the_remote_shell_each_word_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sh -c SCRIPT`` reaches the host as one argument (ssh joins its words with spaces)."""
    seen: list[list[str]] = []

    def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    vagrant_ssh(
        VagrantLabState(directory=tmp_path), "hv1", ["sh", "-c", "a --json || test $? = 13"]
    )
    assert seen[0][-1] == "sudo -- sh -c 'a --json || test $? = 13'"
