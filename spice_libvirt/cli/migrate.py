"""``spice-libvirt migrate``: a seamless SPICE live migration, with a verdict.

Two forms share one command: the QMP form (bare QEMU: ``--qmp-src SOCK --qmp-dst SOCK``),
here, and the libvirt form (``DOMAIN --to URI``) in :mod:`spice_libvirt.cli.migrate_libvirt`.
:data:`FORMS` names them explicitly, in the order they are tried. The options every form
shares (client address, policy, limits, ``--json``) live here too, so ``lab migrate``
behaves the same way; the exit code comes from :func:`spice_libvirt.exitcodes.for_report`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from spice_libvirt.cli import migrate_libvirt, outcomes
from spice_libvirt.cli.render import add_timeline_argument, print_report, save_timeline
from spice_libvirt.errors import ConfigError, SpiceLibvirtError
from spice_libvirt.exitcodes import exit_codes_epilog, for_report
from spice_libvirt.migration.progress import make_reporter
from spice_libvirt.qemu.qmp import QMPConnection


class Form(NamedTuple):
    """One form of ``migrate``: when it applies to the parsed arguments, and what runs it."""

    name: str
    applies: Callable[[argparse.Namespace], bool]
    run: Callable[[argparse.Namespace], int]


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
    parser.add_argument(
        "--downtime-limit",
        type=int,
        default=None,
        metavar="MS",
        help="longest pause of the guest at the switchover (default: QEMU's or libvirt's)",
    )
    parser.add_argument(
        "--max-bandwidth",
        type=int,
        default=None,
        metavar="BYTES_PER_S",
        help="cap on the migration stream (default: unlimited)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="cancel after S seconds (300)"
    )


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~spice_libvirt.qemu.request.MigrationRequest` fields the common options set."""
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
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    client.add_argument(
        "--client-port",
        type=int,
        metavar="PORT",
        help="destination's plain SPICE port (default: its own)",
    )
    client.add_argument(
        "--client-tls-port",
        type=int,
        metavar="PORT",
        help="destination's TLS SPICE port as the client reaches it (default: its own)",
    )
    client.add_argument("--cert-subject", metavar="DN", help="destination certificate subject")
    add_common_arguments(parser)
    add_timeline_argument(parser)
    migrate_libvirt.add_arguments(parser)
    parser.set_defaults(handler=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    for form in FORMS:
        if form.applies(args):
            return form.run(args)
    raise ConfigError(
        "migrate: give DOMAIN --to URI (libvirt) or --qmp-src and --qmp-dst (bare QEMU)"
    )


async def _destination_spice(address: str) -> tuple[str | None, int | None, int | None]:
    from spice_libvirt.qemu.request import parse_qmp_address

    async with QMPConnection.open(parse_qmp_address(address), name="dst", timeout=10) as qmp:
        spice = await qmp.execute("query-spice")
    return spice.get("host"), spice.get("port"), spice.get("tls-port")


def _migrate_qmp(args: argparse.Namespace) -> int:
    from spice_libvirt.qemu.controller import migrate_qemu
    from spice_libvirt.qemu.request import MigrationRequest

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
    try:
        report = asyncio.run(migrate_qemu(request, reporter=reporter))
    except SpiceLibvirtError as exc:
        outcomes.record("migrate", [outcomes.failed(args.qmp_src, args.migrate_uri, exc)])
        raise
    outcomes.record("migrate", [outcomes.of_report(report, args.qmp_src, args.migrate_uri)])
    print_report(report, args.json)
    save_timeline(report, args.timeline)
    return int(for_report(report))


def _is_qmp_form(args: argparse.Namespace) -> bool:
    return bool(args.qmp_src)


#: The forms of ``migrate``, tried in this order; the first that applies runs.
FORMS: tuple[Form, ...] = (
    Form("qmp", _is_qmp_form, _migrate_qmp),
    Form("libvirt", migrate_libvirt.applies, migrate_libvirt.run),
)

__all__ = [
    "FORMS",
    "Form",
    "add_common_arguments",
    "print_report",
    "register",
    "request_options",
]
