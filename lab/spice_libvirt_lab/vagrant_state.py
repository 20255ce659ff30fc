"""The Vagrant lab's state file, its hosts' ssh access, and the inventory it writes.

Vagrant replaces the box's insecure key on the first boot, so the only truthful source of
how to reach a VM is ``vagrant ssh-config``: the lab parses it once after ``vagrant up`` and
writes two things from it into the lab directory, an ``ssh_config`` (for the lab's own ssh
calls: journals, status) and an Ansible ``inventory.ini`` (for ``lab.yml`` now, and for an
admin's ``ansible-playbook -i`` later, e.g. ``evacuate.yml``). The inventory marks each host
``spice_libvirt_lab_host=vagrant``: ``lab.yml`` refuses every host without that mark.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from spice_libvirt.errors import LabError
from spice_libvirt_lab.vagrant_box import Box
from spice_libvirt_lab.vagrant_libvirtd import PrivateLibvirtd

STATE_FILE = "vagrant-lab.json"
HOSTS = ("hv1", "hv2")
#: the hosts' fixed addresses (DHCP reservations by MAC; the same in vagrant/Vagrantfile)
HOST_IPS = {"hv1": "192.168.150.11", "hv2": "192.168.150.12"}
HOST_MACS = {"hv1": "52:54:00:5c:01:11", "hv2": "52:54:00:5c:01:12"}
NETWORK_GATEWAY = "192.168.150.1"
NETWORK_CIDR = "192.168.150.0/24"
#: how the role installs each host -- both of its methods, a venv from the wheelhouse and
#: the Debian package -- and how each host's agent reaches its peer: over TLS and over SSH,
#: as production hosts would (the lab's own libvirt calls use its TCP listeners)
HOST_SETUP = {"hv1": ("wheelhouse", "ssh"), "hv2": ("deb", "tls")}
#: where each install method puts the command (ansible/roles/spice_libvirt)
REMOTE_CLI = {"wheelhouse": "/opt/spice-libvirt/bin/spice-libvirt", "deb": "/usr/bin/spice-libvirt"}
#: the inventory's mark of a lab VM, the only kind of host ``ansible/lab.yml`` accepts
LAB_HOST_MARK = "spice_libvirt_lab_host=vagrant"

Phase = Literal["starting", "up", "down"]


class SshHost(BaseModel):
    """One VM as ``vagrant ssh-config`` describes it."""

    name: str
    address: str
    port: int = 22
    user: str = "vagrant"
    key: Path


class VagrantLabState(BaseModel):
    directory: Path
    phase: Phase = "starting"
    driver: str = "qemu"
    box: Box | None = None
    libvirtd: PrivateLibvirtd | None = None
    network: str = ""
    pool: str = ""
    hosts: dict[str, SshHost] = Field(default_factory=dict)
    domain: str = "labvm"
    #: the hypervisor the guest runs on now
    location: str = "hv1"
    migrations: int = 0
    last_outcome: str | None = None
    #: seconds per stage: box, libvirtd, up, provision, guest, migrate-N, down
    timings: dict[str, float] = Field(default_factory=dict)
    #: the Debian package hv2 is installed from (built from this tree)
    deb: Path | None = None

    @property
    def ssh_config(self) -> Path:
        return self.directory / "ssh_config"

    @property
    def inventory(self) -> Path:
        return self.directory / "inventory.ini"

    @property
    def control_dir(self) -> Path:
        """Ansible's ssh control sockets (``ansible_control_path_dir``): this lab's only."""
        return self.directory / "cp"

    def pki_dir(self, host: str) -> Path:
        """``host``'s libvirt TLS files (the lab's CA certificate, its certificate and key)."""
        return self.directory / "pki" / host

    @property
    def root_ssh_key(self) -> Path:
        """root's key on every lab host (its ``.pub`` beside it)."""
        return self.directory / "root-ssh" / "id_ed25519"

    def tcp_uri(self, host: str) -> str:
        """libvirt on ``host`` from this machine (lab.yml opens TCP on the lab network)."""
        return f"qemu+tcp://{HOST_IPS[host]}/system"

    def save(self) -> None:
        path = self.directory / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=1))
        tmp.replace(path)


def load_state(directory: Path) -> VagrantLabState | None:
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    try:
        return VagrantLabState.model_validate_json(path.read_text())
    except ValueError as exc:
        raise LabError(f"unreadable Vagrant lab state {path}: {exc}") from exc


def parse_ssh_config(text: str) -> dict[str, SshHost]:
    """``vagrant ssh-config`` output -> one :class:`SshHost` per ``Host`` block."""
    hosts: dict[str, SshHost] = {}
    current: dict[str, str] = {}

    def flush() -> None:
        if "host" in current and "identityfile" in current:
            hosts[current["host"]] = SshHost(
                name=current["host"],
                address=current.get("hostname", current["host"]),
                port=int(current.get("port", "22")),
                user=current.get("user", "vagrant"),
                key=Path(current["identityfile"].strip('"')),
            )

    for raw in text.splitlines():
        parts = raw.strip().split(None, 1)
        if len(parts) != 2:
            continue
        key, value = parts[0].lower(), parts[1].strip()
        if key == "host":
            flush()
            current = {"host": value}
        elif key not in current:  # ssh takes the first value of a repeated option
            current[key] = value
    flush()
    return hosts


def write_access_files(state: VagrantLabState) -> None:
    """``ssh_config`` and ``inventory.ini`` in the lab directory, from the parsed hosts.

    Host keys are not checked: the VMs make new ones on every ``vagrant up`` and live on a
    network only this lab created (the same choice ``ansible/inventory/lab.ini`` makes).
    """
    opts = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes"
    blocks = []
    lines = ["[hypervisors]"]
    for name, h in state.hosts.items():
        blocks.append(
            f"Host {name}\n  HostName {h.address}\n  Port {h.port}\n  User {h.user}\n"
            f"  IdentityFile {h.key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 20\n"
        )
        ip = HOST_IPS[name]
        method, transport = HOST_SETUP[name]
        deb = f" spice_libvirt_deb_file={state.deb}" if method == "deb" and state.deb else ""
        lines.append(
            f"{name} ansible_host={h.address} ansible_port={h.port} ansible_user={h.user} "
            f"ansible_ssh_private_key_file={h.key} {LAB_HOST_MARK} spice_libvirt_lab_ip={ip} "
            f"spice_libvirt_spice_address={ip} spice_libvirt_install_method={method}{deb} "
            f"spice_libvirt_lab_agent_transport={transport} "
            f"spice_libvirt_lab_pki={state.pki_dir(name)}"
        )
    lines += [
        "",
        "[all:vars]",
        "ansible_python_interpreter=/usr/bin/python3",
        f"ansible_control_path_dir={state.control_dir}",
        f"ansible_ssh_common_args='{opts}'",
        f"spice_libvirt_lab_root_ssh_key={state.root_ssh_key}",
        "",
    ]
    state.ssh_config.write_text("\n".join(blocks))
    state.inventory.write_text("# written by 'spice-libvirt lab up --vagrant'\n" + "\n".join(lines))


def remote_cli(host: str) -> str:
    """The ``spice-libvirt`` command on ``host``, as its install method put it there."""
    return REMOTE_CLI[HOST_SETUP[host][0]]


def ssh(
    state: VagrantLabState, host: str, command: list[str], *, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` on ``host`` as root (sudo) over ssh with the lab's ssh_config."""
    # ssh hands the remote shell one string: each word quoted, or "sh -c SCRIPT" splits
    argv = ["ssh", "-F", str(state.ssh_config), host, shlex.join(["sudo", "--", *command])]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"ssh {host} {' '.join(command)}: timed out after {timeout:.0f} s") from exc


def remote_journal(state: VagrantLabState, host: str, limit: int = 200) -> list[dict[str, object]]:
    """``spice-libvirt journal --json`` on ``host``: what the hook installed by the role saw."""
    cmd = [remote_cli(host), "journal", "--json", "--limit", str(limit), "--domain", state.domain]
    proc = ssh(state, host, cmd)
    if proc.returncode != 0:
        raise LabError(f"journal on {host}: {proc.stderr.strip() or proc.stdout.strip()}")
    entries = json.loads(proc.stdout)
    if not isinstance(entries, list):
        raise LabError(f"journal on {host}: not a JSON array")
    return entries
