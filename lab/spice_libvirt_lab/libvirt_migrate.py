"""The libvirt lab driven by the seamless controller: ``lab migrate`` and extra domains.

:func:`lab_migrate` plugs :func:`~spice_libvirt.libvirt.controller.migrate_libvirt` into
:func:`spice_libvirt_lab.libvirt_lab.migrate` (which finds the source, ping-pongs and keeps
the lab's state); with ``watch`` our embedded client is connected from the lab's client
namespace C first, so the verdict carries its protocol record. ``plain`` is the baseline:
libvirt's own peer-to-peer migration, no hold, same verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spice_libvirt.errors import LabError, MigrationError
from spice_libvirt.libvirt.connection import Connection, call_blocking
from spice_libvirt.libvirt.controller import (
    LibvirtMigrationReport,
    LibvirtMigrationRequest,
    migrate_libvirt,
)
from spice_libvirt.migration.progress import ProgressReporter
from spice_libvirt_lab import libvirt_lab, libvirt_tls
from spice_libvirt_lab.libvirt_lab import HostName, LabState, MigrationResult
from spice_libvirt_lab.libvirt_state import LAB_TAINT_NOTE, lab_allows_taint
from spice_libvirt_lab.witness_thread import netns_witness


def lab_request(
    state: LabState, source: HostName, destination: HostName, domain: str | None = None, **kw: Any
) -> LibvirtMigrationRequest:
    """The request for a lab migration: p2p over the lab network, events over UNIX sockets;
    on a TLS lab the graphics URI names the destination's ``tlsPort`` and ``tlsSubject``;
    the monitor passthrough allowed for the firmware guest (:func:`lab_allows_taint`); the
    guest's memory over TLS on a TLS lab."""
    kw.setdefault("graphics_uri", libvirt_tls.graphics_uri(state, destination))
    kw.setdefault("allow_taint", lab_allows_taint(state))
    # a TLS lab's hosts are set up for migration TLS (libvirt_tls), the others are not;
    # said explicitly, since this machine's own qemu.conf says nothing about the lab's
    kw.setdefault("migrate_tls", state.tls is not None)
    return LibvirtMigrationRequest(
        domain=domain or state.domain,
        source_uri=state.hosts[source].uri_unix,
        destination_uri=state.hosts[destination].uri_tcp,
        destination_connect_uri=state.hosts[destination].uri_unix,
        **kw,
    )


async def _migrate_with_witness(
    state: LabState,
    request: LibvirtMigrationRequest,
    source: HostName,
    reporter: ProgressReporter | None,
) -> LibvirtMigrationReport:
    endpoint = libvirt_lab.spice_endpoint(state, source)
    if endpoint is None:
        raise LabError(f"no SPICE server for {state.domain} on host {source}")
    options = libvirt_tls.client_options(
        state, source, endpoint.address, endpoint.port, endpoint.tls_port
    )
    witness = netns_witness(options, state.client.netns)
    async with witness:
        request = request.model_copy(update={"witness_one_way_ms": witness.one_way_ms})
        report = await migrate_libvirt(request, witness, reporter)
        report.notes.append(
            f"embedded client in namespace {state.client.netns}, RTT to the source "
            f"{witness.rtt_ms} ms (TCP connect)"
        )
        return report


def lab_migrate(
    lab_dir: Path | None = None,
    *,
    watch: bool = True,
    plain: bool = False,
    reporter: ProgressReporter | None = None,
    options: dict[str, Any] | None = None,
    timeout: float = 300.0,
) -> LibvirtMigrationReport:
    """One lab migration (ping-pong) through the seamless controller; the verdict.

    A failed migration is returned as a report too (outcome failed/cancelled; the guest is
    still on the source, which :func:`libvirt_lab.migrate` checks).
    """

    def run(state: LabState, source: HostName, destination: HostName) -> LibvirtMigrationReport:
        request = lab_request(state, source, destination, plain=plain, **(options or {}))
        if watch:
            report = asyncio.run(_migrate_with_witness(state, request, source, reporter))
        else:
            report = asyncio.run(migrate_libvirt(request, None, reporter))
        if request.allow_taint:
            report.notes.append(LAB_TAINT_NOTE)
        return report

    return migrate_by_report(lab_dir, run, timeout=timeout)


#: one lab migration that returns the controller's report (it runs its own event loop)
ReportRun = Callable[[LabState, HostName, HostName], LibvirtMigrationReport]


def result_of(
    state: LabState, source: HostName, destination: HostName, report: LibvirtMigrationReport
) -> MigrationResult:
    """The lab's record of a migration the controller made, from its report."""
    return MigrationResult(
        domain=state.domain,
        source=source,
        destination=destination,
        method=report.method,
        ok=report.migration.status == "completed",
        wall_s=round((report.wall_ms or 0.0) / 1000.0, 3),
        error=report.error,
        detail={"outcome": report.outcome},
    )


def migrate_by_report(
    lab_dir: Path | None, run: ReportRun, *, timeout: float = 300.0
) -> LibvirtMigrationReport:
    """:func:`libvirt_lab.migrate` (ping-pong, the lab's state kept) with ``run`` as the
    migrator; the report, also of a migration that failed (the guest then still runs on
    the source, which :func:`libvirt_lab.migrate` checks)."""
    box: list[LibvirtMigrationReport] = []

    def migrator(
        state: LabState, source: HostName, destination: HostName, _timeout: float
    ) -> MigrationResult:
        report = run(state, source, destination)
        box.append(report)
        return result_of(state, source, destination, report)

    try:
        libvirt_lab.migrate(lab_dir, timeout=timeout, migrator=migrator)
    except MigrationError:
        if not box:
            raise
    return box[0]


async def start_extra_domains(
    lab_dir: Path | None, count: int, *, host: HostName = "A", memory_mib: int = 128
) -> list[str]:
    """Define and start ``count`` more firmware guests (``<domain>-1`` ...) on ``host``.

    For the evacuation tests; ``lab down`` destroys them with the rest.
    """
    state = libvirt_lab.load_state((lab_dir or libvirt_lab.default_lab_dir()).absolute())
    if state is None or state.phase != "up":
        raise LabError("no libvirt lab is up: run 'lab up --libvirt' first")
    names: list[str] = []
    async with await Connection.open(state.hosts[host].uri_unix) as conn:
        for i in range(1, count + 1):
            name = f"{state.domain}-{i}"
            xml = libvirt_lab.render_domain_xml(name=name, memory_mib=memory_mib)
            dom = await conn.call(functools.partial(conn.conn.defineXML, xml), f"define {name}")
            await call_blocking(dom.create, 60.0, f"start {name}")
            names.append(name)
    return names


async def remove_extra_domains(lab_dir: Path | None, names: list[str]) -> None:
    """Destroy and undefine the extra guests wherever they are (best effort)."""
    state = libvirt_lab.load_state((lab_dir or libvirt_lab.default_lab_dir()).absolute())
    if state is None:
        return
    for host in libvirt_lab.HOSTS:
        async with await Connection.open(state.hosts[host].uri_unix) as conn:
            for name in names:
                with contextlib.suppress(Exception):
                    dom = await conn.lookup(name)
                    with contextlib.suppress(Exception):
                        await conn.call(dom.destroy, f"destroy {name}")
                    with contextlib.suppress(Exception):
                        await conn.call(dom.undefine, f"undefine {name}")
