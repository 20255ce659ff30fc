"""The libvirt form of ``spice-libvirt migrate``: ``migrate DOMAIN --to URI``.

Kept apart from the QMP form so that the bare-QEMU command line does not import libvirt:
the controller is imported when this form runs, not when its options are registered.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from pydantic import ValidationError

from spice_libvirt.cli import outcomes
from spice_libvirt.cli.render import print_hold, print_report, save_timeline
from spice_libvirt.errors import ConfigError, SpiceLibvirtError, first_error
from spice_libvirt.exitcodes import for_report
from spice_libvirt.migration.progress import make_reporter

HOLD_CHOICES = ("auto", "qmp", "libvirt", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("libvirt (migrate DOMAIN --to URI)")
    group.add_argument("domain", nargs="?", metavar="DOMAIN", help="domain name or UUID")
    group.add_argument("--to", metavar="URI", help="destination, e.g. qemu+tcp://HOST/system")
    group.add_argument(
        "--from",
        dest="from_uri",
        default="qemu:///system",
        metavar="URI",
        help="source libvirt (qemu:///system)",
    )
    group.add_argument(
        "--to-connect",
        metavar="URI",
        help="how this machine reaches the destination libvirtd, if not as --to",
    )
    group.add_argument(
        "--graphics-uri", metavar="URI", help="spice://host[:port][?tlsPort=P&tlsSubject=DN]"
    )
    group.add_argument(
        "--plain",
        action="store_true",
        help="libvirt's own migration, no hold (the baseline; the verdict is still taken)",
    )
    group.add_argument(
        "--hold",
        choices=HOLD_CHOICES,
        default="auto",
        help="how to hold the switchover until the client linked: auto = libvirt's speed and "
        "downtime floors (taint-free), the QMP throttle only for a guest they cannot keep and "
        "only with --allow-taint; libvirt = the floors only; qmp = the throttle (--allow-taint)",
    )
    add_hold_mode_argument(group)
    add_allow_taint_argument(group)
    add_migrate_tls_argument(group)
    group.add_argument(
        "--release-margin-ms",
        type=float,
        default=None,
        metavar="MS",
        help="added after the client's estimated answer time (default 0: measured, "
        "benchmarks/RESULTS-libvirt-margin.md; may be negative)",
    )
    group.add_argument(
        "--extend-ticket",
        type=float,
        default=None,
        metavar="S",
        help="extend a SPICE ticket that would expire before the client links (to now + S s; "
        "VDSM uses 120) instead of refusing",
    )


def add_hold_mode_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--hold-mode",
        choices=("switchover", "bulk"),
        default=None,
        help="switchover: the memory moves at the domain's speed while the client links, "
        "libvirt's floor only as the first pass nears its end (migrate's default); bulk: the "
        "floor from the start, the client's links and the transfer one after the other "
        "(evacuate's default with --parallel above 1)",
    )


def add_allow_taint_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--allow-taint",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="may use libvirt's monitor passthrough (query-spice; the QMP throttle for a guest "
        "the taint-free hold cannot keep), which marks the domain tainted (custom-monitor); "
        "default: allow_taint in config.toml (false)",
    )


def add_migrate_tls_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--migrate-tls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encrypt the guest's memory on the wire (libvirt's VIR_MIGRATE_TLS); default: "
        "migrate_tls in config.toml (auto: where this host has migration TLS set up)",
    )


def migrate_tls(args: argparse.Namespace) -> bool | None:
    """``--migrate-tls``/``--no-migrate-tls``, else the host configuration's ``migrate_tls``
    (None: auto)."""
    if args.migrate_tls is not None:
        return bool(args.migrate_tls)
    from spice_libvirt.config import load_config

    return load_config().migrate_tls


def allow_taint(args: argparse.Namespace) -> bool:
    """``--allow-taint``/``--no-allow-taint``, else the host configuration's ``allow_taint``."""
    if args.allow_taint is not None:
        return bool(args.allow_taint)
    from spice_libvirt.config import load_config

    return load_config().allow_taint


def applies(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "domain", None) or getattr(args, "to", None))


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Request fields the shared ``migrate`` options set, in the libvirt form's terms."""
    return {
        "require_seamless": args.require_seamless,
        "hold": args.hold if args.wait_client else "none",
        "hold_timeout": args.link_timeout,
        **({} if args.hold_mode is None else {"hold_mode": args.hold_mode}),
        **({} if args.release_margin_ms is None else {"release_margin_ms": args.release_margin_ms}),
        "completion_timeout": args.timeout,
        "extend_ticket_s": args.extend_ticket,
        "allow_taint": allow_taint(args),
        "migrate_tls": migrate_tls(args),
    }


def run(args: argparse.Namespace) -> int:
    from spice_libvirt.libvirt.controller import LibvirtMigrationRequest, migrate_libvirt

    if not args.domain or not args.to:
        raise ConfigError("migrate: the libvirt form needs DOMAIN and --to URI")
    try:
        request = LibvirtMigrationRequest(
            domain=args.domain,
            source_uri=args.from_uri,
            destination_uri=args.to,
            destination_connect_uri=args.to_connect,
            graphics_uri=args.graphics_uri,
            plain=args.plain,
            **request_fields(args),
        )
    except ValidationError as exc:
        raise ConfigError(f"migrate: {first_error(exc)}") from exc
    reporter = make_reporter(quiet=args.json and not sys.stderr.isatty())
    try:
        report = asyncio.run(migrate_libvirt(request, None, reporter))
    except SpiceLibvirtError as exc:
        outcomes.record("migrate", [outcomes.failed(args.domain, args.to, exc)])
        raise
    outcomes.record("migrate", [outcomes.of_report(report, report.domain, args.to)])
    print_report(report, args.json)
    if not args.json:
        print_hold(report)
    save_timeline(report, getattr(args, "timeline", None))
    return int(for_report(report))
