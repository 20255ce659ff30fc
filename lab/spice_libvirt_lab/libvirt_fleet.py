"""A whole host of desktops: ``lab up --libvirt --domains N`` and ``lab evacuate``.

Maintenance drains a hypervisor that runs many desktops, each with a user attached. The lab
builds that: N guests on host A (the lab guest and ``<domain>-1`` ...; firmware guests, or
memcheck guests when the lab runs ``--guest memcheck``), each with
its own SPICE client in the client namespace -- a ``spice-libvirt watch --json`` process,
so every client is a separate program as a user's viewer is, behind the same delayed link.
The clients are lab processes (:mod:`~spice_libvirt_lab.libvirt_daemons`): recorded with
their PID and start time, listed by ``lab status``, stopped by ``lab down``.

:func:`lab_evacuate` drains the host the lab's guests run on through
:func:`spice_libvirt.libvirt.evacuate.evacuate` -- what ``spice-libvirt evacuate`` runs --
and adds each client's own account of its migration (the ``watch`` verdict line) to the
controller's per-domain verdict: evidence from both ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, computed_field

from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt.libvirt.evacuate import EvacuationReport, evacuate
from spice_libvirt.libvirt.preflight import spice_graphics
from spice_libvirt_lab import libvirt_daemons, netns
from spice_libvirt_lab.libvirt_domain import render_domain_xml
from spice_libvirt_lab.libvirt_host import call_with_timeout, libvirt_error
from spice_libvirt_lab.libvirt_state import (
    GuestKind,
    HostName,
    LabProcess,
    LabState,
    default_lab_dir,
    lab_allows_taint,
    locked,
    save,
)
from spice_libvirt_lab.libvirt_status import require_state, states_by_domain, where

#: ``lab up --domains N`` at most (each guest is a QEMU; each client a Python process)
MAX_DOMAINS = 64
#: the guests' memory when there are several and none was asked for
FLEET_MEMORY_MIB = 128
#: how long the clients may take to link (all of them start at once on a small machine)
CLIENTS_READY_S = 120.0
#: what ``spice-libvirt watch`` prints (stderr with ``--json``) once its session is up
_READY = "watching session"


def check_request(domains: int, *, tls: bool, ticket: bool) -> None:
    """Refuse what the fleet cannot do before anything starts."""
    if not 1 <= domains <= MAX_DOMAINS:
        raise ConfigError(f"--domains must be 1..{MAX_DOMAINS}, not {domains}")
    if domains > 1 and (tls or ticket):
        raise ConfigError(
            "--domains > 1 with --tls or --ticket-file: not supported (the TLS lab's guests "
            "use fixed SPICE ports, one guest per host)"
        )


def start_domains(state: LabState, count: int, memory_mib: int, timeout: float = 60.0) -> None:
    """Define and start ``count`` more guests on host A (recorded in the state): memcheck
    guests like the first when the lab runs memcheck, firmware guests otherwise."""
    guest: GuestKind = "memcheck" if state.guest == "memcheck" else "firmware"
    conn = state.host("A").open()
    try:
        for i in range(1, count + 1):
            name = f"{state.domain}-{i}"
            xml = render_domain_xml(
                name=name, memory_mib=memory_mib, guest=guest, memcheck=state.memcheck
            )
            state.extra_domains.append(name)
            save(state)
            try:
                define = functools.partial(conn.defineXML, xml)
                dom = call_with_timeout(define, timeout, f"define {name}")
                call_with_timeout(dom.create, timeout, f"start {name}")
            except LabError:
                raise
            except Exception as exc:
                raise libvirt_error(exc, f"start {name} on A") from exc
    finally:
        conn.close()


def spice_uris(state: LabState, host: HostName, names: list[str]) -> dict[str, str]:
    """``spice://ADDRESS:PORT`` of each domain on ``host``, as libvirt reports its graphics."""
    conn = state.host(host).open()
    try:
        uris: dict[str, str] = {}
        for name in names:
            graphics = spice_graphics(conn.lookupByName(name).XMLDesc(0))
            if graphics is None or graphics[1] is None:
                raise LabError(f"domain {name} has no plain SPICE port on host {host}")
            address = graphics[0] or state.hosts[host].config.ip
            uris[name] = f"spice://{address}:{graphics[1]}"
        return uris
    finally:
        conn.close()


def _client_files(state: LabState, domain: str) -> tuple[Path, Path]:
    base = state.run_dir / "clients"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{domain}.jsonl", base / f"{domain}.log"


def _spawn_client(state: LabState, domain: str, uri: str) -> LabProcess:
    """Start ``spice-libvirt watch --json URI`` in the client namespace (not yet recorded)."""
    verdicts, log = _client_files(state, domain)
    argv = [sys.executable, "-m", "spice_libvirt", "watch", uri, "--json", "--stream-port", ""]
    with verdicts.open("wb") as out, log.open("wb") as err:
        # `ip netns exec` execs in place: the PID is the client's own
        proc = subprocess.Popen(
            netns.exec_argv(state.client.netns, argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # a Ctrl-C of `lab up` must not end the clients
        )
    ref = netns.ProcRef.of(proc.pid, f"watch {domain}")
    return LabProcess(where="C", what=ref.what, proc=ref, log=log, domain=domain, address=uri)


def start_clients(
    state: LabState, timeout: float = CLIENTS_READY_S, attempts: int = 5, pause: float = 1.0
) -> None:
    """One ``spice-libvirt watch --json`` per domain in the client namespace; wait until
    every one of them has linked its session.

    A client that ended before it linked is started again (up to ``attempts`` in all,
    ``pause`` s more after each): a guest that was started a moment ago, on a machine busy
    starting many, can miss a first link -- and a refused connection ends a client at once,
    so the tries are spread out rather than spent in a second.
    """
    uris = spice_uris(state, "A", state.all_domains)
    for domain, uri in uris.items():
        libvirt_daemons.record(state, _spawn_client(state, domain, uri), client=True)
    tries = dict.fromkeys(uris, 1)
    not_before = dict.fromkeys(uris, 0.0)

    def ready() -> bool:
        done = True
        for i, client in enumerate(state.clients):
            assert client.log is not None
            assert client.domain is not None
            if _READY in client.log.read_text(errors="replace"):
                continue
            done = False
            if client.proc.alive():
                continue
            if tries[client.domain] >= attempts:
                raise LabError(
                    f"{client.what} exited after {attempts} tries "
                    f"(libvirt states by host: {states_by_domain(state).get(client.domain)}): "
                    f"{client.log.read_text()[-400:]}"
                )
            if time.monotonic() < not_before[client.domain]:
                continue
            not_before[client.domain] = time.monotonic() + pause * tries[client.domain]
            tries[client.domain] += 1
            state.clients[i] = _spawn_client(state, client.domain, uris[client.domain])
            save(state)
        return done

    netns.wait_for(ready, timeout=timeout, what="every domain's SPICE client to link", interval=0.2)


def restart_client(state: LabState, domain: str, timeout: float = CLIENTS_READY_S) -> None:
    """Stop ``domain``'s client (if any) and start a new one, linked once this returns:
    after the guest was replaced, or the client ended with its session."""
    old = [c for c in state.clients if c.domain == domain]
    netns.terminate([c.proc for c in old if c.proc.alive()], timeout=10.0)
    state.clients = [c for c in state.clients if c.domain != domain]
    uri = spice_uris(state, where(state), [domain])[domain]
    client = _spawn_client(state, domain, uri)
    libvirt_daemons.record(state, client, client=True)
    assert client.log is not None
    log = client.log

    def linked() -> bool:
        if _READY in log.read_text(errors="replace"):
            return True
        if not client.proc.alive():
            raise LabError(f"{client.what} exited: {log.read_text()[-400:]}")
        return False

    netns.wait_for(linked, timeout=timeout, what=f"the SPICE client of {domain} to link")


def bring_up(state: LabState, domains: int, memory_mib: int, clients: bool) -> None:
    """The fleet part of ``lab up``: more guests, then (``clients``) a client for each."""
    if domains > 1:
        start_domains(state, domains - 1, memory_mib)
    if clients:
        start_clients(state)


# --------------------------------------------------------------------------- evacuate


class ClientAccount(BaseModel):
    """What a domain's own client says of its migration (its ``watch`` verdict line)."""

    path: str | None = Field(description="seamless, semi-seamless, switch-host; None: no word")
    connection_id_kept: bool | None = None
    error: str | None = None


class LabEvacuation(BaseModel):
    source: HostName
    destination: HostName
    wall_s: float
    report: EvacuationReport
    clients: dict[str, ClientAccount] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def seamless(self) -> int:
        """Domains seamless by the controller's verdict *and* their client's own record."""
        return sum(
            1
            for d in self.report.domains
            if d.outcome == "seamless"
            and (d.domain not in self.clients or self.clients[d.domain].path == "seamless")
        )


def _verdict_lines(state: LabState) -> dict[str, int]:
    counts: dict[str, int] = {}
    for client in state.clients:
        assert client.domain is not None
        verdicts, _log = _client_files(state, client.domain)
        counts[client.domain] = len(verdicts.read_text().splitlines())
    return counts


def _accounts(state: LabState, before: dict[str, int], wait_s: float) -> dict[str, ClientAccount]:
    """Each client's first verdict line after ``before`` (waits up to ``wait_s`` for all)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(
        n <= before.get(d, 0) for d, n in _verdict_lines(state).items()
    ):
        time.sleep(0.1)
    accounts: dict[str, ClientAccount] = {}
    for domain, skip in before.items():
        verdicts, _log = _client_files(state, domain)
        lines = verdicts.read_text().splitlines()[skip:]
        if not lines:
            accounts[domain] = ClientAccount(path=None, error="the client reported no migration")
            continue
        with contextlib.suppress(ValueError):
            row: dict[str, Any] = json.loads(lines[0])
            accounts[domain] = ClientAccount(
                path=row.get("path"),
                connection_id_kept=row.get("connection_id_kept"),
                error=row.get("error"),
            )
    return accounts


def lab_evacuate(
    lab_dir: Path | None = None,
    *,
    parallel: int = 1,
    options: dict[str, Any] | None = None,
    client_wait_s: float = 15.0,
) -> LabEvacuation:
    """Drain the host the lab guest runs on to the other host; every domain's verdict."""
    lab_dir = (lab_dir or default_lab_dir()).absolute()
    with locked(lab_dir, timeout=600.0):
        state = require_state(lab_dir)
        if state.phase != "up":
            raise LabError(f"lab {state.id} is not up (phase {state.phase}); run 'lab down'")
        source = where(state)
        destination: HostName = "B" if source == "A" else "A"
        before = _verdict_lines(state)
        options = {
            "allow_taint": lab_allows_taint(state),
            "migrate_tls": state.tls is not None,
            **(options or {}),
        }
        t0 = time.monotonic()
        report = asyncio.run(
            evacuate(
                state.hosts[source].uri_unix,
                state.hosts[destination].uri_tcp,
                destination_connect_uri=state.hosts[destination].uri_unix,
                parallel=parallel,
                domains=state.all_domains,
                options=options,
            )
        )
        wall = time.monotonic() - t0
        if where(state) == destination:
            state.active_host = destination
            state.migrations += 1
            save(state)
        accounts = _accounts(state, before, client_wait_s) if state.clients else {}
        return LabEvacuation(
            source=source,
            destination=destination,
            wall_s=round(wall, 3),
            report=report,
            clients=accounts,
        )
