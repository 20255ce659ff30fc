"""The two-host libvirt lab: hosts A and B with their own libvirtd, a client C behind a delay.

``up`` builds, on one machine, what a real deployment has on three: two hypervisor hosts that
live-migrate a SPICE guest to each other over TCP, and a client whose link has a chosen
round-trip time. Everything lives in network namespaces named ``<prefix><role>`` (prefix
``slab`` + 6 hex digits, unique per lab) and in a private /24 (``10.251.X.0/24``) that exists
only inside them::

      [A  hostA .1] ----\\
                         br0 [<prefix>sw] ---- w [<prefix>D: delay bridge] c ---- [C client .3]
      [B  hostB .2] ----/

* A and B each run a private libvirtd + virtlogd (:mod:`~spice_libvirt.lab.libvirt_host`) with
  distinct host UUIDs, listening on TCP so a peer-to-peer migration goes A -> B directly;
* D runs :mod:`~spice_libvirt.lab.delaybridge`, which delays the client's frames by RTT/2
  each way (this kernel has no netem); the A <-> B link is not delayed;
* C is where SPICE clients run (``ip netns exec <prefix>C remote-viewer spice://hostA:5900``
  resolves the lab names through ``/etc/netns/<prefix>C/hosts``; in-process clients use
  :func:`spice_libvirt.lab.netns.socket_in`).

Everything started is written to a state file *before* it is started, so ``down`` can always
finish the job, also after a crash that left the state file and half the daemons behind.
``down`` ends processes by recorded PID (checked against their start time) and then whatever
still lives in the lab's namespaces, deletes the namespaces, and leaves no mount behind (the
private mount namespaces die with their last process).

The lab is driven from the root namespace: each host's libvirtd is reached through its UNIX
socket (``qemu+unix:///system?socket=<state>/A/run/libvirt/libvirt-sock``); the migration
itself is libvirt's peer-to-peer mode, where A's libvirtd talks to
``qemu+tcp://hostB/system``. The seamless controller plugs in through the ``migrator``
argument of :func:`migrate`.

``python -m spice_libvirt.lab.libvirt_lab up|migrate|status|rtt|down`` drives it by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import statistics
import string
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape as xml_escape

from pydantic import BaseModel, Field

from spice_libvirt import errors
from spice_libvirt.errors import ConfigError, LabError, LibvirtError, MigrationError
from spice_libvirt.exitcodes import for_error
from spice_libvirt.lab import delaybridge, netns
from spice_libvirt.lab.libvirt_host import (
    LIBVIRTD_TCP_PORT,
    HostConfig,
    HostRuntime,
    LibvirtHost,
    require_libvirt,
)
from spice_libvirt.lab.netns import ProcRef
from spice_libvirt.lab.procs import exclusive_lock

HostName = Literal["A", "B"]
GuestKind = Literal["firmware", "linux"]

HOSTS: tuple[HostName, HostName] = ("A", "B")
TEMPLATE = Path(__file__).with_name("templates") / "domain.xml"
TEMPLATE_LINUX = TEMPLATE.with_name("domain-linux.xml")
#: How long the linux guest may take to print GUEST-READY (TCG on a busy 2-CPU machine).
LINUX_BOOT_TIMEOUT = 90.0
DEFAULT_DOMAIN = "labvm"
#: The spiceport channel name, the same one the linux guest streams its records into.
PORT_CHANNEL = "org.spice-libvirt.stream"
STATE_FILE = "state.json"
LOCK_FILE = "lock"


def default_lab_dir() -> Path:
    """``$SPICE_LIBVIRT_LAB_DIR/libvirt``, else ``/run/spice-libvirt/lab/libvirt``.

    Under ``/run`` because nothing of a lab survives a reboot: neither can its state.
    """
    base = os.environ.get("SPICE_LIBVIRT_LAB_DIR")
    return (Path(base) if base else Path("/run/spice-libvirt/lab")) / "libvirt"


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
    #: linux guest only: until its /init printed GUEST-READY
    guest_ready_s: float | None = None
    caps_seeded: bool = False
    caps_harvested: bool = False


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
    domain: str = DEFAULT_DOMAIN
    domain_xml: Path
    active_host: HostName | None = None
    migrations: int = 0
    timings: Timings = Field(default_factory=Timings)

    def host(self, name: str) -> LibvirtHost:
        h = self.hosts[name]
        return LibvirtHost(h.config, h.runtime)


class SpiceEndpoint(BaseModel):
    host: HostName
    address: str
    port: int
    uri: str


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


def _locked(lab_dir: Path, timeout: float = 60.0) -> contextlib.AbstractContextManager[None]:
    """Serialise up/down/migrate of one lab directory between processes."""
    return exclusive_lock(
        lab_dir / LOCK_FILE, timeout, f"lab {lab_dir} is busy (another lab command runs)", poll=0.1
    )


def _save(state: LabState) -> None:
    path = state.lab_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(path)


def load_state(lab_dir: Path | None = None) -> LabState | None:
    """The recorded lab in ``lab_dir``, or ``None`` if there is none."""
    path = (lab_dir or default_lab_dir()) / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LabState.model_validate_json(text)
    except ValueError as exc:
        raise LabError(f"lab state file {path} is unreadable: {exc}") from exc


def _anything_alive(state: LabState) -> list[str]:
    alive = [n for n in state.namespaces if netns.exists(n)]
    refs = [state.bridge.proc] + [
        r for h in state.hosts.values() for r in (h.runtime.libvirtd, h.runtime.virtlogd)
    ]
    alive += [f"{r.what} pid {r.pid}" for r in refs if r is not None and r.alive()]
    return alive


# --------------------------------------------------------------------------- up


def _new_state(lab_dir: Path, rtt_ms: float, guest: GuestKind, domain: str) -> LabState:
    lab_id = secrets.token_hex(3)
    prefix = f"slab{lab_id}"
    subnet_octet = int(lab_id[:2], 16) % 250 + 1
    net = f"10.251.{subnet_octet}"
    run_dir = lab_dir / f"run-{lab_id}"
    names = {role: f"{prefix}{role}" for role in ("A", "B", "C", "D", "sw")}
    peers = {"hostA": f"{net}.1", "hostB": f"{net}.2", "client": f"{net}.3"}
    seed = default_caps_seed(0)
    hosts: dict[str, HostState] = {}
    for i, name in enumerate(HOSTS, start=1):
        cfg = HostConfig(
            name=name,
            hostname=f"host{name}",
            netns=names[name],
            ip=f"{net}.{i}",
            host_uuid=str(uuid.uuid4()),
            state_dir=run_dir / name,
            hosts=peers,
            pin_cpu=0,
            caps_seed=seed if seed.is_dir() else None,
        )
        h = LibvirtHost(cfg)
        hosts[name] = HostState(config=cfg, uri_unix=h.uri_unix, uri_tcp=h.uri_tcp)
    return LabState(
        id=lab_id,
        prefix=prefix,
        lab_dir=lab_dir,
        run_dir=run_dir,
        subnet=f"{net}.0/24",
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        namespaces=[names[r] for r in ("sw", "A", "B", "D", "C")],
        switch_netns=names["sw"],
        hosts=hosts,
        client=ClientState(netns=names["C"], ip=peers["client"]),
        bridge=BridgeState(
            netns=names["D"],
            control=run_dir / "bridge.ctl",
            log=run_dir / "bridge.log",
            rtt_ms=rtt_ms,
        ),
        guest=guest,
        domain=domain,
        domain_xml=run_dir / "domain.xml",
        timings=Timings(caps_seeded=seed.is_dir()),
    )


def _build_network(state: LabState) -> None:
    sw, c, d = state.switch_netns, state.client.netns, state.bridge.netns
    for name in state.namespaces:
        netns.add(name)
    netns.add_bridge(sw, "br0")
    prefix_len = state.subnet.split("/")[1]
    for name in HOSTS:
        h = state.hosts[name].config
        netns.add_veth(sw, f"p{name}", h.netns, "eth0")
        netns.link_up(sw, f"p{name}", master="br0")
        netns.add_address(h.netns, "eth0", f"{h.ip}/{prefix_len}")
    netns.add_veth(sw, "pC", d, "w")
    netns.link_up(sw, "pC", master="br0")
    netns.add_veth(d, "c", c, "eth0")
    netns.link_up(d, "w", promisc=True)
    netns.link_up(d, "c", promisc=True)
    netns.add_address(c, "eth0", f"{state.client.ip}/{prefix_len}")
    hosts = state.hosts["A"].config.hosts
    netns.write_etc_file(
        c, "hosts", "127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in hosts.items())
    )


def render_domain_xml(
    *,
    name: str = DEFAULT_DOMAIN,
    memory_mib: int = 256,
    guest: GuestKind = "firmware",
    emulator: str = "/usr/bin/qemu-system-x86_64",
    machine: str = "pc",
    port_name: str = PORT_CHANNEL,
) -> str:
    """The lab guest's domain XML from :data:`TEMPLATE` (firmware) or :data:`TEMPLATE_LINUX`.

    The linux guest's kernel and initrd come from :mod:`spice_libvirt.lab.guest` (built into
    its cache on first use), and so does the accelerator choice: TCG unless
    ``SPICE_LIBVIRT_LINUX_ACCEL`` says otherwise, because this machine's nested KVM boots a
    Linux kernel about 100 times too slowly. The firmware guest uses KVM when ``/dev/kvm``
    is usable, with QEMU's default CPU model: ``host-model`` made QEMU abort here on MSR
    0x10a (arch-capabilities) under the nested ``kvm_pvm``.
    """
    if not 64 <= memory_mib <= 16384:
        raise ConfigError(f"memory must be between 64 and 16384 MiB, not {memory_mib}")
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise ConfigError(f"invalid domain name {name!r}")
    if not port_name or not all(ch.isalnum() or ch in "-_." for ch in port_name):
        raise ConfigError(f"invalid port channel name {port_name!r}")
    common = {
        "name": name,
        "memory_mib": memory_mib,
        "emulator": xml_escape(emulator, {"'": "&apos;"}),
        "machine": machine,
        "port_name": port_name,
    }
    if guest == "firmware":
        kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
        text = string.Template(TEMPLATE.read_text()).substitute(
            common, domain_type="kvm" if kvm else "qemu"
        )
    elif guest == "linux":
        from spice_libvirt.lab import guest as guest_images

        images = guest_images.ensure_linux_guest()
        accel = guest_images.default_accel("linux")
        cpu = (
            "<cpu mode='host-passthrough' migratable='on'>"
            "<feature policy='disable' name='arch-capabilities'/></cpu>"
            if accel == "kvm"
            else "<cpu mode='maximum' migratable='on'/>"
        )
        text = string.Template(TEMPLATE_LINUX.read_text()).substitute(
            common,
            domain_type="kvm" if accel == "kvm" else "qemu",
            kernel=xml_escape(str(images.kernel)),
            initrd=xml_escape(str(images.initrd)),
            cmdline=f"console=ttyS0 quiet panic=-1 portname={port_name}",
            cpu=cpu,
        )
    else:
        raise ConfigError(f"unknown guest {guest!r}: firmware or linux")
    ET.fromstring(text)  # a template that renders to invalid XML is a bug: fail here
    return text


def serial_log(state: LabState, host: HostName) -> Path:
    """The linux guest's console log while it runs on ``host`` (root-namespace path)."""
    return state.hosts[host].config.state_dir / "log" / "qemu" / f"{state.domain}-serial.log"


def _check_links(state: LabState) -> None:
    """Each host reaches the other's libvirtd over TCP, and C reaches both hosts."""
    for src, dst in (("A", "B"), ("B", "A")):
        ip = state.hosts[dst].config.ip
        netns.tcp_connect_ms(state.hosts[src].config.netns, ip, LIBVIRTD_TCP_PORT, timeout=5.0)
    for name in HOSTS:
        ip = state.hosts[name].config.ip
        netns.tcp_connect_ms(state.client.netns, ip, LIBVIRTD_TCP_PORT, timeout=10.0)


def _call_with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
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


def _libvirt_error(exc: BaseException, what: str) -> LibvirtError:
    lv = require_libvirt()
    if isinstance(exc, lv.libvirtError):
        return LibvirtError(f"{what}: {exc.get_error_message()}")
    return LibvirtError(f"{what}: {exc}")


def up(
    lab_dir: Path | None = None,
    *,
    client_rtt_ms: float = 0.0,
    guest: GuestKind = "firmware",
    memory_mib: int = 256,
    domain: str = DEFAULT_DOMAIN,
    timeout: float = 120.0,
    before_start: Callable[[LibvirtHost], None] | None = None,
) -> LabState:
    """Build the lab and start the guest on host A; return the recorded state.

    ``before_start`` is called with each prepared host before its daemons start (to install
    a hook into ``host.etc_dir / "hooks"``). Raises :class:`LabError` if a lab already runs in
    ``lab_dir``; a stale state file (nothing of it alive) is cleaned up first. If building
    fails, everything built so far is torn down again before the error is raised.
    """
    require_libvirt()
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    xml = render_domain_xml(name=domain, memory_mib=memory_mib, guest=guest)
    if not 0 <= client_rtt_ms <= delaybridge.MAX_RTT_MS:
        raise ConfigError(f"client rtt must be 0..{delaybridge.MAX_RTT_MS:.0f} ms")
    with _locked(lab_dir):
        old = load_state(lab_dir)
        if old is not None:
            alive = _anything_alive(old)
            if alive:
                raise LabError(
                    f"a libvirt lab is already running in {lab_dir} (id {old.id}: "
                    f"{', '.join(alive[:4])}); run 'lab down' first"
                )
            _teardown(old)
        state = _new_state(lab_dir, client_rtt_ms, guest, domain)
        state.run_dir.mkdir(parents=True)
        _save(state)
        try:
            _bring_up(state, xml, timeout, before_start)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                _teardown(state)
            if isinstance(exc, errors.SpiceLibvirtError):
                raise
            if isinstance(exc, Exception):
                raise LabError(f"lab up failed: {type(exc).__name__}: {exc}") from exc
            raise
        return state


def _bring_up(
    state: LabState,
    xml: str,
    timeout: float,
    before_start: Callable[[LibvirtHost], None] | None,
) -> None:
    t0 = time.monotonic()
    _build_network(state)
    state.timings.network_s = round(time.monotonic() - t0, 3)
    state.bridge.proc = delaybridge.spawn(
        state.bridge.netns,
        "c",
        "w",
        rtt_ms=state.bridge.rtt_ms,
        control_path=state.bridge.control,
        log_path=state.bridge.log,
    )
    _save(state)
    for name in HOSTS:
        host = state.host(name)
        host.prepare()
        if before_start is not None:
            before_start(host)
        try:
            host.start(timeout=min(timeout, 30.0))
        finally:
            state.hosts[name].runtime = host.runtime
            _save(state)
    _check_links(state)
    state.timings.daemons_ready_s = round(time.monotonic() - t0, 3)
    # B probes QEMU (cold cache) while A starts the guest, so a first migration is not slow
    conn_b = state.host("B").open()
    warm_b = threading.Thread(target=conn_b.getDomainCapabilities, daemon=True)
    warm_b.start()
    state.domain_xml.write_text(xml)
    conn = state.host("A").open()
    try:
        dom = _call_with_timeout(lambda: conn.defineXML(xml), timeout, "define the lab guest on A")
        _call_with_timeout(dom.create, timeout, "start the lab guest on A")
    except errors.LabError:
        raise
    except Exception as exc:
        raise _libvirt_error(exc, "start the lab guest on A") from exc
    finally:
        conn.close()
    state.timings.domain_running_s = round(time.monotonic() - t0, 3)
    state.active_host = "A"
    if state.guest == "linux":
        console = serial_log(state, "A")
        netns.wait_for(
            lambda: "GUEST-READY" in console.read_text(errors="replace"),
            timeout=LINUX_BOOT_TIMEOUT,
            what=f"the linux guest to print GUEST-READY in {console}",
            interval=0.2,
        )
        state.timings.guest_ready_s = round(time.monotonic() - t0, 3)
    warm_b.join(max(0.0, timeout - (time.monotonic() - t0)))
    conn_b.close()
    if warm_b.is_alive():
        raise LabError("host B did not finish probing QEMU in time")
    state.timings.caps_harvested = state.host("A").harvest_caps(default_caps_seed(0))
    state.phase = "up"
    _save(state)


# --------------------------------------------------------------------------- down


def _destroy_domains(host: LibvirtHost, timeout: float) -> list[str]:
    lv = require_libvirt()
    conn = _call_with_timeout(host.open, timeout, f"connect to host {host.config.name}")
    destroyed: list[str] = []
    try:
        for dom in conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(lv.libvirtError, LabError):
                _call_with_timeout(dom.destroy, timeout, f"destroy {dom.name()}")
                destroyed.append(dom.name())
    finally:
        conn.close()
    return destroyed


def _teardown(state: LabState, *, keep_logs: bool = False) -> DownReport:
    report = DownReport(found=True, id=state.id)
    if state.bridge.proc is not None and state.bridge.proc.alive():
        netns.terminate([state.bridge.proc], timeout=5.0)
        report.stopped.append(f"delay bridge pid {state.bridge.proc.pid}")
    for name in HOSTS:
        host = state.host(name)
        ref = host.runtime.libvirtd
        if ref is not None and ref.alive():
            with contextlib.suppress(errors.SpiceLibvirtError, Exception):
                for dom in _destroy_domains(host, 15.0):
                    report.stopped.append(f"domain {dom} on {name}")
        for daemon in (host.runtime.libvirtd, host.runtime.virtlogd):
            if daemon is not None and daemon.alive():
                report.stopped.append(f"{daemon.what} pid {daemon.pid}")
        host.stop(timeout=10.0)
    for ns_name in state.namespaces:
        if netns.exists(ns_name):
            report.swept_pids += netns.pids_in(ns_name)
            netns.delete(ns_name, kill_timeout=10.0)
            report.namespaces_deleted.append(ns_name)
    # leftovers: anything still alive, a namespace, a mount under the lab's directories
    report.leftovers = _anything_alive(state)
    mounts = Path("/proc/self/mountinfo").read_text()
    report.leftovers += [
        line.split()[4]
        for line in mounts.splitlines()
        if str(state.run_dir) in line or state.prefix in line
    ]
    if not keep_logs:
        shutil.rmtree(state.run_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (state.lab_dir / STATE_FILE).unlink()
    return report


def down(lab_dir: Path | None = None, *, keep_logs: bool = False) -> DownReport:
    """Tear down the lab recorded in ``lab_dir``: everything it started, nothing else.

    Works on a half-built or crashed lab too; calling it when there is no lab is not an error.
    ``keep_logs`` keeps ``<lab_dir>/run-<id>`` (libvirtd and QEMU logs) for a post-mortem.
    """
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with _locked(lab_dir):
        state = load_state(lab_dir)
        if state is None:
            return DownReport(found=False)
        report = _teardown(state, keep_logs=keep_logs)
    if report.leftovers:
        raise LabError(f"lab {state.id} torn down, but left behind: {', '.join(report.leftovers)}")
    return report


ROLES = ("A", "B", "C", "D", "sw")


def purge(prefix: str) -> DownReport:
    """Tear down a lab whose state file is lost, by its namespace prefix (``slab1a2b3c``).

    Everything of a lab lives in its namespaces, so ending the processes inside them and
    deleting them removes the lab (guests are stopped with SIGTERM, not destroyed through
    libvirt). Only names of the lab's own shape are accepted, so nothing else is touched.
    """
    if not re.fullmatch(r"slab[0-9a-f]{6}", prefix):
        raise ConfigError(f"not a lab prefix: {prefix!r} (expected slab + 6 hex digits)")
    report = DownReport(found=False, id=prefix.removeprefix("slab"))
    for role in ROLES:
        name = f"{prefix}{role}"
        if netns.exists(name):
            report.found = True
            report.swept_pids += netns.pids_in(name)
            netns.delete(name, kill_timeout=10.0)
            report.namespaces_deleted.append(name)
    report.leftovers = [f"{prefix}{r}" for r in ROLES if netns.exists(f"{prefix}{r}")]
    return report


# --------------------------------------------------------------------------- status


def _require_state(lab_dir: Path | None) -> LabState:
    state = load_state(lab_dir)
    if state is None:
        raise LabError(f"no libvirt lab in {lab_dir or default_lab_dir()}; run 'lab up' first")
    return state


def spice_endpoint(state: LabState, host: HostName) -> SpiceEndpoint | None:
    """The guest's SPICE address and port on ``host``, as libvirt reports it (None: absent)."""
    lv = require_libvirt()
    conn = state.host(host).open()
    try:
        try:
            dom = conn.lookupByName(state.domain)
            if not dom.isActive():
                return None
            root = ET.fromstring(dom.XMLDesc(0))
        except lv.libvirtError:
            return None
    finally:
        conn.close()
    graphics = root.find("./devices/graphics[@type='spice']")
    if graphics is None or int(graphics.get("port", "-1")) <= 0:
        return None
    address = graphics.get("listen") or state.hosts[host].config.ip
    port = int(graphics.get("port", "0"))
    return SpiceEndpoint(host=host, address=address, port=port, uri=f"spice://{address}:{port}")


def _host_status(state: LabState, name: HostName) -> HostStatus:
    lv = require_libvirt()
    hs = state.hosts[name]
    run = hs.runtime
    st = HostStatus(
        name=name,
        hostname=hs.config.hostname,
        ip=hs.config.ip,
        netns=hs.config.netns,
        libvirtd_pid=run.libvirtd.pid if run.libvirtd else None,
        libvirtd_alive=bool(run.libvirtd and run.libvirtd.alive()),
        virtlogd_pid=run.virtlogd.pid if run.virtlogd else None,
        virtlogd_alive=bool(run.virtlogd and run.virtlogd.alive()),
        host_uuid=None,
        uri_unix=hs.uri_unix,
        uri_tcp=hs.uri_tcp,
    )
    if not st.libvirtd_alive:
        return st
    try:
        conn = state.host(name).open()
        try:
            caps = ET.fromstring(conn.getCapabilities())
            st.host_uuid = caps.findtext("./host/uuid")
            names = {
                lv.VIR_DOMAIN_RUNNING: "running",
                lv.VIR_DOMAIN_PAUSED: "paused",
                lv.VIR_DOMAIN_SHUTOFF: "shut off",
            }
            for dom in conn.listAllDomains(0):
                st.domains[dom.name()] = names.get(dom.state()[0], f"state {dom.state()[0]}")
        finally:
            conn.close()
    except (LibvirtError, lv.libvirtError) as exc:
        st.error = str(exc)
    return st


def status(lab_dir: Path | None = None) -> LabStatus:
    """What runs, where the guest is, how to reach its SPICE server, and the client RTT."""
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    state = load_state(lab_dir)
    if state is None:
        return LabStatus(running=False, lab_dir=lab_dir)
    hosts = [_host_status(state, name) for name in HOSTS]
    active = [h.name for h in hosts if h.domains.get(state.domain) == "running"]
    bridge_alive = bool(state.bridge.proc and state.bridge.proc.alive())
    stats = None
    if bridge_alive:
        with contextlib.suppress(LabError, ConfigError):
            stats = delaybridge.stats(state.bridge.control)
    missing = [n for n in state.namespaces if not netns.exists(n)]
    result = LabStatus(
        running=True,
        id=state.id,
        lab_dir=lab_dir,
        phase=state.phase,
        hosts=hosts,
        domain=state.domain,
        active_host=active[0] if len(active) == 1 else None,
        client_netns=state.client.netns,
        client_rtt_ms=stats.rtt_ms if stats else state.bridge.rtt_ms,
        bridge_alive=bridge_alive,
        bridge=stats,
        namespaces_missing=missing,
        migrations=state.migrations,
        timings=state.timings,
    )
    if result.active_host is not None:
        result.spice = spice_endpoint(state, result.active_host)
    result.healthy = (
        state.phase == "up"
        and not missing
        and bridge_alive
        and all(h.libvirtd_alive and h.virtlogd_alive and h.host_uuid for h in hosts)
        and len({h.host_uuid for h in hosts}) == len(hosts)
        and result.spice is not None
    )
    return result


# --------------------------------------------------------------------------- migrate


def _where(state: LabState) -> HostName:
    lv = require_libvirt()
    running: list[HostName] = []
    for name in HOSTS:
        conn = state.host(name).open()
        try:
            with contextlib.suppress(lv.libvirtError):
                dom = conn.lookupByName(state.domain)
                if dom.state()[0] in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_PAUSED):
                    running.append(name)
        finally:
            conn.close()
    if len(running) != 1:
        where = " and ".join(running) or "no host"
        raise LabError(f"guest {state.domain} runs on {where}; cannot tell where to migrate from")
    return running[0]


def libvirt_p2p_migrate(
    state: LabState, source: HostName, destination: HostName, timeout: float
) -> MigrationResult:
    """Plain libvirt peer-to-peer live migration: source libvirtd -> ``qemu+tcp://hostX``.

    On timeout the migration job is aborted, which leaves the guest running on the source.
    """
    lv = require_libvirt()
    dst_uri = state.hosts[destination].uri_tcp
    flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER
    conn = state.host(source).open()
    try:
        dom = conn.lookupByName(state.domain)
        start = time.monotonic()
        error: str | None = None
        try:
            _call_with_timeout(
                lambda: dom.migrateToURI3(dst_uri, {}, flags), timeout, "live migration"
            )
        except LabError as exc:  # timed out: abort, the guest stays on the source
            with contextlib.suppress(lv.libvirtError):
                dom.abortJob()
            error = str(exc)
        except lv.libvirtError as exc:
            error = exc.get_error_message()
        wall = time.monotonic() - start
    finally:
        conn.close()
    return MigrationResult(
        domain=state.domain,
        source=source,
        destination=destination,
        ok=error is None,
        wall_s=round(wall, 3),
        error=error,
    )


def migrate(
    lab_dir: Path | None = None,
    *,
    to: HostName | None = None,
    timeout: float = 120.0,
    migrator: Migrator | None = None,
) -> MigrationResult:
    """Live-migrate the lab guest to the other host (ping-pong), or to ``to``.

    ``migrator`` replaces the plain libvirt p2p migration (the seamless controller plugs in
    here). Raises :class:`MigrationError` if the migration failed; the guest then still
    runs on the source.
    """
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with _locked(lab_dir):
        state = _require_state(lab_dir)
        if state.phase != "up":
            raise LabError(f"lab {state.id} is not up (phase {state.phase}); run 'lab down'")
        source = _where(state)
        destination: HostName = to or ("B" if source == "A" else "A")
        if destination == source:
            raise ConfigError(f"the guest already runs on host {source}")
        before = spice_endpoint(state, source)
        result = (migrator or libvirt_p2p_migrate)(state, source, destination, timeout)
        result.spice_before = before
        if result.ok:
            now = _where(state)
            if now != destination:
                result.ok = False
                result.error = f"migration reported success but the guest runs on {now}"
            else:
                result.spice_after = spice_endpoint(state, destination)
                state.active_host = destination
                state.migrations += 1
                _save(state)
        if not result.ok:
            raise MigrationError(
                "migrate", f"{source} -> {destination}: {result.error} (guest left on {source})"
            )
        return result


def restart_libvirtd(lab_dir: Path | None, host: HostName) -> LabState:
    """Restart one host's libvirtd (to load a newly installed hook); the guest keeps running.

    The new PID goes into the state file, so ``status`` and ``down`` keep tracking it.
    """
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with _locked(lab_dir):
        state = _require_state(lab_dir)
        h = state.host(host)
        try:
            h.restart_libvirtd()
        finally:
            state.hosts[host].runtime = h.runtime
            _save(state)
        return state


# --------------------------------------------------------------------------- client link


def set_client_rtt(lab_dir: Path | None, rtt_ms: float) -> delaybridge.BridgeStats:
    """Change the client's round-trip time on the running lab."""
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with _locked(lab_dir):
        state = _require_state(lab_dir)
        stats = delaybridge.set_rtt(state.bridge.control, rtt_ms)
        state.bridge.rtt_ms = rtt_ms
        _save(state)
        return stats


def probe_rtt(
    lab_dir: Path | None = None,
    *,
    host: HostName | None = None,
    port: int | None = None,
    samples: int = 5,
) -> RttProbe:
    """Median TCP connect time from the client namespace to a host (default: the guest's
    SPICE port on the host it runs on). One connect = one round trip."""
    state = _require_state((lab_dir or default_lab_dir()).absolute())
    if port is None:
        where = host or _where(state)
        endpoint = spice_endpoint(state, where)
        if endpoint is None:
            raise LabError(f"no SPICE server for {state.domain} on host {where}")
        address, port = endpoint.address, endpoint.port
    else:
        address = state.hosts[host or "A"].config.ip
    ms = [
        round(netns.tcp_connect_ms(state.client.netns, address, port), 2)
        for _ in range(max(1, samples))
    ]
    return RttProbe(
        target=f"{address}:{port}",
        samples_ms=ms,
        median_ms=round(statistics.median(ms), 2),
        min_ms=min(ms),
        max_ms=max(ms),
    )


# --------------------------------------------------------------------------- command line


def _print(model: BaseModel, as_json: bool, text: str) -> None:
    print(model.model_dump_json(indent=2) if as_json else text)


def main(argv: Sequence[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--lab-dir", type=Path, default=None, help="default: $SPICE_LIBVIRT_LAB_DIR"
    )
    common.add_argument("--json", action="store_true", help="print one JSON object")
    parser = argparse.ArgumentParser(
        prog="python -m spice_libvirt.lab.libvirt_lab",
        description="Two-host libvirt lab in network namespaces (manual driver).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", parents=[common], help="build the lab, start the guest on A")
    p_up.add_argument("--client-rtt-ms", type=float, default=0.0)
    p_up.add_argument("--guest", choices=["firmware", "linux"], default="firmware")
    p_up.add_argument("--memory-mib", type=int, default=256)
    p_mig = sub.add_parser("migrate", parents=[common], help="migrate the guest to the other host")
    p_mig.add_argument("--to", choices=list(HOSTS))
    p_mig.add_argument("--timeout", type=float, default=120.0)
    sub.add_parser("status", parents=[common], help="what runs where")
    p_rtt = sub.add_parser("rtt", parents=[common], help="measure (and set) the client RTT")
    p_rtt.add_argument("--set", type=float, dest="set_ms", help="new client RTT in ms first")
    p_rtt.add_argument("--samples", type=int, default=5)
    p_down = sub.add_parser("down", parents=[common], help="tear everything down")
    p_down.add_argument("--keep-logs", action="store_true")
    p_purge = sub.add_parser("purge", parents=[common], help="remove a lab whose state is lost")
    p_purge.add_argument("prefix", help="namespace prefix, e.g. slab1a2b3c")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            state = up(
                args.lab_dir,
                client_rtt_ms=args.client_rtt_ms,
                guest=args.guest,
                memory_mib=args.memory_mib,
            )
            spice = spice_endpoint(state, "A")
            _print(
                state,
                args.json,
                f"lab {state.id} up in {state.timings.domain_running_s} s: guest "
                f"{state.domain} on hostA, SPICE {spice.uri if spice else '?'}, client netns "
                f"{state.client.netns} (rtt {state.bridge.rtt_ms} ms)\n"
                f"  A: {state.hosts['A'].uri_unix}\n  B: {state.hosts['B'].uri_unix}",
            )
        elif args.command == "migrate":
            result = migrate(args.lab_dir, to=args.to, timeout=args.timeout)
            _print(
                result,
                args.json,
                f"{result.source} -> {result.destination}: ok in {result.wall_s} s, SPICE now "
                f"{result.spice_after.uri if result.spice_after else '?'}",
            )
        elif args.command == "status":
            st = status(args.lab_dir)
            text = "no lab" if not st.running else json.dumps(st.model_dump(mode="json"), indent=2)
            _print(st, args.json, text)
            return 0 if (st.healthy or not st.running) else int(for_error(LabError("")))
        elif args.command == "rtt":
            if args.set_ms is not None:
                set_client_rtt(args.lab_dir, args.set_ms)
            probe = probe_rtt(args.lab_dir, samples=args.samples)
            _print(probe, args.json, f"client -> {probe.target}: median {probe.median_ms} ms")
        elif args.command == "purge":
            report = purge(args.prefix)
            _print(report, args.json, f"{args.prefix}: removed {report.namespaces_deleted}")
        else:
            report = down(args.lab_dir, keep_logs=args.keep_logs)
            _print(
                report,
                args.json,
                "no lab" if not report.found else f"lab {report.id} down: {report.stopped}",
            )
    except errors.SpiceLibvirtError as exc:
        print(f"libvirt_lab: error: {exc}", file=sys.stderr)
        return int(for_error(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
