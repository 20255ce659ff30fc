"""Host evacuation: migrate every running SPICE domain off a host, a verdict for each.

Maintenance empties a host; every desktop on it must follow seamlessly. The domains are
migrated through :func:`~spice_libvirt.libvirt.controller.migrate_libvirt` (each with its
own hold and release), ``parallel`` at a time. One domain failing never stops the others:
its error is recorded (the domain stays on the source) and the rest go on. Domains without
SPICE graphics are listed as skipped -- they are not ours to move.

With more than one at a time the holds keep libvirt's speed floor from QEMU's setup
(``hold_mode = "bulk"``) unless the options say otherwise: the migrations start one after
the other from this process, and with the switchover hold the first ones move their memory
at full speed while the next ones are still in their preflight and their clients still
link. On the 2-core lab, 8 guests of 256 MiB: 9.6-9.7 s with the switchover hold against
7.5-7.8 s with the floor from the start (``benchmarks/results/fleet-8-8591dec.jsonl``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from pydantic import BaseModel, Field

from spice_libvirt import errors
from spice_libvirt.exitcodes import ExitCode, for_error, for_evacuation, for_report
from spice_libvirt.libvirt.connection import Connection, require_libvirt
from spice_libvirt.libvirt.controller import migrate_libvirt
from spice_libvirt.libvirt.preflight import spice_graphics
from spice_libvirt.libvirt.request import LibvirtMigrationReport, LibvirtMigrationRequest
from spice_libvirt.migration.progress import ProgressReporter


class DomainResult(BaseModel):
    domain: str
    outcome: str = Field(description="the report's outcome, or 'failed' when it raised")
    exit_code: int
    report: LibvirtMigrationReport | None = None
    error: str | None = None
    error_type: str | None = None


class SkippedDomain(BaseModel):
    domain: str
    reason: str


class EvacuationReport(BaseModel):
    source_uri: str
    destination_uri: str
    started_at: dt.datetime
    duration_ms: float = 0.0
    parallel: int
    domains: list[DomainResult] = Field(default_factory=list)
    skipped: list[SkippedDomain] = Field(default_factory=list)
    #: outcome -> number of domains
    counts: dict[str, int] = Field(default_factory=dict)
    all_seamless: bool = False
    #: domains whose client lost TLS on some channel: never counted seamless
    tls_downgraded: list[str] = Field(default_factory=list)

    def exit_code(self) -> ExitCode:
        """The worst domain's code (the one policy of :mod:`spice_libvirt.exitcodes`)."""
        return for_evacuation(self)


def _unexpected(name: str, exc: BaseException) -> DomainResult:
    """A domain whose migration raised something outside the error tree (a bug)."""
    return DomainResult(
        domain=name,
        outcome="failed",
        exit_code=int(for_error(exc)),
        error=f"{type(exc).__name__}: {exc}",
        error_type=type(exc).__name__,
    )


async def spice_domains(
    source_uri: str, timeout: float = 15.0
) -> tuple[list[str], list[SkippedDomain]]:
    """Running domains on ``source_uri`` with SPICE graphics, and the ones skipped (why)."""
    lv = require_libvirt()
    async with await Connection.open(source_uri, timeout=timeout) as conn:
        doms = await conn.call(
            lambda: conn.conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE), "list domains"
        )
        chosen: list[str] = []
        skipped: list[SkippedDomain] = []
        for dom in doms:
            name = await conn.call(dom.name, "domain name")
            state = (await conn.call(dom.state, f"state of {name}"))[0]
            if state != lv.VIR_DOMAIN_RUNNING:
                skipped.append(SkippedDomain(domain=name, reason=f"not running (state {state})"))
                continue
            spice = spice_graphics(await conn.call(dom.XMLDesc, f"XML of {name}"))
            if spice is None or (spice[1] is None and spice[2] is None):
                skipped.append(SkippedDomain(domain=name, reason="no SPICE graphics"))
                continue
            chosen.append(name)
    return sorted(chosen), skipped


async def evacuate(
    source_uri: str,
    destination_uri: str,
    *,
    destination_connect_uri: str | None = None,
    parallel: int = 1,
    domains: list[str] | None = None,
    options: dict[str, Any] | None = None,
    reporter: ProgressReporter | None = None,
) -> EvacuationReport:
    """Migrate every running SPICE domain (or ``domains``) from source to destination.

    :raise LibvirtConnectError: the source libvirtd is unreachable (nothing was touched)
    :raise ConfigError: ``parallel`` < 1
    Per-domain failures are in the report, never raised.
    """
    if parallel < 1:
        raise errors.ConfigError("evacuate: --parallel must be at least 1")
    t0 = time.monotonic()
    report = EvacuationReport(
        source_uri=source_uri,
        destination_uri=destination_uri,
        started_at=dt.datetime.now(dt.UTC),
        parallel=parallel,
    )
    found, report.skipped = await spice_domains(source_uri)
    names = found if domains is None else [d for d in domains if d in found]
    if domains is not None:
        report.skipped += [
            SkippedDomain(domain=d, reason="not a running SPICE domain on the source")
            for d in domains
            if d not in found
        ]
    gate = asyncio.Semaphore(parallel)
    options = dict(options or {})
    if parallel > 1:
        options.setdefault("hold_mode", "bulk")

    async def one(name: str) -> DomainResult:
        async with gate:
            try:
                request = LibvirtMigrationRequest(
                    domain=name,
                    source_uri=source_uri,
                    destination_uri=destination_uri,
                    destination_connect_uri=destination_connect_uri,
                    **options,
                )
                result = await migrate_libvirt(request, None, reporter)
            except errors.SpiceLibvirtError as exc:
                return DomainResult(
                    domain=name,
                    outcome="failed",
                    exit_code=int(for_error(exc)),
                    error=str(exc),
                    error_type=type(exc).__name__,
                )
            return DomainResult(
                domain=name,
                outcome=result.outcome,
                exit_code=int(for_report(result)),
                report=result,
                error=result.error,
            )

    # one domain's unexpected error must never cancel another mid-hold: every domain's
    # task runs to its own end (each undoes its own job when cancelled)
    results = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
    report.domains = [
        r if isinstance(r, DomainResult) else _unexpected(n, r)
        for n, r in zip(names, results, strict=True)
    ]
    if any(isinstance(r, asyncio.CancelledError) for r in results):
        raise asyncio.CancelledError
    for d in report.domains:
        report.counts[d.outcome] = report.counts.get(d.outcome, 0) + 1
    report.tls_downgraded = [
        d.domain for d in report.domains if d.report is not None and d.report.tls_downgraded
    ]
    report.all_seamless = (
        bool(report.domains)
        and not report.tls_downgraded
        and all(d.outcome in ("seamless", "no-client") for d in report.domains)
    )
    report.duration_ms = round((time.monotonic() - t0) * 1000.0, 3)
    return report


__all__ = ["DomainResult", "EvacuationReport", "SkippedDomain", "evacuate", "spice_domains"]
