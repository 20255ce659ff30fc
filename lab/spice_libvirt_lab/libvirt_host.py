"""One lab "hypervisor host": a private libvirtd + virtlogd in their own namespaces.

A lab host is a network namespace (made by the lab) plus a mount and a UTS namespace made here
with ``unshare``. In the mount namespace the host's state directory is bind-mounted over the
paths libvirt uses, so the two lab hosts and the machine's own libvirt (if any) never see
each other's configuration, domains, sockets, logs or caches::

    <state>/etc          -> /etc/libvirt          fresh config: libvirtd.conf, qemu.conf, hooks/
    <state>/run          -> /run                  /run/libvirt/libvirt-sock, pid files
    <state>/lib          -> /var/lib/libvirt
    <state>/log          -> /var/log/libvirt      libvirtd.log, qemu/<domain>.log
    <state>/cache        -> /var/cache/libvirt    QEMU capability cache
    <state>/hosts        -> /etc/hosts            resolves the peer lab hosts by name

``/run`` is mounted last, because the state directory may lie under ``/run`` itself (the
default lab directory does). ``/run`` is replaced as a whole because ``/run/libvirt`` does not exist on a machine whose own
libvirtd never ran, and creating it in the shared ``/run`` would leave a trace (and removing it
later would unmount it under another lab's feet).

Facts the design rests on (found in the lab recipe, re-checked here):

* pid files must be private (``-p /run/libvirt/*.pid``) or they clobber the root instance's;
* each libvirtd needs its own virtlogd in the same mount namespace, started first;
* ``libvirtd -l`` with ``listen_tcp`` because there is no socket activation;
* migration refuses "the same host" unless ``host_uuid`` differs;
* the destination advertises its *hostname* for migration, so each host resolves its peers
  through the bind-mounted hosts file;
* a cold libvirtd probes QEMU for ~16 s; the capability cache can be seeded from an earlier
  run, but it records the CPUID of the CPU that probed, so libvirtd is pinned to one CPU
  (QEMU itself still gets all CPUs).

The daemons daemonize and keep the namespaces alive; they are tracked by PID and start time.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from spice_libvirt.errors import LabError, LibvirtError
from spice_libvirt_lab import netns
from spice_libvirt_lab.labdir import remove_inside
from spice_libvirt_lab.procs import run_daemonizing

#: libvirtd's default TCP port (each lab host has its own network namespace, so no clash).
LIBVIRTD_TCP_PORT = 16509
#: libvirt log filters: monitor traffic and migration steps in full (controllers and their
#: tests read them), the rest of the QEMU driver at info, everything else at warning.
LOG_FILTERS = "1:qemu.qemu_monitor 1:qemu.qemu_migration 2:qemu 3:*"
#: the same without monitor traffic, for hosts whose guests carry a SPICE ticket: libvirt
#: logs every monitor command in full, ``set_password`` with its password included
SECRET_SAFE_LOG_FILTERS = "3:qemu.qemu_monitor 1:qemu.qemu_migration 2:qemu 3:*"

#: where a host's subreaper writes its PID (inside the host's mount namespace)
REAPER_PIDFILE = "/run/libvirt/reaper.pid"

#: (state sub-path, mount point) in mounting order; ``/run`` last (see namespace_script).
BIND_MOUNTS: tuple[tuple[str, str], ...] = (
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("hosts", "/etc/hosts"),
    ("run", "/run"),
)

try:  # libvirt-python prints every error to stderr by default; we raise them instead
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
except ImportError:  # pragma: no cover - reported when a host is opened
    libvirt = None


def require_libvirt() -> Any:
    """The ``libvirt`` module, or a clear :class:`LabError` saying how to get it."""
    if libvirt is None:
        raise LabError("libvirt-python is not installed: pip install 'spice-libvirt[libvirt]'")
    return libvirt


def call_with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run a blocking libvirt call in a thread so that every wait has a bound."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LabError(f"{what}: timed out after {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def libvirt_error(exc: BaseException, what: str) -> LibvirtError:
    lv = require_libvirt()
    if isinstance(exc, lv.libvirtError):
        return LibvirtError(f"{what}: {exc.get_error_message()}")
    return LibvirtError(f"{what}: {exc}")


#: A TLS lab host's qemu.conf ``migrate_tls_x509_cert_dir`` (inside its mount namespace):
#: the lab CA and one host certificate good for both ends of a migration (server and
#: client pairs), as ``VIR_MIGRATE_TLS`` needs on a host that migrates both ways.
MIGRATE_TLS_DIR = "/etc/libvirt/migrate-tls"


class HostConfig(BaseModel):
    """Everything that makes one lab host what it is."""

    name: str  # "A"
    hostname: str  # "hostA", the UTS hostname the peers resolve
    netns: str
    ip: str
    host_uuid: str
    state_dir: Path
    #: hostname -> address, written to the host's /etc/hosts
    hosts: dict[str, str]
    #: CPU libvirtd is pinned to (see the module docstring); None: not pinned
    pin_cpu: int | None = 0
    #: a capability cache directory to seed /var/cache/libvirt/qemu/capabilities from
    caps_seed: Path | None = None
    #: qemu.conf ``spice_tls = 1`` with its certificates in ``spice_tls_dir`` (inside the
    #: host's mount namespace); None: no TLS
    spice_tls_dir: str | None = None
    #: libvirtd's log_filters (:data:`SECRET_SAFE_LOG_FILTERS` when a ticket is used)
    log_filters: str = LOG_FILTERS


class HostRuntime(BaseModel):
    """What was started for a host: recorded in the lab state file for ``down``."""

    libvirtd: netns.ProcRef | None = None
    virtlogd: netns.ProcRef | None = None
    #: the subreaper above libvirtd (:mod:`~spice_libvirt_lab.reaper`)
    reaper: netns.ProcRef | None = None


class LibvirtHost:
    """Prepare, start, enter and stop one lab host's daemons."""

    def __init__(self, config: HostConfig, runtime: HostRuntime | None = None) -> None:
        self.config = config
        self.runtime = runtime or HostRuntime()

    # ------------------------------------------------------------------ paths and URIs

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def etc_dir(self) -> Path:
        """The host's private /etc/libvirt (hooks go to ``etc_dir / "hooks"``)."""
        return self.state_dir / "etc"

    @property
    def run_dir(self) -> Path:
        """The host's private /run/libvirt."""
        return self.state_dir / "run" / "libvirt"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def caps_dir(self) -> Path:
        return self.state_dir / "cache" / "qemu" / "capabilities"

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "libvirt-sock"

    @property
    def uri_unix(self) -> str:
        """Reaches this host's libvirtd from the root namespace (or any namespace)."""
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def uri_tcp(self) -> str:
        """Reaches this host's libvirtd from the peer host (and from the client namespace)."""
        return f"qemu+tcp://{self.config.hostname}/system"

    # ------------------------------------------------------------------ preparation

    def prepare(self) -> None:
        """Write a fresh private state directory: config, hosts file, empty runtime dirs."""
        cfg = self.config
        if self.state_dir.exists():
            remove_inside(self.state_dir.parent, self.state_dir)
        for sub in (
            "etc/hooks",
            "etc/qemu/networks/autostart",
            "etc/qemu/autostart",
            "etc/nwfilter",
            "run/libvirt",
            "run/lock",
            "lib/qemu",
            "lib/images",
            "log/qemu",
            "cache/qemu",
        ):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.etc_dir / "libvirtd.conf").write_text(
            textwrap.dedent(f"""\
                # spice-libvirt lab host {cfg.name}: written by spice_libvirt_lab.libvirt_host
                listen_tls = 0
                listen_tcp = 1
                listen_addr = "{cfg.ip}"
                tcp_port = "{LIBVIRTD_TCP_PORT}"
                auth_tcp = "none"
                auth_unix_rw = "none"
                auth_unix_ro = "none"
                host_uuid = "{cfg.host_uuid}"
                log_filters = "{cfg.log_filters}"
                log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
                """)
        )
        qemu_conf = textwrap.dedent(f"""\
            # spice-libvirt lab host {cfg.name}: root may open /dev/kvm; SPICE and
            # incoming migration listen on this host's lab address only
            user = "+0"
            group = "+0"
            spice_listen = "{cfg.ip}"
            migration_address = "{cfg.ip}"
            """)
        if cfg.spice_tls_dir is not None:
            # what a manager (oVirt) sets: SPICE TLS with this host's own certificate;
            # the destination's libvirt puts its subject into the migration cookie
            qemu_conf += textwrap.dedent(f"""\
                spice_tls = 1
                spice_tls_x509_cert_dir = "{cfg.spice_tls_dir}"
                migrate_tls_x509_cert_dir = "{MIGRATE_TLS_DIR}"
                """)
        (self.etc_dir / "qemu.conf").write_text(qemu_conf)
        (self.etc_dir / "virtlogd.conf").write_text("# defaults\n")
        (self.state_dir / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for h, ip in cfg.hosts.items())
        )
        if cfg.caps_seed is not None and cfg.caps_seed.is_dir():
            shutil.copytree(cfg.caps_seed, self.caps_dir)

    # ------------------------------------------------------------------ start / stop

    def namespace_script(self) -> str:
        """The shell script that sets up the host's mount namespace and starts its daemons.

        ``/run`` is mounted last: the state directory may itself lie under ``/run`` (the
        default lab directory does), and once ``/run`` is replaced the other sources would
        no longer be found ("special device ... does not exist"). Every path is quoted.
        """
        q = shlex.quote
        s = self.state_dir.absolute()
        binds = [(s / src, target) for src, target in BIND_MOUNTS]
        lines = ["set -e", f"hostname {q(self.config.hostname)}"]
        lines += [f"mount --bind {q(str(src))} {q(target)}" for src, target in binds]
        lines += [
            "virtlogd -d -p /run/libvirt/virtlogd.pid",
            f"exec {shlex.join(self._libvirtd_argv())}",
        ]
        return "\n".join(lines) + "\n"

    def _libvirtd_argv(self) -> list[str]:
        """libvirtd, daemonizing under the host's subreaper (its QEMUs reaped at once)."""
        argv = ["libvirtd", "-d", "-l", "-p", "/run/libvirt/libvirtd.pid"]
        if self.config.pin_cpu is not None:
            argv = ["taskset", "-c", str(self.config.pin_cpu), *argv]
        reaper = [sys.executable, "-I", "-m", "spice_libvirt_lab.reaper", REAPER_PIDFILE, "--"]
        return [*reaper, *argv]

    def start(self, *, timeout: float = 20.0) -> HostRuntime:
        """Create the mount/UTS namespaces, start virtlogd then libvirtd; wait for the socket."""
        script = self.namespace_script()
        argv = netns.exec_argv(
            self.config.netns,
            ["unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-c", script],
        )
        self._run_daemonizing(argv, timeout=timeout)
        self.runtime.virtlogd = self._ref_from_pidfile("virtlogd", timeout)
        self.runtime.libvirtd = self._ref_from_pidfile("libvirtd", timeout)
        self.runtime.reaper = self._ref_from_pidfile("reaper", timeout)
        self.wait_ready(timeout=timeout)
        return self.runtime

    def _run_daemonizing(self, argv: list[str], *, timeout: float) -> None:
        run_daemonizing(
            argv, self.log_dir / "start.log", f"host {self.config.name}", timeout=timeout
        )

    def _ref_from_pidfile(self, daemon: str, timeout: float) -> netns.ProcRef:
        pidfile = self.run_dir / f"{daemon}.pid"
        netns.wait_for(
            lambda: pidfile.is_file() and pidfile.read_text().strip().isdigit(),
            timeout=timeout,
            what=f"{pidfile}",
        )
        return netns.ProcRef.of(int(pidfile.read_text().strip()), f"{daemon} {self.config.name}")

    def wait_ready(self, *, timeout: float = 20.0) -> None:
        """Wait until libvirtd answers on its UNIX socket (its TCP listener opens before)."""
        lv = require_libvirt()

        def answers() -> bool:
            ref = self.runtime.libvirtd
            if ref is not None and not ref.alive():
                raise LabError(
                    f"libvirtd of host {self.config.name} exited; see {self.log_dir}/libvirtd.log"
                )
            if not self.socket_path.exists():
                return False
            try:
                conn = lv.open(self.uri_unix)
            except lv.libvirtError:
                return False
            conn.close()
            return True

        netns.wait_for(answers, timeout=timeout, what=f"libvirtd of host {self.config.name}")

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop libvirtd, then virtlogd, by PID (SIGTERM, SIGKILL after ``timeout``)."""
        daemons = (self.runtime.libvirtd, self.runtime.virtlogd, self.runtime.reaper)
        netns.terminate([r for r in daemons if r is not None], timeout=timeout)

    def restart_libvirtd(self, *, timeout: float = 20.0) -> None:
        """Restart only libvirtd (e.g. after installing a hook), in the same namespaces.

        virtlogd keeps the mount namespace alive meanwhile; the new libvirtd is started inside
        it with ``nsenter``.
        """
        anchor = self.runtime.virtlogd
        if anchor is None or not anchor.alive():
            raise LabError(f"host {self.config.name}: virtlogd is not running, cannot restart")
        if self.runtime.libvirtd is not None:
            netns.terminate([self.runtime.libvirtd], timeout=timeout)
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "libvirtd.pid").unlink()
        argv = ["nsenter", "-t", str(anchor.pid), "-n", "-m", "-u", "--", *self._libvirtd_argv()]
        self._run_daemonizing(argv, timeout=timeout)
        self.runtime.libvirtd = self._ref_from_pidfile("libvirtd", timeout)
        self.runtime.reaper = self._ref_from_pidfile("reaper", timeout)
        self.wait_ready(timeout=timeout)

    # ------------------------------------------------------------------ using the host

    def enter_argv(self, argv: list[str]) -> list[str]:
        """The argv that runs ``argv`` inside this host (network, mount and UTS namespaces).

        ``nsenter -m`` starts in ``/``: give absolute paths.
        """
        for ref in (self.runtime.libvirtd, self.runtime.virtlogd):
            if ref is not None and ref.alive():
                return ["nsenter", "-t", str(ref.pid), "-n", "-m", "-u", "--", *argv]
        raise LabError(f"host {self.config.name} has no running daemon to enter")

    def run(self, argv: list[str], *, timeout: float = 30.0) -> str:
        """Run a command inside this host (``virsh ...``); its stdout, or :class:`LabError`."""
        try:
            proc = subprocess.run(
                self.enter_argv(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"host {self.config.name}: {argv[0]} timed out") from exc
        if proc.returncode != 0:
            raise LabError(f"host {self.config.name}: {' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    def open(self) -> Any:
        """A libvirt connection to this host over its UNIX socket (caller closes it)."""
        lv = require_libvirt()
        try:
            return lv.open(self.uri_unix)
        except lv.libvirtError as exc:
            raise LibvirtError(f"host {self.config.name}: {exc.get_error_message()}") from exc

    def caps_ready(self) -> bool:
        """Whether libvirtd has written its QEMU capability cache (probing done)."""
        return self.caps_dir.is_dir() and any(self.caps_dir.glob("*.xml"))

    def harvest_caps(self, gold: Path) -> bool:
        """Keep this host's capability cache as the seed for later labs, if none exists yet.

        Written to a temporary name and renamed, so concurrent labs never see half a cache.
        """
        if gold.exists() or not self.caps_ready():
            return False
        gold.parent.mkdir(parents=True, exist_ok=True)
        tmp = gold.with_name(f"{gold.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
        shutil.copytree(self.caps_dir, tmp)
        try:
            tmp.rename(gold)
        except OSError:  # another lab was faster: its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True
