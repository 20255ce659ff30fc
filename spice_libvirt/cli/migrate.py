"""``spice-libvirt migrate``: a seamless SPICE live migration, with a verdict.

This module holds the QMP form (bare QEMU: ``--qmp-src SOCK --qmp-dst SOCK``); the
libvirt form is added next to it (see :data:`FORMS`). The options every form shares
(client address, policy, limits, ``--json``) and the mapping from a verdict to an exit
code live here too, so ``lab migrate`` behaves the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from spice_libvirt.errors import ConfigError
from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.progress import make_reporter
from spice_libvirt.qmp import QMPConnection
from spice_libvirt.report import MigrationReport

#: Forms of ``migrate``: (predicate on the parsed args, handler). The first match runs.
FORMS: list[tuple[Callable[[argparse.Namespace], bool], Callable[[argparse.Namespace], int]]] = []


def exit_code_for(report: MigrationReport) -> ExitCode:
    """seamless / no client -> OK; completed without keeping the client -> NOT_SEAMLESS;
    cancelled or failed -> MIGRATION_FAILED (the VM still runs on the source)."""
    if report.outcome in ("seamless", "no-client"):
        return ExitCode.OK
    if report.outcome in ("semi-seamless", "switch-host"):
        return ExitCode.NOT_SEAMLESS
    if report.migration.status == "completed":
        # the migration went through, but the verdict found the client's data broken
        return ExitCode.NOT_SEAMLESS
    return ExitCode.MIGRATION_FAILED


def print_report(report: MigrationReport, as_json: bool) -> None:
    """``--json``: the verdict as one JSON object on stdout; else a short human summary."""
    if as_json:
        print(report.model_dump_json(indent=1))
        return
    fig = report.migration
    print(f"outcome: {report.outcome}")
    link = report.link_wait
    if link.duration_ms is not None:
        print(
            f"client link wait: {link.result} in {link.duration_ms:.0f} ms "
            f"(+{link.grace_ms:.0f} ms grace, signal {link.signal})"
        )
    if fig.status:
        print(
            f"migration: {fig.status}, total {fig.total_time_ms} ms, downtime "
            f"{fig.downtime_ms} ms, setup {fig.setup_time_ms} ms, "
            f"{(fig.transferred_bytes or 0) / 2**20:.1f} MiB, {fig.passes} passes"
        )
    for client in report.clients:
        print(
            f"client {client.kind}: {client.path}, connection id "
            f"{client.connection_id_before} -> {client.connection_id_after} "
            f"({'kept' if client.connection_id_kept else 'not kept'}), "
            f"channels {len(client.channels_before)} -> {len(client.channels_after)}"
        )
        if client.record is not None and client.record.steps:
            print(f"  path: {client.record.path_summary()}")
        if client.stream is not None and (client.stream.records or client.stream.gaps):
            s = client.stream
            print(f"  stream: {s.records} records, {s.gaps} gaps, {s.duplicates} duplicates")
        if client.blackout_ms:
            worst = max(client.blackout_ms.items(), key=lambda kv: kv[1])
            print(f"  longest blackout: {worst[0]} {worst[1]:.1f} ms")
    if report.error:
        print(f"error ({report.error_phase}): {report.error}")
    for note in report.notes:
        print(f"note: {note}")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every form of ``migrate`` and by ``lab migrate``."""
    parser.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    parser.add_argument(
        "--require-seamless",
        action="store_true",
        help="abort before migrating (VM untouched) if the client does not link in time",
    )
    parser.add_argument(
        "--no-wait-client",
        dest="wait_client",
        action="store_false",
        help="do not wait for the client's links (diagnosis only: reproduces the race)",
    )
    parser.add_argument(
        "--link-timeout", type=float, default=10.0, metavar="S", help="link wait bound (10)"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=0.25,
        metavar="S",
        help="minimum pause after the destination shows every link (0.25)",
    )
    parser.add_argument("--downtime-limit", type=int, default=None, metavar="MS")
    parser.add_argument("--max-bandwidth", type=int, default=None, metavar="BYTES_PER_S")
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="cancel after S seconds (300)"
    )


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~spice_libvirt.controller.MigrationRequest` fields the common options set."""
    return {
        "require_seamless": args.require_seamless,
        "wait_client": args.wait_client,
        "link_timeout": args.link_timeout,
        "grace": args.grace,
        "downtime_limit_ms": args.downtime_limit,
        "max_bandwidth": args.max_bandwidth,
        "completion_timeout": args.timeout,
    }


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="migrate a VM with its SPICE client, seamlessly, and report",
        description=(
            "Migrate a VM and make its SPICE client follow seamlessly: tell the client where "
            "to go, wait until it has linked every channel to the destination, then migrate "
            "and report what the client saw."
        ),
    )
    qmp = parser.add_argument_group("bare QEMU (QMP)")
    qmp.add_argument("--qmp-src", metavar="SOCK", help="source QMP: unix path or host:port")
    qmp.add_argument("--qmp-dst", metavar="SOCK", help="destination QMP (QEMU with -incoming)")
    qmp.add_argument(
        "--migrate-uri", metavar="URI", help="migration stream target, e.g. tcp:10.0.0.2:4444"
    )
    client = parser.add_argument_group("where the SPICE client goes")
    client.add_argument(
        "--client-host",
        metavar="HOST",
        help="destination address as the client reaches it (default: destination's SPICE host)",
    )
    client.add_argument("--client-port", type=int, metavar="PORT")
    client.add_argument("--client-tls-port", type=int, metavar="PORT")
    client.add_argument("--cert-subject", metavar="DN", help="destination certificate subject")
    add_common_arguments(parser)
    from spice_libvirt.libvirt import migrate_form

    migrate_form.add_arguments(parser)
    parser.set_defaults(handler=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    for applies, handler in FORMS:
        if applies(args):
            return handler(args)
    raise ConfigError(
        "migrate: give DOMAIN --to URI (libvirt) or --qmp-src and --qmp-dst (bare QEMU)"
    )


async def _destination_spice(address: str) -> tuple[str | None, int | None, int | None]:
    from spice_libvirt.controller import parse_qmp_address

    async with QMPConnection.open(parse_qmp_address(address), name="dst", timeout=10) as qmp:
        spice = await qmp.execute("query-spice")
    return spice.get("host"), spice.get("port"), spice.get("tls-port")


def _migrate_qmp(args: argparse.Namespace) -> int:
    from spice_libvirt.controller import MigrationRequest, migrate_qemu

    if not args.qmp_dst or not args.migrate_uri:
        raise ConfigError("migrate --qmp-src needs --qmp-dst and --migrate-uri")
    host, port, tls_port = args.client_host, args.client_port, args.client_tls_port
    if host is None or (port is None and tls_port is None):
        dst_host, dst_port, dst_tls = asyncio.run(_destination_spice(args.qmp_dst))
        if host is None:
            if dst_host in (None, "", "0.0.0.0", "::", "[::]"):
                raise ConfigError(
                    "the destination's SPICE listens on a wildcard address: give --client-host"
                )
            host = dst_host
        if port is None and tls_port is None:
            port, tls_port = dst_port, dst_tls
    try:
        request = MigrationRequest(
            source_qmp=args.qmp_src,
            destination_qmp=args.qmp_dst,
            migrate_uri=args.migrate_uri,
            client_host=host,
            client_port=port,
            client_tls_port=tls_port,
            client_cert_subject=args.cert_subject,
            **request_options(args),
        )
    except ValueError as exc:
        raise ConfigError(f"migrate: {exc}") from exc
    reporter = make_reporter(quiet=args.json and not sys.stderr.isatty())
    report = asyncio.run(migrate_qemu(request, reporter=reporter))
    print_report(report, args.json)
    return int(exit_code_for(report))


FORMS.append((lambda args: bool(args.qmp_src), _migrate_qmp))


def _migrate_libvirt(args: argparse.Namespace) -> int:
    from spice_libvirt.libvirt import migrate_form

    return migrate_form.run(args)


FORMS.append((lambda args: bool(args.domain or args.to), _migrate_libvirt))
