"""The two-host libvirt lab: hosts A and B with their own libvirtd, a client C behind a delay.

``up`` builds, on one machine, what a real deployment has on three: two hypervisor hosts that
live-migrate a SPICE guest to each other over TCP, and a client whose link has a chosen
round-trip time. Everything lives in network namespaces named ``<prefix><role>`` (prefix
``slab`` + 6 hex digits, unique per lab) and in a private /24 (``10.251.X.0/24``) that exists
only inside them::

      [A  hostA .1] ----\\
                         br0 [<prefix>sw] ---- w [<prefix>D: delay bridge] c ---- [C client .3]
      [B  hostB .2] ----/

* A and B each run a private libvirtd + virtlogd (:mod:`~spice_libvirt_lab.libvirt_host`) with
  distinct host UUIDs, listening on TCP so a peer-to-peer migration goes A -> B directly;
* D runs :mod:`~spice_libvirt_lab.delaybridge`, which delays the client's frames by RTT/2
  each way (this kernel has no netem); the A <-> B link is not delayed;
* C is where SPICE clients run (``ip netns exec <prefix>C remote-viewer spice://hostA:5900``
  resolves the lab names through ``/etc/netns/<prefix>C/hosts``; in-process clients use
  :func:`spice_libvirt_lab.netns.socket_in`).

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

``spice-libvirt lab up --libvirt`` (:mod:`spice_libvirt_lab.command`) drives it by hand. The state
models are in :mod:`~spice_libvirt_lab.libvirt_state`, the read-only views (status, where the
guest runs, RTT) in :mod:`~spice_libvirt_lab.libvirt_status`; both are re-exported here.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spice_libvirt import errors
from spice_libvirt.errors import ConfigError, LabError, MigrationError
from spice_libvirt_lab import (
    delaybridge,
    libvirt_agent,
    libvirt_daemons,
    libvirt_ticket,
    libvirt_tls,
    memcheck,
    netns,
)
from spice_libvirt_lab.labdir import remove_inside
from spice_libvirt_lab.libvirt_domain import TEMPLATE, TEMPLATE_LINUX, render_domain_xml
from spice_libvirt_lab.libvirt_host import (
    LIBVIRTD_TCP_PORT,
    LOG_FILTERS,
    SECRET_SAFE_LOG_FILTERS,
    HostConfig,
    LibvirtHost,
    call_with_timeout,
    libvirt_error,
    require_libvirt,
)
from spice_libvirt_lab.libvirt_state import (
    DEFAULT_DOMAIN,
    HOSTS,
    LINUX_BOOT_TIMEOUT,
    MEMCHECK_READY_TIMEOUT,
    PORT_CHANNEL,
    SPICE_TLS_DIR,
    STATE_FILE,
    BridgeState,
    ClientState,
    DownReport,
    GuestKind,
    HostName,
    HostState,
    LabState,
    LabStatus,
    MigrationResult,
    Migrator,
    RttProbe,
    SpiceEndpoint,
    Timings,
    TlsMode,
    anything_alive,
    default_caps_seed,
    default_lab_dir,
    load_state,
    locked,
    recorded_processes,
    save,
)
from spice_libvirt_lab.libvirt_status import (
    guest_accounts,
    probe_rtt,
    require_state,
    serial_console,
    set_client_impairment,
    set_client_rtt,
    spice_endpoint,
    status,
    where,
)

# --------------------------------------------------------------------------- up


def _new_state(
    lab_dir: Path,
    rtt_ms: float,
    guest: GuestKind,
    domain: str,
    tls_mode: TlsMode | None,
    ticket_file: Path | None = None,
) -> LabState:
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
            spice_tls_dir=SPICE_TLS_DIR if tls_mode is not None else None,
            log_filters=SECRET_SAFE_LOG_FILTERS if ticket_file else LOG_FILTERS,
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
        ticket_file=ticket_file,
        tls=(
            libvirt_tls.plan(run_dir, {n: f"host{n}" for n in HOSTS}, tls_mode)
            if tls_mode is not None
            else None
        ),
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


def serial_log(state: LabState, host: HostName, domain: str | None = None) -> Path:
    """A guest's console log (linux, memcheck) while it runs on ``host`` (root-namespace
    path); ``domain`` defaults to the lab's guest."""
    return serial_console(state, host, domain or state.domain)


def _start_on_a(state: LabState, xml: str, timeout: float) -> None:
    """Define the lab's guest from ``xml`` on host A and start it."""
    conn = state.host("A").open()
    try:
        dom = call_with_timeout(lambda: conn.defineXML(xml), timeout, "define the lab guest on A")
        call_with_timeout(dom.create, timeout, "start the lab guest on A")
    except errors.LabError:
        raise
    except Exception as exc:
        raise libvirt_error(exc, "start the lab guest on A") from exc
    finally:
        conn.close()


def _wait_ready(state: LabState, domains: list[str]) -> None:
    """Until the guests in ``domains`` (on host A) can be used: linux printed GUEST-READY,
    memcheck filled its working set; a firmware guest is ready as it runs."""
    if state.guest == "linux":
        console = serial_log(state, "A")
        netns.wait_for(
            lambda: "GUEST-READY" in console.read_text(errors="replace"),
            timeout=LINUX_BOOT_TIMEOUT,
            what=f"the linux guest to print GUEST-READY in {console}",
            interval=0.2,
        )
    elif state.guest == "memcheck":
        deadline = time.monotonic() + MEMCHECK_READY_TIMEOUT
        for name in domains:
            console = serial_log(state, "A", name)
            memcheck.wait_ready(console, max(1.0, deadline - time.monotonic()))


def _check_links(state: LabState) -> None:
    """Each host reaches the other's libvirtd over TCP, and C reaches both hosts."""
    for src, dst in (("A", "B"), ("B", "A")):
        ip = state.hosts[dst].config.ip
        netns.tcp_connect_ms(state.hosts[src].config.netns, ip, LIBVIRTD_TCP_PORT, timeout=5.0)
    for name in HOSTS:
        ip = state.hosts[name].config.ip
        netns.tcp_connect_ms(state.client.netns, ip, LIBVIRTD_TCP_PORT, timeout=10.0)


def up(
    lab_dir: Path | None = None,
    *,
    client_rtt_ms: float = 0.0,
    guest: GuestKind = "firmware",
    memory_mib: int = 256,
    domain: str = DEFAULT_DOMAIN,
    timeout: float = 120.0,
    before_start: Callable[[LibvirtHost], None] | None = None,
    tls: bool = False,
    tls_mode: TlsMode = "secure",
    ticket_file: Path | None = None,
    ticket_valid_s: float | None = None,
    domains: int = 1,
    clients: bool = False,
    agent: bool = False,
    memcheck_options: memcheck.MemcheckOptions | None = None,
) -> LabState:
    """Build the lab and start the guest on host A; return the recorded state.

    The memcheck guest runs with ``memcheck_options`` (every domain alike; its RAM follows
    from its working set, ``memory_mib`` is not used for it); ``up`` returns once every
    memcheck guest has filled its working set.

    Every lab gets an sshd in each host and an Ansible inventory naming them
    (:mod:`~spice_libvirt_lab.libvirt_daemons`, ``state.ansible_inventory``). ``domains``
    > 1 starts that many guests on A in all, ``clients`` a ``spice-libvirt watch`` client
    for each in the client namespace (:mod:`~spice_libvirt_lab.libvirt_fleet`). ``agent``
    runs ``spice-libvirt agent run`` inside each host, as a hypervisor would
    (:mod:`~spice_libvirt_lab.libvirt_agent`).

    With ``tls`` the hosts run SPICE over TLS as a manager sets it up
    (:mod:`~spice_libvirt_lab.libvirt_tls`): a lab CA, a certificate per host, ``spice_tls``
    in each qemu.conf, and the guest's graphics in ``tls_mode`` (see
    :class:`~spice_libvirt_lab.libvirt_state.LabTlsState`). ``ticket_file``: the guest gets
    that SPICE ticket through libvirt once it runs (:mod:`~spice_libvirt_lab.libvirt_ticket`),
    valid ``ticket_valid_s`` seconds (None: no expiry).

    ``before_start`` is called with each prepared host before its daemons start (to install
    a hook into ``host.etc_dir / "hooks"``). Raises :class:`LabError` if a lab already runs in
    ``lab_dir``; a stale state file (nothing of it alive) is cleaned up first. If building
    fails, everything built so far is torn down again before the error is raised.
    """
    require_libvirt()
    started = time.monotonic()
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    mode: TlsMode | None = tls_mode if tls else None
    if ticket_valid_s is not None and ticket_file is None:
        raise ConfigError("a ticket validity needs a ticket file")
    from spice_libvirt_lab import libvirt_fleet

    libvirt_fleet.check_request(domains, tls=tls, ticket=ticket_file is not None)
    ticket = libvirt_ticket.check_ticket_file(ticket_file) if ticket_file else None
    if guest == "memcheck":
        memcheck_options = memcheck_options or memcheck.MemcheckOptions()
    elif memcheck_options is not None:
        raise ConfigError("memcheck options need the memcheck guest")
    xml = render_domain_xml(
        name=domain,
        memory_mib=memory_mib,
        guest=guest,
        tls_mode=mode,
        ticket=bool(ticket),
        memcheck=memcheck_options,
    )
    if not 0 <= client_rtt_ms <= delaybridge.MAX_RTT_MS:
        raise ConfigError(f"client rtt must be 0..{delaybridge.MAX_RTT_MS:.0f} ms")
    with locked(lab_dir):
        old = load_state(lab_dir)
        if old is not None:
            alive = anything_alive(old)
            if alive:
                raise LabError(
                    f"a libvirt lab is already running in {lab_dir} (id {old.id}: "
                    f"{', '.join(alive[:4])}); run 'lab down' first"
                )
            _teardown(old)
        state = _new_state(lab_dir, client_rtt_ms, guest, domain, mode, ticket)
        state.memcheck = memcheck_options
        state.run_dir.mkdir(parents=True)
        save(state)
        try:
            _bring_up(state, xml, timeout, before_start)
            if ticket is not None:
                libvirt_ticket.set_ticket(state, "A", ticket_valid_s)
            libvirt_daemons.start_sshds(state)
            libvirt_fleet.bring_up(state, domains, memory_mib, clients)
            if guest == "memcheck":
                _wait_ready(state, state.all_domains)
                state.timings.guest_ready_s = round(time.monotonic() - started, 3)
            if agent:
                libvirt_agent.start_agents(state)
            state.phase = "up"
            save(state)
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
    save(state)
    if state.tls is not None:
        libvirt_tls.create(state)
    for name in HOSTS:
        host = state.host(name)
        host.prepare()
        if state.tls is not None:
            libvirt_tls.issue(state, name)
        if before_start is not None:
            before_start(host)
        try:
            host.start(timeout=min(timeout, 30.0))
        finally:
            state.hosts[name].runtime = host.runtime
            save(state)
    _check_links(state)
    state.timings.daemons_ready_s = round(time.monotonic() - t0, 3)
    # B probes QEMU (cold cache) while A starts the guest, so a first migration is not slow
    conn_b = state.host("B").open()
    warm_b = threading.Thread(target=conn_b.getDomainCapabilities, daemon=True)
    warm_b.start()
    state.domain_xml.write_text(xml)
    _start_on_a(state, xml, timeout)
    state.timings.domain_running_s = round(time.monotonic() - t0, 3)
    state.active_host = "A"
    if state.guest == "linux":
        _wait_ready(state, [state.domain])
        state.timings.guest_ready_s = round(time.monotonic() - t0, 3)
    warm_b.join(max(0.0, timeout - (time.monotonic() - t0)))
    conn_b.close()
    if warm_b.is_alive():
        raise LabError("host B did not finish probing QEMU in time")
    state.timings.caps_harvested = state.host("A").harvest_caps(default_caps_seed(0))
    save(state)


# --------------------------------------------------------------------------- down


def _destroy_domains(host: LibvirtHost, timeout: float) -> list[str]:
    lv = require_libvirt()
    conn = call_with_timeout(host.open, timeout, f"connect to host {host.config.name}")
    destroyed: list[str] = []
    try:
        for dom in conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            with contextlib.suppress(lv.libvirtError, LabError):
                call_with_timeout(dom.destroy, timeout, f"destroy {dom.name()}")
                destroyed.append(dom.name())
    finally:
        conn.close()
    return destroyed


#: how long ``down`` waits for the processes it ended to leave the process table
#: (:func:`netns.wait_reaped`): the per-host daemons and the hosts' subreapers are children
#: of PID 1 once the ``lab up`` that started them has exited
REAP_TIMEOUT_S = 10.0


def _teardown(state: LabState, *, keep_logs: bool = False) -> DownReport:
    report = DownReport(found=True, id=state.id)
    recorded = recorded_processes(state)
    report.stopped += libvirt_daemons.stop_all(state)
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
        for daemon in (host.runtime.libvirtd, host.runtime.virtlogd, host.runtime.reaper):
            if daemon is not None and daemon.alive():
                report.stopped.append(f"{daemon.what} pid {daemon.pid}")
        host.stop(timeout=10.0)
    for ns_name in state.namespaces:
        if netns.exists(ns_name):
            report.swept_pids += netns.pids_in(ns_name)
            netns.delete(ns_name, kill_timeout=10.0)
            report.namespaces_deleted.append(ns_name)
    # leftovers: a namespace, a process still in the process table (alive, or ended and not
    # reaped by its parent: "down" reports nothing left only when nothing is), a mount
    report.leftovers = [n for n in state.namespaces if netns.exists(n)]
    report.leftovers += [
        f"{r.what} pid {r.pid}" + ("" if r.alive() else " (ended, not reaped by its parent)")
        for r in netns.wait_reaped(recorded, timeout=REAP_TIMEOUT_S)
    ]
    mounts = Path("/proc/self/mountinfo").read_text()
    report.leftovers += [
        line.split()[4]
        for line in mounts.splitlines()
        if str(state.run_dir) in line or state.prefix in line
    ]
    if not keep_logs:
        remove_inside(state.lab_dir, state.run_dir)
    with contextlib.suppress(FileNotFoundError):
        (state.lab_dir / STATE_FILE).unlink()
    return report


def down(lab_dir: Path | None = None, *, keep_logs: bool = False) -> DownReport:
    """Tear down the lab recorded in ``lab_dir``: everything it started, nothing else.

    Works on a half-built or crashed lab too; calling it when there is no lab is not an error.
    ``keep_logs`` keeps ``<lab_dir>/run-<id>`` (libvirtd and QEMU logs) for a post-mortem.
    """
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with locked(lab_dir):
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


def libvirt_p2p_migrate(
    state: LabState, source: HostName, destination: HostName, timeout: float
) -> MigrationResult:
    """Plain libvirt peer-to-peer live migration: source libvirtd -> ``qemu+tcp://hostX``.

    On timeout the migration job is aborted, which leaves the guest running on the source.
    A TLS lab passes the destination's ``tlsPort`` and ``tlsSubject`` in the graphics URI.
    """
    lv = require_libvirt()
    dst_uri = state.hosts[destination].uri_tcp
    flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER
    params: dict[str, Any] = {}
    if (graphics := libvirt_tls.graphics_uri(state, destination)) is not None:
        params[lv.VIR_MIGRATE_PARAM_GRAPHICS_URI] = graphics
    conn = state.host(source).open()
    try:
        dom = conn.lookupByName(state.domain)
        start = time.monotonic()
        error: str | None = None
        try:
            call_with_timeout(
                lambda: dom.migrateToURI3(dst_uri, params, flags), timeout, "live migration"
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
    with locked(lab_dir):
        state = require_state(lab_dir)
        if state.phase != "up":
            raise LabError(f"lab {state.id} is not up (phase {state.phase}); run 'lab down'")
        source = where(state)
        destination: HostName = to or ("B" if source == "A" else "A")
        if destination == source:
            raise ConfigError(f"the guest already runs on host {source}")
        before = spice_endpoint(state, source)
        result = (migrator or libvirt_p2p_migrate)(state, source, destination, timeout)
        result.spice_before = before
        if result.ok:
            now = where(state)
            if now != destination:
                result.ok = False
                result.error = f"migration reported success but the guest runs on {now}"
            else:
                result.spice_after = spice_endpoint(state, destination)
                state.active_host = destination
                state.migrations += 1
                save(state)
        if not result.ok:
            raise MigrationError(
                "migrate", f"{source} -> {destination}: {result.error} (guest left on {source})"
            )
        return result


def restart_guest(
    lab_dir: Path | None = None,
    *,
    guest: GuestKind | None = None,
    memcheck_options: memcheck.MemcheckOptions | None = None,
    kernel_args: str = "",
    timeout: float = 120.0,
) -> LabState:
    """Replace the lab's guest (the extra domains stay) with a fresh one on host A: of
    another kind, with other memcheck options or kernel arguments, or the same again after
    it was lost. Its consoles start empty; its SPICE client, if the lab has one, is started
    again. Returns once the new guest is ready (linux: GUEST-READY; memcheck: filled).
    """
    from spice_libvirt_lab import libvirt_fleet

    lv = require_libvirt()
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with locked(lab_dir, timeout=timeout):
        state = require_state(lab_dir)
        guest = guest or state.guest
        options = None
        if guest == "memcheck":
            options = memcheck_options or state.memcheck or memcheck.MemcheckOptions()
        xml = render_domain_xml(
            name=state.domain, guest=guest, memcheck=options, kernel_args=kernel_args
        )
        for host in HOSTS:
            conn = state.host(host).open()
            try:
                with contextlib.suppress(lv.libvirtError):
                    dom = conn.lookupByName(state.domain)
                    with contextlib.suppress(lv.libvirtError):
                        dom.destroy()
                    dom.undefine()
            finally:
                conn.close()
            console = serial_log(state, host)
            for old in (console, *console.parent.glob(console.name + ".*")):
                old.unlink(missing_ok=True)
        _start_on_a(state, xml, timeout)
        state.guest, state.memcheck, state.active_host = guest, options, "A"
        state.domain_xml.write_text(xml)
        save(state)
        _wait_ready(state, [state.domain])
        if any(c.domain == state.domain for c in state.clients):
            libvirt_fleet.restart_client(state, state.domain)
            save(state)
        return state


def restart_libvirtd(lab_dir: Path | None, host: HostName) -> LabState:
    """Restart one host's libvirtd (to load a newly installed hook); the guest keeps running.

    The new PID goes into the state file, so ``status`` and ``down`` keep tracking it.
    """
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with locked(lab_dir):
        state = require_state(lab_dir)
        h = state.host(host)
        try:
            h.restart_libvirtd()
        finally:
            state.hosts[host].runtime = h.runtime
            save(state)
        return state


__all__ = [
    "DEFAULT_DOMAIN",
    "HOSTS",
    "PORT_CHANNEL",
    "STATE_FILE",
    "TEMPLATE",
    "TEMPLATE_LINUX",
    "DownReport",
    "GuestKind",
    "HostName",
    "LabState",
    "LabStatus",
    "MigrationResult",
    "Migrator",
    "RttProbe",
    "SpiceEndpoint",
    "default_lab_dir",
    "down",
    "guest_accounts",
    "libvirt_p2p_migrate",
    "load_state",
    "migrate",
    "probe_rtt",
    "purge",
    "render_domain_xml",
    "restart_guest",
    "restart_libvirtd",
    "serial_log",
    "set_client_impairment",
    "set_client_rtt",
    "spice_endpoint",
    "status",
    "up",
]
