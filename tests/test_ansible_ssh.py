"""The role, run for real over ssh against a hypervisor that is a set of namespaces.

The "host" is the libvirt lab's host primitive (:mod:`spice_libvirt_lab.libvirt_host`): a
network namespace plus private mount and UTS namespaces in which ``/etc/libvirt``, ``/run``,
``/var/lib/libvirt``, ``/var/log/libvirt`` and ``/etc/hosts`` are the host's own, with its own
virtlogd and libvirtd (no systemd). This test adds what Ansible needs to treat it like a
machine: an sshd inside those namespaces (host key, client key and known_hosts generated in a
temp dir, strict host key checking on), and a controller namespace joined to the host by a
veth pair, from which ``ansible-playbook`` runs. Neither namespace has a route anywhere else,
so the hosts' install is offline for real; the controller builds its wheelhouse from a local
directory of wheels (fetched once from PyPI into the user cache).

Paths the host does not have privately (``/opt``, ``/etc/spice-libvirt``, ``/var/lib``,
``/usr/libexec/vdsm``) are given to the role under the test's directory: nothing of the
machine's own is written. Packages are only *checked* (``apt`` with ``state=present`` for
packages the machine already has, no cache update). libvirtd is reloaded with
``pkill --signal HUP --pidfile /run/libvirt/libvirtd.pid`` (the host's private pid file).

The playbook is ``ansible/site.yml`` itself, the one an operator runs, with its default
variables (the inventory only moves the paths above and sets the reload command). Around the
first real run the test checks what it promises: ``libvirtd.conf`` and ``qemu.conf`` byte for
byte the same, the same libvirtd PID, the same listening sockets in the host. ``lab.yml``
against the same (unmarked) host is refused before it changes anything.

The proof that libvirtd saw the hook: it started without any hook (libvirt looks for hooks
at start-up and on SIGHUP only); after the role's run, the same libvirtd (same PID: reloaded,
not restarted) calls the shim when a domain starts, and the calls show in the journal that
``spice-libvirt journal`` reads over ssh.

Everything started here is stopped by PID and the namespaces are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from spice_libvirt.agent.settings import load_agent_settings
from spice_libvirt.config import load_config
from spice_libvirt.errors import LabError
from spice_libvirt.hook.install import render_shim
from spice_libvirt_lab import netns
from spice_libvirt_lab.libvirt_host import HostConfig, LibvirtHost
from spice_libvirt_lab.libvirt_state import default_caps_seed
from spice_libvirt_lab.sshd import start_sshd

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
ROLE = ANSIBLE / "roles" / "spice_libvirt"
CONSTRAINTS = ROLE / "files" / "constraints.txt"
BIN = Path(sys.executable).parent
ANSIBLE_PLAYBOOK = BIN / "ansible-playbook"

HOST_IP = "10.252.0.1"
CTL_IP = "10.252.0.2"
HOST_NAME = "hostA"
#: the packages the lab host "has": checked by the role's apt task, never installed
LAB_PACKAGES = ["qemu-system-x86", "libvirt-daemon-system", "libvirt-clients", "python3-venv"]
SHIM = "50-spice-libvirt"
#: how ansible-playbook prefixes the role's task names
R = "spice_libvirt : "
VDSM_POINTS = ("before_vm_migrate_source", "after_vm_migrate_destination")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, bind mounts, sshd)"
    for tool in (
        "libvirtd", "virtlogd", "virsh", "ip", "unshare", "nsenter", "pkill",
        "qemu-system-x86_64", "ssh", "ssh-keygen", "dpkg-query",
    ):  # fmt: skip
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not Path("/usr/sbin/sshd").exists():
        return "sshd not installed (apt-get install openssh-server)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm not usable"
    if not ANSIBLE_PLAYBOOK.exists():
        return "ansible-core not installed in the venv"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python not installed"
    return None


if (_why := _missing()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_why))


def _run(argv: list[str], *, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed rc={proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


# --------------------------------------------------------------------------- wheels


@pytest.fixture(scope="session")
def find_links() -> Path:
    """Every pinned dependency and setuptools as wheels: the controller's offline "index".

    Fetched once per constraints file into the user cache (the only network use here, and only
    on a cold cache); the controller namespace has no network at all.
    """
    digest = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()[:12]
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "spice-libvirt"
        / f"ansible-find-links-{digest}"
    )
    if (cache / "COMPLETE").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fl-", dir=cache.parent))
    try:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        _run([*pip, "--no-deps", "--only-binary=:all:", "-d", str(tmp), "-r", str(CONSTRAINTS)],
             timeout=300)  # fmt: skip
        _run([*pip, "--no-deps", "-d", str(tmp), "setuptools>=68"], timeout=300)
        (tmp / "COMPLETE").write_text("")
        with contextlib.suppress(OSError):  # a parallel run was faster: its copy is as good
            tmp.rename(cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _snapshot_source(dest: Path) -> Path:
    """A frozen copy of the source tree: others may edit the checkout while the test runs."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(
        REPO / "spice_libvirt",
        dest / "spice_libvirt",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return dest


# --------------------------------------------------------------------------- the host


@dataclass
class SshHost:
    """A namespace hypervisor reachable over ssh from a controller namespace."""

    lab: LibvirtHost
    ctl_netns: str
    root: Path  # the test's directory
    prefix: Path  # where the role writes what the host does not have privately
    sshd: netns.ProcRef
    inventory: Path
    playbook: Path
    env: dict[str, str]

    def play(
        self, playbook: Path, *args: str, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """``ansible-playbook`` from the controller namespace (no route but to the host)."""
        argv = netns.exec_argv(
            self.ctl_netns,
            [str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory), *args, str(playbook)],
        )
        return subprocess.run(
            argv,
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @property
    def shim(self) -> Path:
        """Where the role's shim lands: the host's private /etc/libvirt/hooks/qemu.d."""
        return self.lab.etc_dir / "hooks" / "qemu.d" / SHIM

    @property
    def venv(self) -> Path:
        return self.prefix / "opt" / "spice-libvirt"

    def ansible(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``site.yml`` (the production playbook) against the host."""
        return self.play(self.playbook, *args, timeout=timeout)

    def ssh(self, command: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """One command on the host over ssh, with the same keys and known_hosts as Ansible."""
        ssh_dir = self.root / "ssh"
        argv = netns.exec_argv(
            self.ctl_netns,
            [
                "ssh", "-F", "/dev/null", "-i", str(ssh_dir / "id_ed25519"),
                "-o", f"UserKnownHostsFile={ssh_dir / 'known_hosts'}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", f"root@{HOST_IP}", command,
            ],
        )  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _installed(packages: list[str]) -> list[str]:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.endswith(" installed")]


def _write_inventory(h_root: Path, prefix: Path, find_links: Path, source: Path) -> Path:
    ssh_dir = h_root / "ssh"
    packages = _installed(LAB_PACKAGES)
    assert packages, "none of the lab packages is installed"
    host_vars: dict[str, Any] = {
        "ansible_host": HOST_IP,
        "ansible_user": "root",
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_ssh_private_key_file": str(ssh_dir / "id_ed25519"),
        "ansible_ssh_common_args": (
            f"-F /dev/null -o UserKnownHostsFile={ssh_dir / 'known_hosts'} "
            "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"
        ),
        "ansible_remote_tmp": str(h_root / "remote-tmp"),
        "ansible_become": False,  # root already; the host has no sudo
        # ssh's connection sharing keyed by address, port and user (the same in every run of
        # this test, on a shared machine): a socket of this run only, never another's host
        "ansible_control_path_dir": str(h_root / "cp"),
        # only paths the host has privately stay as in production
        "spice_libvirt_venv": str(prefix / "opt" / "spice-libvirt"),
        "spice_libvirt_config_dir": str(prefix / "etc" / "spice-libvirt"),
        "spice_libvirt_journal_path": str(prefix / "var" / "lib" / "spice-libvirt" / "journal.sqlite3"),
        "spice_libvirt_remote_wheelhouse_dir": str(prefix / "var" / "cache" / "spice-libvirt" / "wheelhouse"),
        "spice_libvirt_vdsm_hooks_dir": str(prefix / "usr" / "libexec" / "vdsm" / "hooks"),
        # no systemd in a namespace host: the unit is written, not enabled
        "spice_libvirt_agent_unit_path": str(prefix / "etc" / "systemd" / "system" / "spice-libvirt-agent.service"),
        "spice_libvirt_agent_service": False,
        "spice_libvirt_spice_address": HOST_IP,
        "spice_libvirt_packages": packages,
        "spice_libvirt_apt_update_cache": False,
        "spice_libvirt_reload_argv": [
            "pkill", "--signal", "HUP", "--pidfile", "/run/libvirt/libvirtd.pid",
        ],
        # the controller side: a frozen source tree, an offline wheel source
        "spice_libvirt_source_dir": str(source),
        "spice_libvirt_wheelhouse_dir": str(h_root / "controller-wheelhouse"),
        "spice_libvirt_wheelhouse_pip_args": ["--no-index", "--find-links", str(find_links)],
    }  # fmt: skip
    inventory = h_root / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump({"hypervisors": {"hosts": {HOST_NAME: host_vars}}}, sort_keys=False)
    )
    return inventory


@pytest.fixture(scope="module")
def ssh_host(find_links: Path) -> Iterator[SshHost]:
    """One fresh namespace hypervisor with libvirtd (no hook yet) and sshd."""
    root = Path(tempfile.mkdtemp(prefix="sla-"))
    tag = uuid.uuid4().hex[:6]
    host_ns, ctl_ns = f"sla-{tag}", f"slc-{tag}"
    created: list[str] = []
    lab: LibvirtHost | None = None
    sshd_proc: netns.ProcRef | None = None
    try:
        for ns in (host_ns, ctl_ns):
            netns.add(ns)
            created.append(ns)
        netns.add_veth(host_ns, "eth0", ctl_ns, "eth0")
        netns.add_address(host_ns, "eth0", f"{HOST_IP}/24")
        netns.add_address(ctl_ns, "eth0", f"{CTL_IP}/24")
        seed = default_caps_seed(0)
        lab = LibvirtHost(
            HostConfig(
                name="A",
                hostname=HOST_NAME,
                netns=host_ns,
                ip=HOST_IP,
                host_uuid=str(uuid.uuid4()),
                state_dir=root / "state",
                hosts={HOST_NAME: HOST_IP, "controller": CTL_IP},
                caps_seed=seed if seed.is_dir() else None,
            )
        )
        lab.prepare()
        lab.start(timeout=60)
        sshd_proc = start_sshd(lab, root / "ssh", HOST_IP)
        prefix = root / "prefix"
        (prefix / "usr" / "libexec" / "vdsm" / "hooks").mkdir(parents=True)  # "VDSM is here"
        inventory = _write_inventory(root, prefix, find_links, _snapshot_source(root / "src"))
        playbook = ANSIBLE / "site.yml"  # the production playbook, as an operator runs it
        env = dict(os.environ)
        env.update(
            {
                "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
                "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
                "ANSIBLE_HOME": str(root / "ansible-home"),
                "ANSIBLE_LOCAL_TEMP": str(root / "ansible-tmp"),
                "ANSIBLE_HOST_KEY_CHECKING": "True",
                # a loaded CI machine: retry a dropped ssh connection rather than fail the run
                "ANSIBLE_SSH_RETRIES": "3",
                "ANSIBLE_TIMEOUT": "30",
                "ANSIBLE_NOCOLOR": "1",
                "ANSIBLE_FORCE_COLOR": "0",
                "TMPDIR": str(root),
                "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            }
        )
        yield SshHost(lab, ctl_ns, root, prefix, sshd_proc, inventory, playbook, env)
    finally:
        errors: list[str] = []
        if lab is not None:
            try:
                if lab.runtime.libvirtd is not None and lab.runtime.libvirtd.alive():
                    for dom in lab.run(["virsh", "list", "--name"]).split():
                        lab.run(["virsh", "destroy", dom], timeout=60)
            except LabError as exc:
                errors.append(str(exc))
        if sshd_proc is not None:
            netns.terminate([sshd_proc])
        if lab is not None:
            lab.stop()
        for ns in created:  # ends whatever is left in them (ssh masters, sessions)
            try:
                netns.delete(ns)
            except LabError as exc:
                errors.append(str(exc))
        shutil.rmtree(root, ignore_errors=True)
        assert not errors, errors


# --------------------------------------------------------------------------- helpers


def _recap(output: str) -> dict[str, int]:
    m = re.search(rf"^{HOST_NAME}\s+:\s+(.*)$", output, re.MULTILINE)
    assert m, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def _ok(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    out = proc.stdout + proc.stderr
    if "UNREACHABLE" in out:  # say why: sshd's side of it
        logs = sorted(Path(tempfile.gettempdir()).glob("sla-*/state/run/sshd-lab/sshd.log"))
        out += "".join(f"\n--- {log}\n{log.read_text()[-3000:]}" for log in logs)
    assert proc.returncode == 0, out[-6000:]
    recap = _recap(proc.stdout)
    assert recap["failed"] == 0, out[-6000:]
    assert recap["unreachable"] == 0, out[-6000:]
    return recap


def _changed_tasks(output: str) -> list[str]:
    """Names of the tasks that reported a change (``changed: [hostA]``)."""
    names: list[str] = []
    current = ""
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            current = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith(f"changed: [{HOST_NAME}]"):
            names.append(current)
    return names


@dataclass(frozen=True)
class HostSnapshot:
    """What the production playbook must leave as it found it on a hypervisor."""

    #: sha256 of libvirtd.conf, qemu.conf and /etc/hosts (None: absent)
    files: dict[str, str | None]
    #: libvirtd's PID as its own pid file says
    libvirtd_pid: int
    #: every listening socket in the host: (netid, local address[:port])
    listeners: frozenset[tuple[str, str]]


def _snapshot(h: SshHost) -> HostSnapshot:
    files: dict[str, str | None] = {}
    for path in (h.lab.etc_dir / "libvirtd.conf", h.lab.etc_dir / "qemu.conf"):
        files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
    files["/etc/hosts"] = hashlib.sha256(h.lab.run(["cat", "/etc/hosts"]).encode()).hexdigest()
    pid = int(h.lab.run(["cat", "/run/libvirt/libvirtd.pid"]).strip())
    listeners = frozenset(
        (fields[0], fields[4])
        for line in h.lab.run(["ss", "-H", "-l", "-n", "-t", "-u", "-x", "-w"]).splitlines()
        if len(fields := line.split()) >= 5
    )
    assert any(netid == "tcp" for netid, _ in listeners), listeners  # sshd at least
    return HostSnapshot(files, pid, listeners)


_DOMAIN = """<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <graphics type='spice' autoport='yes'><listen type='address'/></graphics>
    <video><model type='qxl'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""

_FAKE_VDSM_QEMU_HOOK = """#!/bin/sh
# stands in for VDSM's hooks/qemu: the role must never touch it
echo "vdsm-qemu $*" >> /var/log/libvirt/vdsm-qemu-hook.log
cat > /dev/null
exit 0
"""


# --------------------------------------------------------------------------- tests


def test_role_over_ssh_check_run_idempotent_reload_and_hook_seen(ssh_host: SshHost) -> None:
    h = ssh_host
    libvirtd = h.lab.runtime.libvirtd
    assert libvirtd is not None
    # VDSM's own hook, written after libvirtd started (so libvirtd has seen no hook yet)
    vdsm_qemu = h.lab.etc_dir / "hooks" / "qemu"
    vdsm_qemu.write_text(_FAKE_VDSM_QEMU_HOOK)
    vdsm_qemu.chmod(0o755)
    vdsm_before = vdsm_qemu.stat()
    timings: dict[str, float] = {}

    # 1. --check --diff on the fresh host: succeeds, predicts changes, makes none
    t0 = time.monotonic()
    check_fresh = h.ansible("--check", "--diff")
    timings["check fresh"] = time.monotonic() - t0
    recap = _ok(check_fresh)
    assert recap["changed"] >= 5, check_fresh.stdout[-4000:]
    assert "Reload libvirt with spice_libvirt_reload_argv" in check_fresh.stdout
    assert not h.venv.exists()
    assert not h.shim.exists()
    assert not (h.prefix / "etc").exists()
    assert "+++ after" in check_fresh.stdout  # --diff shows the files it would write

    # 2. the real run: install offline, config, shim, VDSM adapters, reload, verify
    before = _snapshot(h)
    assert None not in (before.files["libvirtd.conf"], before.files["qemu.conf"])
    t0 = time.monotonic()
    first = h.ansible("--diff")
    timings["first run"] = time.monotonic() - t0
    recap = _ok(first)
    # what site.yml promises with its defaults: libvirtd's and QEMU's configuration byte for
    # byte, the same libvirtd (reloaded, not restarted), no new listener, /etc/hosts untouched
    assert _snapshot(h) == before
    changed = _changed_tasks(first.stdout)
    assert (
        f"{R}Install spice-libvirt from the wheelhouse (no package index, hashes checked)"
        in changed
    )
    assert f"{R}Install the hook shim (new, so libvirt reloads to see it)" in changed
    assert f"{R}Reload libvirt with spice_libvirt_reload_argv" in changed
    assert "Install Debian packages" not in " ".join(changed)  # present: checked, not touched
    assert h.shim.stat().st_mode & 0o777 == 0o755
    config_file = h.prefix / "etc" / "spice-libvirt" / "config.toml"
    # the same text `spice-libvirt hook install` writes
    # the fast form (python -I -S on the installed launcher), as `hook install` writes it
    launcher = next((h.venv / "lib").glob("python3*/site-packages/spice_libvirt/hook/launch.py"))
    assert h.shim.read_text() == render_shim(
        h.venv / "bin" / "python", config_file, launcher=launcher
    )
    settings = load_config(config_file)
    assert settings.spice_address == HOST_IP
    assert settings.journal_path == h.prefix / "var/lib/spice-libvirt/journal.sqlite3"
    assert (h.venv / "spice-libvirt-wheelhouse.txt").is_file()
    # the host's copy of the wheelhouse: root's, 0644, every wheel pinned with its hash
    remote = h.prefix / "var" / "cache" / "spice-libvirt" / "wheelhouse"
    files = sorted(remote.iterdir())
    assert {(p.stat().st_uid, p.stat().st_mode & 0o7777) for p in files} == {(0, 0o644)}
    wheels = [p for p in files if p.suffix == ".whl"]
    hashed = (remote / "requirements.txt").read_text()
    assert hashed.count(" --hash=sha256:") == len(wheels) > 1
    assert (h.venv.stat().st_uid, h.venv.stat().st_mode & 0o777) == (0, 0o755)
    assert libvirtd.alive(), "libvirtd was restarted or killed instead of reloaded"
    assert vdsm_qemu.read_text() == _FAKE_VDSM_QEMU_HOOK
    assert vdsm_qemu.stat().st_mtime_ns == vdsm_before.st_mtime_ns
    for point in VDSM_POINTS:
        adapter = h.prefix / "usr/libexec/vdsm/hooks" / point / "50_spice_libvirt"
        assert adapter.stat().st_mode & 0o777 == 0o755
        assert f'"${{SPICE_LIBVIRT_VENV:-{h.venv}}}/bin/python3"' in adapter.read_text()

    # 3. the second run changes nothing (and does not reload)
    t0 = time.monotonic()
    second = h.ansible("--diff")
    timings["second run"] = time.monotonic() - t0
    assert _ok(second)["changed"] == 0, _changed_tasks(second.stdout)
    assert "RUNNING HANDLER" not in second.stdout

    # 4. --check --diff on the converged host: 0 changes, and the status check ran for real
    t0 = time.monotonic()
    check_conv = h.ansible("--check", "--diff")
    timings["check converged"] = time.monotonic() - t0
    assert _ok(check_conv)["changed"] == 0, _changed_tasks(check_conv.stdout)
    assert "The shim is ours and points at an existing executable" in check_conv.stdout
    assert _snapshot(h) == before

    # 5. the same libvirtd (reloaded, never restarted) now calls the shim: start a domain
    xml = h.root / "dom.xml"
    xml.write_text(_DOMAIN.format(name="ansvm"))
    h.lab.run(["virsh", "define", str(xml)])
    t0 = time.monotonic()
    h.lab.run(["virsh", "start", "ansvm"], timeout=120)
    timings["domain start"] = time.monotonic() - t0
    journal = h.ssh(
        f"SPICE_LIBVIRT_CONFIG={h.prefix}/etc/spice-libvirt/config.toml "
        f"{h.venv}/bin/spice-libvirt journal --json --domain ansvm"
    )
    assert journal.returncode == 0, journal.stderr
    rows = list(reversed(json.loads(journal.stdout)))
    ops = [(r["operation"], r["suboperation"]) for r in rows if r["source"] == "libvirt"]
    assert ops[:3] == [("prepare", "begin"), ("start", "begin"), ("started", "begin")], rows
    assert all(r["outcome"] == "ok" for r in rows[:3]), rows
    assert libvirtd.alive()
    # VDSM's hooks/qemu still runs too (libvirt runs it before qemu.d/)
    assert "vdsm-qemu ansvm started begin" in (h.lab.log_dir / "vdsm-qemu-hook.log").read_text()
    h.lab.run(["virsh", "destroy", "ansvm"], timeout=60)

    # 6. the host agent's unit names this venv's command; its settings parse
    unit = h.prefix / "etc" / "systemd" / "system" / "spice-libvirt-agent.service"
    agent_toml = h.prefix / "etc" / "spice-libvirt" / "agent.toml"
    lines = unit.read_text().splitlines()
    assert f"ExecStart={h.venv}/bin/spice-libvirt agent run --config {agent_toml}" in lines
    assert f"ReadWritePaths=-{h.prefix / 'var' / 'lib' / 'spice-libvirt'}" in lines
    agent = load_agent_settings(h.prefix / "etc" / "spice-libvirt" / "agent.toml", {})
    assert agent.destination_uri == "qemu+tls://{peer}/system"
    assert agent.peers == ()  # the only hypervisor of this play
    assert agent.journal_path == h.prefix / "var/lib/spice-libvirt/journal.sqlite3"

    print("ansible over ssh, seconds:", {k: round(v, 1) for k, v in timings.items()})


def test_lab_playbook_refuses_an_unmarked_host(ssh_host: SshHost) -> None:
    """``lab.yml`` (TCP libvirtd, /etc/hosts, a restart) against a host that no lab's
    inventory marked: refused before any task that changes something, nothing changed."""
    h = ssh_host
    before = _snapshot(h)
    tree_before = sorted(str(p) for p in h.prefix.rglob("*"))
    for extra, why in (
        ((), "not a lab host (spice_libvirt_lab_host=unset)"),
        (("-e", "spice_libvirt_lab_host=netns"), "a namespace-lab host"),
    ):
        proc = h.play(ANSIBLE / "lab.yml", *extra)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        assert f"refusing {HOST_NAME}: {why}" in out, out[-3000:]
        recap = _recap(proc.stdout)
        assert (recap["failed"], recap["changed"]) == (1, 0), recap
        assert "Lab only" not in proc.stdout  # no later task even started
        assert f"{R}" not in proc.stdout  # nor the role
    assert _snapshot(h) == before
    assert sorted(str(p) for p in h.prefix.rglob("*")) == tree_before


def test_vdsm_adapter_records_into_the_journal(ssh_host: SshHost) -> None:
    """The deployed adapter works as VDSM would call it: XML in a file named by $_hook_domxml."""
    h = ssh_host
    if not (h.venv / "spice-libvirt-wheelhouse.txt").is_file():
        _ok(h.ansible())
    domxml = h.root / "vdsm-dom.xml"
    domxml.write_text(
        "<domain type='kvm'><name>vdsmvm</name><uuid>00000000-0000-4000-8000-00000000a001</uuid>"
        f"<devices><graphics type='spice' port='5901'><listen type='address' address='{HOST_IP}'/>"
        "</graphics></devices></domain>"
    )
    adapter = h.prefix / "usr/libexec/vdsm/hooks/before_vm_migrate_source/50_spice_libvirt"
    res = h.ssh(f"_hook_domxml={domxml} vmId=00000000-0000-4000-8000-00000000a001 {adapter}")
    assert res.returncode == 0, res.stderr
    assert domxml.read_text().startswith("<domain type='kvm'><name>vdsmvm</name>")  # untouched
    journal = h.ssh(
        f"SPICE_LIBVIRT_CONFIG={h.prefix}/etc/spice-libvirt/config.toml "
        f"{h.venv}/bin/spice-libvirt journal --json --domain vdsmvm"
    )
    assert journal.returncode == 0, journal.stderr
    [row] = json.loads(journal.stdout)
    assert row["source"] == "vdsm"
    assert row["uuid"] == "00000000-0000-4000-8000-00000000a001"


def test_unpinned_pip_spec_and_tags_change_nothing(ssh_host: SshHost) -> None:
    """``spice-libvirt>=0.1`` resolves to the same wheels: no reinstall. Tags select steps."""
    h = ssh_host
    if not (h.venv / "spice-libvirt-wheelhouse.txt").is_file():
        _ok(h.ansible())
    # the project wheel the role built from source is what the "index" offers for the spec
    index = h.root / "project-wheels"
    index.mkdir(exist_ok=True)
    for whl in (h.root / "controller-wheelhouse" / "wheels").glob("spice_libvirt-*.whl"):
        shutil.copy2(whl, index)
    inv = yaml.safe_load(h.inventory.read_text())
    hv = inv["hypervisors"]["hosts"][HOST_NAME]
    spec_args = [
        "-e",
        json.dumps(
            {
                "spice_libvirt_pip_spec": "spice-libvirt>=0.1",
                "spice_libvirt_wheelhouse_pip_args": [
                    *hv["spice_libvirt_wheelhouse_pip_args"], "--find-links", str(index),
                ],
            }
        ),
    ]  # fmt: skip
    unpinned = h.ansible(*spec_args)
    assert _ok(unpinned)["changed"] == 0, _changed_tasks(unpinned.stdout)
    assert "Install spice-libvirt from the wheelhouse" in unpinned.stdout  # evaluated, skipped

    only_verify = h.ansible("--tags", "verify")
    _ok(only_verify)
    assert "Hook self-test" in only_verify.stdout
    assert "Build the wheelhouse" not in only_verify.stdout
    assert "Install Debian packages" not in only_verify.stdout

    # a config change is applied without touching libvirtd
    libvirtd = h.lab.runtime.libvirtd
    assert libvirtd is not None
    config = h.ansible("--tags", "config", "-e", "spice_libvirt_journal_max_rows=500")
    assert _changed_tasks(config.stdout) == [f"{R}Configuration file config.toml"]
    assert "RUNNING HANDLER" not in config.stdout
    assert libvirtd.alive()
    assert "journal_max_rows = 500" in (h.prefix / "etc/spice-libvirt/config.toml").read_text()


MOLECULE = BIN / "molecule"


@pytest.mark.skipif(not MOLECULE.exists(), reason="molecule not installed in the venv")
def test_molecule_scenario_against_the_namespace_host(ssh_host: SshHost) -> None:
    """``molecule test`` (driver default, managed: false) from the role's directory."""
    h = ssh_host
    env = {k: v for k, v in h.env.items() if not k.startswith("ANSIBLE_CONFIG")}
    env.update(
        {
            "SPICE_LIBVIRT_MOLECULE_INVENTORY": str(h.inventory),
            "MOLECULE_EPHEMERAL_DIRECTORY": str(h.root / "molecule"),
            "XDG_CACHE_HOME": str(h.root / "cache"),
            "NO_COLOR": "1",
        }
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        netns.exec_argv(h.ctl_netns, [str(MOLECULE), "test", "--scenario-name", "default"]),
        cwd=ROLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    for step in ("syntax", "converge", "idempotence", "check", "verify"):
        assert f"default > {step}: Executed: Successful" in out, (step, out[-4000:])
    # converge installed for real; the idempotence and check passes changed nothing
    recaps = re.findall(rf"^{HOST_NAME}\s+:\s+ok=\d+\s+changed=(\d+)", out, re.MULTILINE)
    assert len(recaps) == 4, recaps  # converge, idempotence, check, verify
    assert recaps[1:] == ["0", "0", "0"], recaps
    assert (h.venv / "spice-libvirt-wheelhouse.txt").is_file()
    print(f"molecule test: {time.monotonic() - t0:.1f} s")
