"""An sshd inside a lab host, so that Ansible (or an admin) reaches it like a machine.

A lab host (:mod:`~spice_libvirt_lab.libvirt_host`) is a network namespace plus private
mount and UTS namespaces; commands run over ssh there see the host's own ``/etc/libvirt``,
``/run`` and libvirtd, so ``qemu:///system`` on "hostA" is host A's libvirtd, as on a real
hypervisor. The sshd is key-only (root, no password, no PAM) and listens on the host's lab
address only.

Where the files live, and why:

* the **client side** (the client key ``id_ed25519`` and ``known_hosts`` with each host's key
  under its address, strict checking) in a directory the caller names (the lab's
  ``<run dir>/ansible``), read by ssh in the root namespace;
* the **host side** (host key, ``authorized_keys``, ``sshd_config``, pid file, log) in the
  host's private ``/run`` (``<state>/run/sshd-lab``): the lab directory may itself lie under
  ``/run``, which the host replaces with its own, so only paths inside the host's mounts are
  sure to be seen by sshd and by the children it forks for each login.

Private keys are written 0600 in 0700 directories. The sshd is started with ``nsenter``
into the host and daemonizes; its PID (with its start time) is what the lab records and
``lab down`` stops (:mod:`~spice_libvirt_lab.libvirt_daemons`).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from spice_libvirt.errors import LabError
from spice_libvirt_lab import netns
from spice_libvirt_lab.libvirt_host import LibvirtHost

SSHD = Path("/usr/sbin/sshd")
#: the host-side directory, as the host sees it (``<state>/run/sshd-lab`` from outside)
HOST_DIR = "/run/sshd-lab"
CLIENT_KEY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"

_SSHD_CONFIG = """\
# sshd of a spice-libvirt lab host: key-only root login, its files under {d}
ListenAddress {ip}
Port 22
HostKey {d}/ssh_host_ed25519_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the lab directory may lie under /tmp (world-writable), which StrictModes would refuse
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel VERBOSE
"""


def missing_tools() -> str | None:
    """Why an sshd cannot be started here (None: it can)."""
    if not SSHD.exists():
        return "sshd is not installed (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is not installed (apt-get install openssh-client)"
    return None


def _keygen(path: Path, comment: str) -> None:
    proc = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        raise LabError(f"ssh-keygen {path}: {proc.stderr.strip()}")
    path.chmod(0o600)


def client_key(ssh_dir: Path) -> Path:
    """The client's private key in ``ssh_dir`` (0700), generated once (0600)."""
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    ssh_dir.chmod(0o700)
    key = ssh_dir / CLIENT_KEY
    if not key.is_file():
        _keygen(key, "spice-libvirt-lab-client")
    return key


def host_dir(host: LibvirtHost) -> Path:
    """The host-side sshd directory as the root namespace sees it."""
    return host.state_dir / "run" / HOST_DIR.removeprefix("/run/")


def start_sshd(host: LibvirtHost, ssh_dir: Path, ip: str) -> netns.ProcRef:
    """Keys, ``known_hosts`` and an sshd on ``ip`` inside ``host``; the sshd's process.

    ``ssh_dir`` gets (or keeps) the client key and gains a ``known_hosts`` line for ``ip``:
    what an inventory needs for strict host key checking. The host must be running (its
    daemons are what ``nsenter`` enters).
    """
    if (why := missing_tools()) is not None:
        raise LabError(why)
    key = client_key(ssh_dir)
    d = host_dir(host)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    host_key = d / "ssh_host_ed25519_key"
    if not host_key.is_file():
        _keygen(host_key, f"spice-libvirt-lab-{host.config.hostname}")
    shutil.copy(key.with_suffix(".pub"), d / "authorized_keys")
    (d / "authorized_keys").chmod(0o600)
    algo, blob = (d / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    with (ssh_dir / KNOWN_HOSTS).open("a") as known:
        known.write(f"{ip} {algo} {blob}\n")
    (d / "sshd_config").write_text(_SSHD_CONFIG.format(d=HOST_DIR, ip=ip))
    # the privilege separation directory, in the host's private /run
    (host.state_dir / "run" / "sshd").mkdir(mode=0o755, exist_ok=True)
    pidfile = d / "sshd.pid"
    pidfile.unlink(missing_ok=True)
    argv = [str(SSHD), "-f", f"{HOST_DIR}/sshd_config", "-E", f"{HOST_DIR}/sshd.log"]
    proc = subprocess.run(
        host.enter_argv(argv), capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        raise LabError(f"sshd on host {host.config.name}: {proc.stderr.strip()[-500:]}")
    netns.wait_for(
        lambda: pidfile.is_file() and pidfile.read_text().strip().isdigit(),
        timeout=10,
        what=f"the sshd pid file of host {host.config.name}",
    )
    return netns.ProcRef.of(int(pidfile.read_text()), f"sshd {host.config.name}")


def log_path(host: LibvirtHost) -> Path:
    """The sshd's log (what to read when a login fails)."""
    return host_dir(host) / "sshd.log"


def proxy_command(netns_name: str) -> str:
    """An ssh ``ProxyCommand`` that reaches ``%h:%p`` from inside ``netns_name``.

    The lab's addresses exist only inside its namespaces; with this, ssh (and Ansible) run
    from the root namespace as they would on an admin's workstation. The relay is this
    package's own (:mod:`spice_libvirt_lab.netns_proxy`): no netcat needed.
    """
    argv = [sys.executable, "-m", "spice_libvirt_lab.netns_proxy", netns_name]
    return shlex.join(argv) + " %h %p"


def ssh_common_args(ssh_dir: Path, *, proxy_netns: str | None = None) -> list[str]:
    """ssh options for strict, key-only logins with the lab's files (no user config)."""
    args = [
        "-F", "/dev/null",
        "-o", f"UserKnownHostsFile={ssh_dir / KNOWN_HOSTS}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes",
    ]  # fmt: skip
    if proxy_netns is not None:
        args += ["-o", f"ProxyCommand={proxy_command(proxy_netns)}"]
    return args
