"""The Vagrant lab's own libvirtd: private config, state and socket; the machine's network.

vagrant-libvirt needs a libvirtd, and the machine's own (if any) is not ours to configure,
restart or fill with VMs, networks and volumes. So the lab starts a libvirtd of its own, in a
private *mount* namespace whose ``/etc/libvirt``, ``/run``, ``/var/lib/libvirt``,
``/var/log/libvirt`` and ``/var/cache/libvirt`` are directories of the lab (as
:mod:`spice_libvirt_lab.libvirt_host` does, minus the network namespace). It stays in the
machine's network namespace on purpose: the bridge of its lab network is then reachable from
here, which is what ``vagrant ssh``, Ansible and our SPICE client need. Vagrant reaches it
through the socket path (``qemu:///system?socket=...``).

Everything it starts inherits nice 19 and idle I/O from the start command: libvirtd, virtlogd,
dnsmasq and the VMs' QEMUs (TCG VMs are pure CPU and the machine is shared with
timing-sensitive tests). Zombies of the daemonized children are reaped by PID 1.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import textwrap
from pathlib import Path

from pydantic import BaseModel

from spice_libvirt.errors import LabError
from spice_libvirt_lab import netns
from spice_libvirt_lab.procs import run_daemonizing

#: (state sub-path, mount point) in mounting order; ``/run`` last: the lab directory may
#: itself lie under ``/run`` (the default for root does)
BIND_MOUNTS: tuple[tuple[str, str], ...] = (
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("run", "/run"),
)
#: prepended to every daemon the lab starts (children inherit both)
NICE_ARGV = ("nice", "-n", "19", "ionice", "-c3")


class PrivateLibvirtd(BaseModel):
    """A started private libvirtd (recorded in the lab state for ``down``)."""

    state_dir: Path
    libvirtd: netns.ProcRef | None = None
    virtlogd: netns.ProcRef | None = None

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """How Vagrant (ruby-libvirt), virsh and libvirt-python reach it from here."""
        return f"qemu:///system?socket={self.socket_path}"

    def alive(self) -> bool:
        return self.libvirtd is not None and self.libvirtd.alive()

    def prepare(self) -> None:
        """A fresh state directory with a config that only listens on its UNIX socket."""
        for sub in (
            "etc/hooks",
            "etc/qemu/networks/autostart",
            "etc/qemu/autostart",
            "etc/storage/autostart",
            "etc/nwfilter",
            "run/libvirt",
            "run/lock",
            "lib/qemu",
            "lib/dnsmasq",
            "lib/network",
            "log/qemu",
            "cache/qemu",
        ):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        etc = self.state_dir / "etc"
        (etc / "libvirtd.conf").write_text(
            textwrap.dedent("""\
                # spice-libvirt Vagrant lab: written by spice_libvirt_lab.vagrant_libvirtd
                listen_tls = 0
                listen_tcp = 0
                auth_unix_rw = "none"
                auth_unix_ro = "none"
                log_filters = "2:qemu 3:*"
                log_outputs = "2:file:/var/log/libvirt/libvirtd.log"
                """)
        )
        # root runs the VMs' QEMUs: the disks live in the lab directory, which is 0700
        (etc / "qemu.conf").write_text('user = "+0"\ngroup = "+0"\n')
        (etc / "virtlogd.conf").write_text("# defaults\n")

    def script(self) -> str:
        """The daemons' start in their mount namespace.

        A lab directory under ``/run`` (root's default) is hidden by the last mount, and
        libvirtd must see it (the storage pool, the VMs' serial logs): it is mounted back on
        its own path from the shell's working directory, which still reaches it (a path given
        to ``mount`` as it is, not resolved again under the new ``/run``).
        """
        q = shlex.quote
        lab = self.state_dir.parent.absolute()
        lines = ["set -e", f"cd {q(str(lab))}"]
        lines += [
            f"mount --bind {q(str(self.state_dir / src))} {q(target)}"
            for src, target in BIND_MOUNTS
        ]
        if lab.is_relative_to("/run"):
            lines += [f"mkdir -p {q(str(lab))}", f"mount --no-canonicalize --bind . {q(str(lab))}"]
        lines += [
            "virtlogd -d -p /run/libvirt/virtlogd.pid",
            "exec libvirtd -d -p /run/libvirt/libvirtd.pid",
        ]
        return "\n".join(lines) + "\n"

    def start(self, *, timeout: float = 30.0) -> None:
        """Start virtlogd and libvirtd in a new mount namespace; wait for the socket."""
        log = self.state_dir / "log" / "start.log"
        argv = [*NICE_ARGV, "unshare", "--mount", "--propagation", "private"]
        argv += ["--", "sh", "-c", self.script()]
        run_daemonizing(argv, log, "the Vagrant lab's libvirtd", timeout=timeout)
        self.virtlogd = self._from_pidfile("virtlogd", timeout)
        self.libvirtd = self._from_pidfile("libvirtd", timeout)
        netns.wait_for(
            lambda: self.socket_path.exists() and self._answers(),
            timeout=timeout,
            what="the Vagrant lab's libvirtd socket",
            interval=0.2,
        )

    def _from_pidfile(self, daemon: str, timeout: float) -> netns.ProcRef:
        pidfile = self.state_dir / "run" / "libvirt" / f"{daemon}.pid"
        netns.wait_for(
            lambda: pidfile.is_file() and pidfile.read_text().strip().isdigit(),
            timeout=timeout,
            what=str(pidfile),
        )
        return netns.ProcRef.of(int(pidfile.read_text().strip()), f"{daemon} (vagrant lab)")

    def _answers(self) -> bool:
        if self.libvirtd is not None and not self.libvirtd.alive():
            raise LabError(
                f"the Vagrant lab's libvirtd exited; see {self.state_dir}/log/libvirtd.log"
            )
        return self.virsh("uri", check=False, timeout=5.0) is not None

    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0) -> str | None:
        """``virsh -c <our socket> ARGS``: stdout, None on failure when not ``check``."""
        try:
            proc = subprocess.run(
                ["virsh", "-q", "-c", self.uri, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            if check:
                raise LabError(f"virsh {' '.join(args)}: timed out") from exc
            return None
        if proc.returncode != 0:
            if check:
                raise LabError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
            return None
        return proc.stdout

    def names(self, kind: str) -> list[str]:
        """Names of every ``domain``, ``net`` or ``pool`` it knows (running or not)."""
        command = "list" if kind == "domain" else f"{kind}-list"
        out = self.virsh(command, "--all", "--name", check=False) or ""
        return [line.strip() for line in out.splitlines() if line.strip()]

    def remove_everything(self) -> list[str]:
        """Destroy and undefine every domain, network and pool (with its volumes).

        All of it is the lab's: this libvirtd serves nobody else. Returns what was removed.
        """
        removed: list[str] = []
        for dom in self.names("domain"):
            self.virsh("destroy", dom, check=False)
            self.virsh("undefine", dom, "--remove-all-storage", "--nvram", check=False)
            removed.append(f"domain {dom}")
        for net in self.names("net"):
            self.virsh("net-destroy", net, check=False)
            self.virsh("net-undefine", net, check=False)
            removed.append(f"network {net}")
        for pool in self.names("pool"):
            vols = self.virsh("vol-list", pool, check=False) or ""
            for line in vols.splitlines():
                if line.split():
                    self.virsh("vol-delete", line.split()[0], "--pool", pool, check=False)
                    removed.append(f"volume {line.split()[0]}")
            self.virsh("pool-destroy", pool, check=False)
            self.virsh("pool-undefine", pool, check=False)
            removed.append(f"pool {pool}")
        return removed

    def remove_firewall_chains(self) -> list[str]:
        """Remove the empty ``LIBVIRT_*`` chains its network left in this network namespace.

        libvirt creates its top-level chains (and the jumps to them from INPUT, FORWARD,
        OUTPUT, POSTROUTING) on the first network start and never removes them. They are
        removed only while no other libvirtd shares this network namespace (it would own
        them) and only when empty (no network of anybody's still has rules there).
        """
        if _other_libvirtd_here(self.libvirtd):
            return []
        removed: list[str] = []
        for tool in ("iptables", "ip6tables"):
            for table in ("filter", "nat", "mangle"):
                removed += _remove_empty_chains(tool, table)
        return removed

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stop libvirtd, then virtlogd, by PID; their mount namespace goes with them."""
        targets = [r for r in (self.libvirtd, self.virtlogd) if r is not None]
        netns.terminate(targets, timeout=timeout)


def _other_libvirtd_here(ours: netns.ProcRef | None) -> bool:
    """Whether a libvirtd other than ours runs in this process's network namespace."""
    try:
        here = os.readlink("/proc/self/ns/net")
    except OSError:
        return True
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or (ours is not None and int(proc.name) == ours.pid):
            continue
        with contextlib.suppress(OSError):
            if (proc / "comm").read_text().strip() == "libvirtd" and (
                os.readlink(proc / "ns" / "net") == here
            ):
                return True
    return False


def _remove_empty_chains(tool: str, table: str) -> list[str]:
    if shutil.which(tool) is None:
        return []
    listing = subprocess.run(
        [tool, "-w", "-t", table, "-S"], capture_output=True, text=True, check=False
    )
    if listing.returncode != 0:
        return []
    lines = listing.stdout.splitlines()
    chains = [ln.split()[1] for ln in lines if ln.startswith("-N LIBVIRT_")]
    if not chains or any(ln.startswith(f"-A {c} ") for ln in lines for c in chains):
        return []  # not ours to judge: somebody's network still has rules in them
    for ln in lines:
        parts = ln.split()
        if len(parts) == 4 and parts[0] == "-A" and parts[2] == "-j" and parts[3] in chains:
            subprocess.run([tool, "-w", "-t", table, "-D", parts[1], "-j", parts[3]], check=False)
    for chain in chains:
        subprocess.run([tool, "-w", "-t", table, "-X", chain], check=False)
    return [f"{tool} {table} chain {c}" for c in chains]
