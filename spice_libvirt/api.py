"""The Python API for management tools: one call per job, a report model back.

oVirt/VDSM-style callers want neither a command line nor asyncio: :func:`migrate_domain`
and :func:`evacuate_host` block until done and return the pydantic reports the CLI prints
with ``--json`` (same fields, same outcomes). Errors are the typed tree of
:mod:`spice_libvirt.errors`; :func:`spice_libvirt.exitcodes.for_error` maps them to the
documented exit codes. Async callers use the ``*_async`` variants.
"""

from __future__ import annotations

import asyncio
from typing import Any

from spice_libvirt.libvirt.controller import migrate_libvirt
from spice_libvirt.libvirt.evacuate import EvacuationReport, evacuate
from spice_libvirt.libvirt.request import LibvirtMigrationReport, LibvirtMigrationRequest
from spice_libvirt.migration.policy import HoldPolicy
from spice_libvirt.migration.progress import ProgressReporter


async def migrate_domain_async(
    domain: str,
    to: str,
    *,
    source_uri: str = "qemu:///system",
    to_connect: str | None = None,
    graphics_uri: str | None = None,
    plain: bool = False,
    hold: HoldPolicy = "auto",
    require_seamless: bool = False,
    allow_taint: bool = False,
    migrate_tls: bool | None = None,
    reporter: ProgressReporter | None = None,
    **options: Any,
) -> LibvirtMigrationReport:
    """See :func:`migrate_domain`."""
    request = LibvirtMigrationRequest(
        domain=domain,
        source_uri=source_uri,
        destination_uri=to,
        destination_connect_uri=to_connect,
        graphics_uri=graphics_uri,
        plain=plain,
        hold=hold,
        require_seamless=require_seamless,
        allow_taint=allow_taint,
        migrate_tls=migrate_tls,
        **options,
    )
    return await migrate_libvirt(request, None, reporter)


def migrate_domain(
    domain: str,
    to: str,
    *,
    source_uri: str = "qemu:///system",
    to_connect: str | None = None,
    graphics_uri: str | None = None,
    plain: bool = False,
    hold: HoldPolicy = "auto",
    require_seamless: bool = False,
    allow_taint: bool = False,
    migrate_tls: bool | None = None,
    reporter: ProgressReporter | None = None,
    **options: Any,
) -> LibvirtMigrationReport:
    """Live-migrate ``domain`` from ``source_uri`` to ``to`` (peer to peer), seamlessly for
    its SPICE client, and return the verdict.

    ``to`` is the destination as the source libvirtd reaches it (``qemu+tcp://HOST/system``);
    ``to_connect`` is how *this* process reaches the destination libvirtd, when different.
    ``options`` are further :class:`~spice_libvirt.libvirt.controller.LibvirtMigrationRequest`
    fields (``hold_timeout``, ``release_margin_ms``, ``completion_timeout``, ...).

    Taint-free by default: libvirt's public API only, the clients read from the source
    QEMU's sockets (so call it on the source host, as root). ``allow_taint`` lets it use the
    monitor passthrough (``query-spice``; the QMP throttle for a guest the taint-free hold
    cannot keep), and libvirt then marks the domain tainted (``custom-monitor``).
    ``migrate_tls``: encrypt the guest's memory on the wire (``VIR_MIGRATE_TLS``); None:
    where this host is set up for it (the report's notes say which, and why).

    :raise LibvirtConnectError: a libvirtd is unreachable (exit code 3)
    :raise DomainNotFoundError: no such domain (exit code 9)
    :raise PreflightError: not running, no SPICE, incompatible destination, or a client on
        TLS the destination would accept in plain text (exit code 7; nothing was changed)
    A migration that fails is reported (``outcome`` failed/cancelled, ``source_resumed``,
    and ``placement``: where both libvirtds say the domain runs; anything but one host is
    exit code 12). Cancelling the call (``KeyboardInterrupt`` in :func:`asyncio.run`, a
    task's ``cancel()``) aborts the job and puts the bandwidth back before it unwinds.
    """
    return asyncio.run(
        migrate_domain_async(
            domain,
            to,
            source_uri=source_uri,
            to_connect=to_connect,
            graphics_uri=graphics_uri,
            plain=plain,
            hold=hold,
            require_seamless=require_seamless,
            allow_taint=allow_taint,
            migrate_tls=migrate_tls,
            reporter=reporter,
            **options,
        )
    )


async def evacuate_host_async(
    from_uri: str,
    to: str,
    *,
    to_connect: str | None = None,
    parallel: int = 1,
    domains: list[str] | None = None,
    reporter: ProgressReporter | None = None,
    **options: Any,
) -> EvacuationReport:
    """See :func:`evacuate_host`."""
    return await evacuate(
        from_uri,
        to,
        destination_connect_uri=to_connect,
        parallel=parallel,
        domains=domains,
        options=options,
        reporter=reporter,
    )


def evacuate_host(
    from_uri: str,
    to: str,
    *,
    to_connect: str | None = None,
    parallel: int = 1,
    domains: list[str] | None = None,
    reporter: ProgressReporter | None = None,
    **options: Any,
) -> EvacuationReport:
    """Migrate every running SPICE domain off ``from_uri`` to ``to``, ``parallel`` at a time;
    one verdict per domain (:class:`~spice_libvirt.libvirt.evacuate.EvacuationReport`).
    ``options`` are :class:`~spice_libvirt.libvirt.request.LibvirtMigrationRequest` fields
    for every domain (``allow_taint``, ``migrate_tls``, ``hold_timeout``, ...), taint-free
    by default.

    :raise LibvirtConnectError: the source libvirtd is unreachable (nothing was touched)
    """
    return asyncio.run(
        evacuate_host_async(
            from_uri,
            to,
            to_connect=to_connect,
            parallel=parallel,
            domains=domains,
            reporter=reporter,
            **options,
        )
    )


__all__ = [
    "evacuate_host",
    "evacuate_host_async",
    "migrate_domain",
    "migrate_domain_async",
]
