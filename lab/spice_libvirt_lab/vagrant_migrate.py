"""``lab migrate`` on the Vagrant lab: the guest goes to the other hypervisor VM.

The migration is the one ``spice-libvirt migrate DOMAIN --to qemu+tcp://hv2/system`` runs
(:func:`~spice_libvirt.libvirt.controller.migrate_libvirt`), driven from this machine over
the hypervisors' libvirt TCP listeners, with our embedded SPICE client attached from here as
the witness: this machine is the lab's SPICE client. The source libvirtd migrates peer to
peer and reaches the destination by its name, which ``lab.yml`` put into every host's
``/etc/hosts``; the client is sent to the destination's lab address (the graphics URI).

Before and after the migration both hosts' hook journals are read over ssh (``spice-libvirt
journal`` of the project the role installed): the entries added meanwhile show that the hook
saw the guest arrive on one host (``migrate``, ``prepare``, ``start``) and leave the other
(``stopped``, ``release``).
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from spice_libvirt.errors import LabError
from spice_libvirt.libvirt.controller import (
    LibvirtMigrationReport,
    LibvirtMigrationRequest,
    migrate_libvirt,
)
from spice_libvirt.migration.progress import ProgressReporter
from spice_libvirt.spice.client import ClientOptions
from spice_libvirt_lab.libvirt_state import PORT_CHANNEL
from spice_libvirt_lab.vagrant_lab import vagrant_lab_dir
from spice_libvirt_lab.vagrant_state import (
    HOST_IPS,
    HOSTS,
    VagrantLabState,
    load_state,
    remote_journal,
)
from spice_libvirt_lab.witness_thread import ThreadedWitness

#: TCG inside TCG: the client links slowly and QEMU answers slowly (see the README's numbers)
DEFAULT_HOLD_TIMEOUT_S = 60.0


def require_up(base: Path | None) -> VagrantLabState:
    state = load_state(vagrant_lab_dir(base))
    if state is None or state.phase != "up":
        raise LabError("no Vagrant lab is up: run 'lab up --vagrant' first")
    return state


def spice_port(state: VagrantLabState, host: str) -> int:
    """The guest's SPICE port on ``host``, from its live XML (libvirt chose it: autoport)."""
    from spice_libvirt_lab.libvirt_host import call_with_timeout, require_libvirt

    lv = require_libvirt()
    conn = call_with_timeout(lambda: lv.open(state.tcp_uri(host)), 60.0, f"connect to {host}")
    try:
        dom = conn.lookupByName(state.domain)
        root = ET.fromstring(dom.XMLDesc(0))
    finally:
        conn.close()
    graphics = root.find("./devices/graphics[@type='spice']")
    port = graphics.get("port") if graphics is not None else None
    if port is None or not port.isdigit() or int(port) <= 0:
        raise LabError(f"{state.domain} on {host} has no SPICE port")
    return int(port)


def request_for(
    state: VagrantLabState, source: str, destination: str, **options: Any
) -> LibvirtMigrationRequest:
    """What ``spice-libvirt migrate labvm --to qemu+tcp://DEST/system --allow-taint`` asks,
    from here: this machine drives the hypervisor VMs from outside, where the source QEMU's
    sockets cannot be read, and their guest is a firmware guest the taint-free hold cannot
    keep; the Vagrant lab allows the monitor passthrough (and its reports say so)."""
    options.setdefault("hold_timeout", DEFAULT_HOLD_TIMEOUT_S)
    options.setdefault("allow_taint", True)
    return LibvirtMigrationRequest(
        domain=state.domain,
        source_uri=state.tcp_uri(source),
        destination_uri=f"qemu+tcp://{destination}/system",
        destination_connect_uri=state.tcp_uri(destination),
        graphics_uri=f"spice://{HOST_IPS[destination]}",
        **{k: v for k, v in options.items() if v is not None},
    )


async def _migrate(
    request: LibvirtMigrationRequest,
    options: ClientOptions | None,
    reporter: ProgressReporter | None,
) -> LibvirtMigrationReport:
    if options is None:
        return await migrate_libvirt(request, None, reporter)
    witness = ThreadedWitness(options)
    async with witness:
        request = request.model_copy(update={"witness_one_way_ms": witness.one_way_ms})
        report = await migrate_libvirt(request, witness, reporter)
        report.notes.append(
            f"embedded client on this machine, RTT to the source {witness.rtt_ms} ms"
        )
        return report


class JournalCheck(BaseModel):
    """What each host's hook journal recorded for the guest during this migration."""

    #: host -> "operation suboperation outcome" of every entry newer than the migration's
    #: start on that host's own clock, newest first
    entries: dict[str, list[str]] = Field(default_factory=dict)
    #: the hook ran on both hosts for this migration
    seen_on_both: bool = False


def _journals(state: VagrantLabState) -> dict[str, list[dict[str, Any]]]:
    """Both hosts' journals for the guest, read over ssh at the same time."""
    with ThreadPoolExecutor(max_workers=len(HOSTS)) as pool:
        return dict(zip(HOSTS, pool.map(lambda h: remote_journal(state, h), HOSTS), strict=True))


def _newest_ts(rows: list[dict[str, Any]]) -> float:
    return max((float(r.get("ts") or 0.0) for r in rows), default=0.0)


def journal_check(state: VagrantLabState, before: dict[str, float]) -> JournalCheck:
    """The entries each host added since ``before`` (that host's newest timestamp then)."""
    check = JournalCheck()
    for host, rows in _journals(state).items():
        check.entries[host] = [
            f"{r.get('operation')} {r.get('suboperation')} {r.get('outcome')}"
            for r in rows
            if float(r.get("ts") or 0.0) > before.get(host, 0.0)
        ]
    check.seen_on_both = all(check.entries.get(h) for h in HOSTS)
    return check


def migrate(
    base: Path | None = None,
    *,
    watch: bool = True,
    reporter: ProgressReporter | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[LibvirtMigrationReport, JournalCheck]:
    """Move the guest to the other hypervisor; the verdict and both hosts' journals."""
    state = require_up(base)
    source = state.location
    destination = "hv2" if source == "hv1" else "hv1"
    request = request_for(state, source, destination, **(options or {}))
    client = None
    if watch:
        client = ClientOptions(
            host=HOST_IPS[source],
            port=spice_port(state, source),
            stream_port_name=PORT_CHANNEL,
            link_timeout=60.0,
        )
    before = {host: _newest_ts(rows) for host, rows in _journals(state).items()}
    t0 = time.monotonic()
    report = asyncio.run(_migrate(request, client, reporter))
    state.timings[f"migrate-{state.migrations + 1}"] = round(time.monotonic() - t0, 1)
    if report.migration.status == "completed":
        state.location = destination
    state.migrations += 1
    state.last_outcome = report.outcome
    state.save()
    return report, journal_check(state, before)
