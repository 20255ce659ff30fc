"""The libvirt lab's extra processes: per-host daemons and the domains' clients, by PID.

Besides each host's libvirtd and virtlogd, a lab may run more: an sshd in each host (so that
Ansible reaches the hosts as machines: :func:`start_sshds` and the inventory it writes), a
host agent (later), and one SPICE client per domain in the client namespace
(:mod:`~spice_libvirt_lab.libvirt_fleet`). They are all :class:`LabProcess` entries in the
lab state: written as they start, listed by ``lab status``, stopped by PID (checked against
their start time) by ``lab down`` before the hosts' own daemons (:func:`stop_all`).

To add a per-host daemon: :func:`start_in_host` (a foreground process: its PID is known at
once), or start it yourself inside the host (``state.host(name).enter_argv``) and
:func:`record` it with ``where`` = the host's name.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from spice_libvirt_lab import netns, sshd
from spice_libvirt_lab.libvirt_state import (
    HOSTS,
    LabProcess,
    LabState,
    ProcessStatus,
    save,
)

#: the inventory's group of lab hosts (the role's and the playbooks' group name)
GROUP = "hypervisors"


def record(state: LabState, process: LabProcess, *, client: bool = False) -> None:
    """Add a started process to the lab state (and save it at once)."""
    (state.clients if client else state.daemons).append(process)
    save(state)


def start_in_host(state: LabState, name: str, argv: list[str], what: str) -> LabProcess:
    """Start a foreground process inside host ``name`` and record it; ``lab down`` stops it.

    ``nsenter`` enters the host's namespaces and execs in place, so the PID is the
    process's own. Its output goes to ``<run dir>/<what>.<name>.log``; it runs in a session
    of its own (a Ctrl-C of ``lab up`` does not reach it).
    """
    host = state.host(name)
    log = state.run_dir / f"{what.replace(' ', '-')}.{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            host.enter_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    entry = LabProcess(where=name, what=what, proc=netns.ProcRef.of(proc.pid, what), log=log)
    record(state, entry)
    return entry


def stop_all(state: LabState, timeout: float = 5.0) -> list[str]:
    """Stop every client, then every per-host daemon, by PID; what was stopped."""
    stopped: list[str] = []
    for group in (state.clients, state.daemons):
        alive = [p for p in group if p.proc.alive()]
        netns.terminate([p.proc for p in alive], timeout=timeout)
        stopped += [f"{p.what} pid {p.proc.pid}" for p in alive]
    return stopped


def statuses(processes: list[LabProcess]) -> list[ProcessStatus]:
    return [ProcessStatus(**p.model_dump(), alive=p.proc.alive()) for p in processes]


# --------------------------------------------------------------------------- sshd + inventory


def ssh_dir(state: LabState) -> Path:
    """The client side of the lab's ssh: the client key and known_hosts (root namespace)."""
    return state.run_dir / "ansible" / "ssh"


def start_sshds(state: LabState) -> Path | None:
    """An sshd in each host and the Ansible inventory naming them; the inventory's path.

    None (and a note in the state) when this machine has no sshd: the lab works without.
    """
    if (why := sshd.missing_tools()) is not None:
        state.notes.append(f"no Ansible inventory: {why}")
        save(state)
        return None
    for name in HOSTS:
        host = state.host(name)
        ip = state.hosts[name].config.ip
        ref = sshd.start_sshd(host, ssh_dir(state), ip)
        record(
            state,
            LabProcess(
                where=name, what=ref.what, proc=ref, log=sshd.log_path(host), address=f"{ip}:22"
            ),
        )
    state.ansible_inventory = write_inventory(state)
    save(state)
    return state.ansible_inventory


def inventory(state: LabState) -> dict[str, object]:
    """The lab's hosts as an Ansible inventory (YAML-plugin structure).

    Reached from anywhere on this machine: each host's ssh goes through a ProxyCommand that
    connects from inside the host's own namespace (no client delay on the admin's path).
    Commands run as root inside the host; the playbooks find spice-libvirt in this venv and
    reach the peer's libvirtd over plain TCP (the lab's libvirtds listen on TCP). The hosts
    are marked ``spice_libvirt_lab_host: netns``: lab hosts, which ``ansible/lab.yml`` still
    refuses (this lab configures its libvirtds itself, and its hosts share this machine's
    ``/etc/spice-libvirt`` and ``/opt``).
    """
    keys = ssh_dir(state)
    hosts: dict[str, object] = {}
    for name in HOSTS:
        cfg = state.hosts[name].config
        hosts[cfg.hostname] = {
            "ansible_host": cfg.ip,
            "ansible_ssh_common_args": shlex.join(
                sshd.ssh_common_args(keys, proxy_netns=cfg.netns)
            ),
        }
    return {
        GROUP: {
            "hosts": hosts,
            "vars": {
                "ansible_user": "root",
                "ansible_become": False,  # root already; the hosts have no sudo
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_ssh_private_key_file": str(keys / sshd.CLIENT_KEY),
                # inside the host's private /run: nothing lands in the machine's /root
                "ansible_remote_tmp": "/run/ansible-tmp",
                # ssh's shared connections are keyed by address, port and user, which other
                # labs on this machine may use too: sockets of this lab only
                "ansible_control_path_dir": str(keys.parent / "cp"),
                "spice_libvirt_venv": sys.prefix,
                "spice_libvirt_evacuate_transport": "tcp",
                "spice_libvirt_lab_host": "netns",
            },
        }
    }


def write_inventory(state: LabState) -> Path:
    """``<run dir>/ansible/inventory.json`` (JSON is YAML: Ansible's yaml plugin reads it)."""
    path = state.run_dir / "ansible" / "inventory.json"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.write_text(json.dumps(inventory(state), indent=1) + "\n")
    path.chmod(0o600)
    return path
