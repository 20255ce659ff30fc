"""A lab ends the ssh masters its Ansible runs leave behind.

A real ssh master, as Ansible starts one (``ControlMaster=auto``, ``ControlPersist``), to a
real sshd: the sshd runs in inetd mode as the connection's ``ProxyCommand``, in a mount
namespace of its own whose private ``/run`` holds its privilege separation directory, so
nothing listens and nothing of it lands on this machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from spice_libvirt_lab import ssh_masters
from spice_libvirt_lab.procs import proc_start_time, same_process_alive

SSHD = Path("/usr/sbin/sshd")


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30
    )


def _ssh_argv(tmp_path: Path, control_dir: Path) -> list[str]:
    """Ansible's way of sharing a connection, to an sshd started for this connection only."""
    _keygen(tmp_path / "host_key")
    _keygen(tmp_path / "client_key")
    shutil.copy(tmp_path / "client_key.pub", tmp_path / "authorized_keys")
    (tmp_path / "sshd_config").write_text(
        f"HostKey {tmp_path / 'host_key'}\nAuthorizedKeysFile {tmp_path / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    sshd = (
        "mount -t tmpfs tmpfs /run && mkdir /run/sshd && "
        f"exec {SSHD} -i -f {tmp_path / 'sshd_config'}"
    )
    return [
        "ssh", "-F", "/dev/null", "-i", str(tmp_path / "client_key"),
        "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        "-o", "ControlMaster=auto", "-o", "ControlPersist=300",
        # short, as Ansible's hashed names: a socket's path has room for 107 bytes
        "-o", f"ControlPath={control_dir}/%h",
        "-o", f"ProxyCommand=unshare -m sh -c '{sshd}'",
        "root@lab-host", "true",
    ]  # fmt: skip


@pytest.mark.root
@pytest.mark.skipif(
    not SSHD.exists() or shutil.which("ssh") is None, reason="openssh is not installed"
)
def test_a_detached_master_is_found_and_ended(tmp_path: Path) -> None:
    control_dir = tmp_path / "cp"
    control_dir.mkdir()
    # the client in a process group of its own, as the lab runs ansible-playbook
    proc = subprocess.Popen(
        _ssh_argv(tmp_path, control_dir), start_new_session=True, stdin=subprocess.DEVNULL
    )
    assert proc.wait(timeout=60) == 0
    found = ssh_masters.masters(control_dir)
    assert len(found) == 1, found
    (master,) = found
    start = proc_start_time(master)
    try:
        # why the lab must look for it: the master left the client's group and session
        assert os.getpgid(master) != proc.pid
        assert os.getsid(master) == master
        assert ssh_masters.masters(tmp_path / "elsewhere") == []
        assert ssh_masters.end_masters(control_dir) == [master]
        assert not same_process_alive(master, start)
        assert ssh_masters.masters(control_dir) == []
        assert not any(p.is_socket() for p in control_dir.iterdir())
    finally:
        if same_process_alive(master, start):
            os.kill(master, signal.SIGKILL)


def test_nothing_to_end(tmp_path: Path) -> None:
    assert ssh_masters.end_masters(tmp_path / "cp") == []
