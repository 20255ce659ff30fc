"""What a libvirt lab looks like right now: where the guest runs, its SPICE server, the RTT.

Read-only: nothing here changes the lab, so ``lab status`` can run while a migration does.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from spice_libvirt.errors import ConfigError, LabError, LibvirtError
from spice_libvirt_lab import delaybridge, libvirt_daemons, memcheck, netns
from spice_libvirt_lab.libvirt_host import require_libvirt
from spice_libvirt_lab.libvirt_state import (
    HOSTS,
    HostName,
    HostStatus,
    LabState,
    LabStatus,
    RttProbe,
    SpiceEndpoint,
    default_lab_dir,
    load_state,
    locked,
    save,
)


def require_state(lab_dir: Path | None) -> LabState:
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
    if graphics is None:
        return None
    port = int(graphics.get("port", "-1"))
    tls_port = int(graphics.get("tlsPort", "-1"))
    if port <= 0 and tls_port <= 0:
        return None
    address = graphics.get("listen") or state.hosts[host].config.ip
    uri = f"spice://{address}" + (f":{port}" if port > 0 else "")
    if tls_port > 0:
        uri += f"?tls-port={tls_port}"
    return SpiceEndpoint(
        host=host,
        address=address,
        port=port if port > 0 else None,
        uri=uri,
        tls_port=tls_port if tls_port > 0 else None,
        subject=state.tls.subjects.get(host) if state.tls else None,
    )


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
        domains=state.all_domains,
        daemons=libvirt_daemons.statuses(state.daemons),
        clients=libvirt_daemons.statuses(state.clients),
        ansible_inventory=state.ansible_inventory,
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
        and all(p.alive for p in (*result.daemons, *result.clients))
    )
    return result


def states_by_domain(state: LabState) -> dict[str, dict[HostName, int]]:
    """domain -> {host: libvirt state} over both hosts (a host that does not answer is
    left out: its guests count as running nowhere there)."""
    lv = require_libvirt()
    found: dict[str, dict[HostName, int]] = {}
    for name in HOSTS:
        with contextlib.suppress(lv.libvirtError, LibvirtError, LabError):
            conn = state.host(name).open()
            try:
                for dom in conn.listAllDomains(0):
                    found.setdefault(dom.name(), {})[name] = dom.state()[0]
            finally:
                conn.close()
    return found


def guest_accounts(lab_dir: Path | None = None) -> list[memcheck.GuestAccount]:
    """Each memcheck guest's own account, read from its console on the host it runs on.

    A guest paused on one host and running on the other (the end of a migration) is taken
    where it runs; a guest on no host gets the account its last console holds, not alive.
    """
    lv = require_libvirt()
    state = require_state((lab_dir or default_lab_dir()).absolute())
    if state.guest != "memcheck":
        raise ConfigError(
            f"the lab's guest is {state.guest}: only the memcheck guest keeps its own account "
            "(lab up --guest memcheck)"
        )
    states = states_by_domain(state)
    accounts = []
    for domain in state.all_domains:
        on = states.get(domain, {})
        running = [h for h in HOSTS if on.get(h) == lv.VIR_DOMAIN_RUNNING]
        paused = [h for h in HOSTS if on.get(h) == lv.VIR_DOMAIN_PAUSED]
        host = running[0] if running else paused[0] if paused else None
        console: Path | None
        if host is not None:
            console = serial_console(state, host, domain)
        else:  # the console written last tells what happened
            consoles = [serial_console(state, h, domain) for h in HOSTS]
            written = [c for c in consoles if c.exists()]
            console = max(written, key=lambda c: c.stat().st_mtime) if written else None
        accounts.append(memcheck.account(domain, host, console))
    return accounts


def account_after_pass(
    lab_dir: Path | None, before: memcheck.GuestAccount, timeout: float
) -> memcheck.GuestAccount:
    """The memcheck guest's account (of ``before``'s domain) once it has finished a whole
    pass since ``before`` was taken -- two more passes counted, the one under way may have
    started before -- or at once when it shows errors or a fault; after ``timeout`` the last
    account seen (not alive, or without the passes: the caller tells)."""
    deadline = time.monotonic() + timeout
    while True:
        now = next(a for a in guest_accounts(lab_dir) if a.domain == before.domain)
        if now.errors or now.fault:
            return now
        if now.alive and (now.passes or 0) >= (before.passes or 0) + 2:
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.25)


def serial_console(state: LabState, host: HostName, domain: str) -> Path:
    """A guest's serial console file on ``host`` (root-namespace path)."""
    return state.hosts[host].config.state_dir / "log" / "qemu" / f"{domain}-serial.log"


def taint_lines(state: LabState, domain: str | None = None) -> list[str]:
    """The ``custom-monitor`` lines of a domain's libvirt log on both hosts: libvirt's own
    word that the monitor passthrough tainted it (``domain`` defaults to the lab's guest)."""
    lines: list[str] = []
    for host in HOSTS:
        log = state.hosts[host].config.state_dir / "log" / "qemu" / f"{domain or state.domain}.log"
        if log.exists():
            text = log.read_text(errors="replace")
            lines += [x for x in text.splitlines() if "custom-monitor" in x]
    return lines


def where(state: LabState) -> HostName:
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
        hosts = " and ".join(running) or "no host"
        raise LabError(f"guest {state.domain} runs on {hosts}; cannot tell where to migrate from")
    return running[0]


def probe_rtt(
    lab_dir: Path | None = None,
    *,
    host: HostName | None = None,
    port: int | None = None,
    samples: int = 5,
) -> RttProbe:
    """Median TCP connect time from the client namespace to a host (default: the guest's
    SPICE port on the host it runs on). One connect = one round trip."""
    state = require_state((lab_dir or default_lab_dir()).absolute())
    if port is None:
        on = host or where(state)
        endpoint = spice_endpoint(state, on)
        if endpoint is None:
            raise LabError(f"no SPICE server for {state.domain} on host {on}")
        address, port = endpoint.address, endpoint.port or endpoint.tls_port
        assert port is not None  # spice_endpoint returns None without either port
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


def set_client_rtt(lab_dir: Path | None, rtt_ms: float) -> delaybridge.BridgeStats:
    """Change the client's round-trip time on the running lab."""
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with locked(lab_dir):
        state = require_state(lab_dir)
        stats = delaybridge.set_rtt(state.bridge.control, rtt_ms)
        state.bridge.rtt_ms = rtt_ms
        save(state)
        return stats


def set_client_impairment(
    lab_dir: Path | None,
    *,
    loss_pct: float | None = None,
    jitter_ms: float | None = None,
    jitter_dist: delaybridge.JitterDist | None = None,
    seed: int | None = None,
) -> delaybridge.BridgeStats:
    """Change the client link's loss and jitter on the running lab (both directions).

    Not kept in the lab state: a restarted bridge starts clean (``lab status`` shows what
    the running bridge applies)."""
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with locked(lab_dir):
        state = require_state(lab_dir)
        if seed is not None:
            delaybridge.reseed(state.bridge.control, seed)
        return delaybridge.set_impairment(
            state.bridge.control, loss_pct=loss_pct, jitter_ms=jitter_ms, jitter_dist=jitter_dist
        )
