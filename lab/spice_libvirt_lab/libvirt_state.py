"""The libvirt lab's state: what a lab consists of, written down before it is started.

``<lab dir>/state.json`` grows as :func:`spice_libvirt_lab.libvirt_lab.up` builds the lab,
so ``down`` can always finish the job, also after a crash that left half the daemons behind.
The models here are also what ``lab status --json`` and ``lab down --json`` print.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from spice_libvirt.errors import LabError
from spice_libvirt_lab import delaybridge, netns
from spice_libvirt_lab.labdir import check_private_dir, ensure_private_dir, libvirt_lab_dir
from spice_libvirt_lab.libvirt_host import HostConfig, HostRuntime, LibvirtHost
from spice_libvirt_lab.memcheck import MemcheckOptions
from spice_libvirt_lab.netns import ProcRef
from spice_libvirt_lab.procs import exclusive_lock

HostName = Literal["A", "B"]
GuestKind = Literal["firmware", "linux", "memcheck"]
TlsMode = Literal["secure", "mixed", "tls-only"]

HOSTS: tuple[HostName, HostName] = ("A", "B")
#: How long the linux guest may take to print GUEST-READY (TCG on a busy 2-CPU machine).
LINUX_BOOT_TIMEOUT = 90.0
#: How long a memcheck guest may take to fill its working set (a fleet starting at once,
#: or this machine's nested KVM, where one MiB takes seconds).
MEMCHECK_READY_TIMEOUT = 180.0
DEFAULT_DOMAIN = "labvm"
#: The spiceport channel name, the same one the linux guest streams its records into.
PORT_CHANNEL = "org.spice-libvirt.stream"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
#: The guest's SPICE ports when the lab runs TLS: fixed (each host has its own network
#: namespace, so they never clash), so that the graphics URI can name the destination's
#: ``tlsPort`` before its QEMU exists -- autoport would pick it only in Prepare.
TLS_LAB_PORT = 5900
TLS_LAB_TLS_PORT = 5901
#: Where each host's private qemu.conf points ``spice_tls_x509_cert_dir`` (inside the
#: host's mount namespace: ``<state>/etc/spice-tls``).
SPICE_TLS_DIR = "/etc/libvirt/spice-tls"


def default_lab_dir() -> Path:
    """The libvirt lab's directory: ``<the one default lab directory>/libvirt``."""
    return libvirt_lab_dir()


def default_caps_seed(pin_cpu: int = 0) -> Path:
    """Where a pinned libvirtd's QEMU capability cache is kept between labs."""
    explicit = os.environ.get("SPICE_LIBVIRT_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = (
        Path(explicit)
        if explicit
        else (Path(xdg) if xdg else Path.home() / ".cache") / "spice-libvirt"
    )
    return root / f"libvirt-qemu-caps-cpu{pin_cpu}"


# --------------------------------------------------------------------------- state models


class HostState(BaseModel):
    config: HostConfig
    runtime: HostRuntime = Field(default_factory=HostRuntime)
    uri_unix: str
    uri_tcp: str


class ClientState(BaseModel):
    netns: str
    ip: str
    hostname: str = "client"


class BridgeState(BaseModel):
    netns: str
    proc: ProcRef | None = None
    control: Path
    log: Path
    rtt_ms: float


class Timings(BaseModel):
    network_s: float | None = None
    daemons_ready_s: float | None = None
    domain_running_s: float | None = None
    #: linux: until its /init printed GUEST-READY; memcheck: until every guest filled its
    #: working set
    guest_ready_s: float | None = None
    caps_seeded: bool = False
    caps_harvested: bool = False


class LabTlsState(BaseModel):
    """SPICE over TLS as a manager sets it up: one CA, a certificate per host.

    ``mode``: ``secure`` -- the graphics in ``defaultMode='secure'``, every channel refuses
    plain text (the plain port stays, answering NEED_SECURED: it is what lets spice-gtk
    pre-link a migration without ever going plain); ``mixed`` -- only main, inputs and
    cursor secure, the other channels as the client chooses; ``tls-only`` -- secure and
    no plain port at all (what libvirt 9.0 gives ``defaultMode='secure'`` with autoport).
    libvirt then sends ``client_migrate_info`` with ``port: 0`` (not -1 as QEMU makes of
    an omitted port), which spice-gtk 0.42 takes as "no plain port" and pre-links on TLS:
    seamless too (measured; the QEMU path's -1 arrives as 65535 and costs the pre-link).
    """

    mode: TlsMode = "secure"
    #: the lab CA (root-namespace paths; the key never leaves this directory)
    ca_dir: Path
    ca_cert: Path
    #: host -> the subject its certificate carries ("O=lab,CN=hostA"), in certificate
    #: order (what spice-gtk's --spice-host-subject and libvirt's tlsSubject compare)
    subjects: dict[str, str]
    #: None: no plain port (``tls-only``)
    port: int | None = TLS_LAB_PORT
    tls_port: int = TLS_LAB_TLS_PORT


class LabProcess(BaseModel):
    """A process the lab started besides the hosts' own libvirtd and virtlogd.

    Per-host daemons (an sshd for Ansible; an agent) run inside a host (``where`` "A" or
    "B"); the domains' SPICE clients run in the client namespace (``where`` "C"). ``lab
    down`` stops each by PID (checked against its start time), ``lab status`` lists them.
    """

    where: str
    what: str
    proc: ProcRef
    log: Path | None = None
    #: a client: the domain it is connected to
    domain: str | None = None
    #: where it listens or what it is connected to ("10.251.7.1:22" for an sshd, an agent's
    #: metrics endpoint, a client's SPICE URI)
    address: str | None = None


class LabState(BaseModel):
    """Everything a lab consists of; written to ``<lab_dir>/state.json`` as it grows."""

    kind: Literal["libvirt"] = "libvirt"
    id: str
    prefix: str
    lab_dir: Path
    run_dir: Path
    subnet: str
    created_at: str
    phase: Literal["starting", "up"] = "starting"
    namespaces: list[str]
    switch_netns: str
    hosts: dict[str, HostState]
    client: ClientState
    bridge: BridgeState
    guest: GuestKind = "firmware"
    #: the memcheck guests' options (every domain of the lab runs the same)
    memcheck: MemcheckOptions | None = None
    domain: str = DEFAULT_DOMAIN
    domain_xml: Path
    #: None: SPICE in plain text only (no spice_tls on the hosts)
    tls: LabTlsState | None = None
    #: the file the SPICE ticket is read from (never the ticket itself); None: no ticket
    ticket_file: Path | None = None
    active_host: HostName | None = None
    migrations: int = 0
    timings: Timings = Field(default_factory=Timings)
    #: the guests besides ``domain`` (``lab up --domains N``: ``<domain>-1`` ...)
    extra_domains: list[str] = Field(default_factory=list)
    #: per-host daemons (sshd, agents): stopped by PID on ``down``
    daemons: list[LabProcess] = Field(default_factory=list)
    #: one SPICE client per domain in the client namespace (``--domains N``)
    clients: list[LabProcess] = Field(default_factory=list)
    #: the Ansible inventory of the hosts (reached over each host's sshd); None: no sshd
    ansible_inventory: Path | None = None
    notes: list[str] = Field(default_factory=list)

    @property
    def all_domains(self) -> list[str]:
        return [self.domain, *self.extra_domains]

    def host(self, name: str) -> LibvirtHost:
        h = self.hosts[name]
        return LibvirtHost(h.config, h.runtime)


class SpiceEndpoint(BaseModel):
    host: HostName
    address: str
    #: None: the graphics have no plain port
    port: int | None
    uri: str
    tls_port: int | None = None
    #: the subject the host's certificate carries (TLS labs)
    subject: str | None = None


class HostStatus(BaseModel):
    name: HostName
    hostname: str
    ip: str
    netns: str
    libvirtd_pid: int | None
    libvirtd_alive: bool
    virtlogd_pid: int | None
    virtlogd_alive: bool
    host_uuid: str | None = Field(description="the UUID libvirtd reports (None: unreachable)")
    uri_unix: str
    uri_tcp: str
    domains: dict[str, str] = Field(default_factory=dict, description="name -> state")
    error: str | None = None


class ProcessStatus(LabProcess):
    """A lab process as ``lab status`` shows it: what was recorded, and whether it runs."""

    alive: bool


class LabStatus(BaseModel):
    running: bool
    id: str | None = None
    lab_dir: Path
    phase: str | None = None
    healthy: bool = False
    hosts: list[HostStatus] = Field(default_factory=list)
    domain: str | None = None
    active_host: HostName | None = None
    spice: SpiceEndpoint | None = None
    client_netns: str | None = None
    client_rtt_ms: float | None = None
    bridge_alive: bool = False
    bridge: delaybridge.BridgeStats | None = None
    namespaces_missing: list[str] = Field(default_factory=list)
    migrations: int = 0
    timings: Timings | None = None
    domains: list[str] = Field(default_factory=list)
    daemons: list[ProcessStatus] = Field(default_factory=list)
    clients: list[ProcessStatus] = Field(default_factory=list)
    ansible_inventory: Path | None = None


class MigrationResult(BaseModel):
    """The outcome of one lab migration (the plain libvirt p2p one, or a plugged-in one)."""

    domain: str
    source: HostName
    destination: HostName
    method: str = "libvirt-p2p"
    ok: bool
    wall_s: float
    spice_before: SpiceEndpoint | None = None
    spice_after: SpiceEndpoint | None = None
    error: str | None = None
    #: whatever a plugged-in migrator wants to report (the controller's verdict)
    detail: dict[str, Any] = Field(default_factory=dict)


class RttProbe(BaseModel):
    target: str
    samples_ms: list[float]
    median_ms: float
    min_ms: float
    max_ms: float


class DownReport(BaseModel):
    found: bool
    id: str | None = None
    stopped: list[str] = Field(default_factory=list, description="what was ended, by PID")
    swept_pids: list[int] = Field(default_factory=list, description="leftovers ended by netns")
    namespaces_deleted: list[str] = Field(default_factory=list)
    leftovers: list[str] = Field(default_factory=list, description="anything that survived")


#: A migration implementation: (state, source, destination, timeout) -> result.
Migrator = Callable[[LabState, HostName, HostName, float], MigrationResult]


# --------------------------------------------------------------------------- state file


def locked(lab_dir: Path, timeout: float = 60.0) -> contextlib.AbstractContextManager[None]:
    """Serialise up/down/migrate of one lab directory between processes.

    The directory is created private first (see :mod:`spice_libvirt_lab.labdir`).
    """
    ensure_private_dir(lab_dir)
    return exclusive_lock(
        lab_dir / LOCK_FILE, timeout, f"lab {lab_dir} is busy (another lab command runs)", poll=0.1
    )


def save(state: LabState) -> None:
    path = state.lab_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(path)


def load_state(lab_dir: Path | None = None) -> LabState | None:
    """The recorded lab in ``lab_dir``, or ``None`` if there is none."""
    directory = check_private_dir(lab_dir or default_lab_dir())
    path = directory / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LabState.model_validate_json(text)
    except ValueError as exc:
        raise LabError(f"lab state file {path} is unreadable: {exc}") from exc


def recorded_processes(state: LabState) -> list[netns.ProcRef]:
    """Every process the lab started and recorded: the delay bridge, each host's libvirtd,
    virtlogd and their subreaper, the per-host daemons (sshd, agents) and the clients."""
    refs = [state.bridge.proc] + [
        r
        for h in state.hosts.values()
        for r in (h.runtime.libvirtd, h.runtime.virtlogd, h.runtime.reaper)
    ]
    found = [r for r in refs if r is not None]
    return found + [p.proc for p in (*state.daemons, *state.clients)]


def anything_alive(state: LabState) -> list[str]:
    alive = [n for n in state.namespaces if netns.exists(n)]
    alive += [f"{r.what} pid {r.pid}" for r in recorded_processes(state) if r.alive()]
    return alive


#: what a lab report says when the lab allowed the monitor passthrough
LAB_TAINT_NOTE = (
    "the lab allows the monitor passthrough (allow_taint) for its near-empty firmware guest, "
    "which libvirt's speed and downtime floors cannot hold (it moves in ~1.4 s at the floor)"
)


def lab_allows_taint(state: LabState) -> bool:
    """The labs allow the monitor passthrough for their firmware guests only; every other
    guest is held taint-free, as on a production host."""
    return state.guest == "firmware"
