"""``spice-libvirt evacuate --from URI --to URI``: empty a host, seamlessly, a verdict each.

Exit code (:func:`spice_libvirt.exitcodes.for_evacuation`): the first failed domain's code
(7, or its error's code: that domain still runs on the source), else 11 if a channel lost
TLS, else 8 if a client fell back to semi-seamless or switch-host, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from spice_libvirt.cli import outcomes
from spice_libvirt.cli.migrate_libvirt import (
    add_allow_taint_argument,
    add_hold_mode_argument,
    add_migrate_tls_argument,
    allow_taint,
    migrate_tls,
)
from spice_libvirt.exitcodes import exit_codes_epilog, for_evacuation
from spice_libvirt.migration.progress import make_reporter

if TYPE_CHECKING:
    from spice_libvirt.libvirt.evacuate import DomainResult


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evacuate",
        help="migrate every running SPICE domain off a host, seamlessly",
        description=(
            "Migrate every running domain with SPICE graphics from one libvirt host to "
            "another (peer to peer), holding each switchover until its client is linked."
        ),
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--from",
        dest="from_uri",
        required=True,
        metavar="URI",
        help="libvirt URI of the host to drain",
    )
    parser.add_argument("--to", required=True, metavar="URI", help="as the source reaches it")
    parser.add_argument(
        "--to-connect", metavar="URI", help="how this machine reaches the destination"
    )
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="at a time (1)")
    parser.add_argument(
        "--domain",
        action="append",
        dest="domains",
        metavar="NAME",
        help="only these domains (repeatable)",
    )
    parser.add_argument("--plain", action="store_true", help="no hold (baseline)")
    parser.add_argument(
        "--hold-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="longest hold of a migration waiting for its client to link (15)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="per-domain completion bound (300)",
    )
    add_hold_mode_argument(parser)
    add_allow_taint_argument(parser)
    add_migrate_tls_argument(parser)
    parser.add_argument("--json", action="store_true", help="the report as one JSON object")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from spice_libvirt.libvirt.evacuate import evacuate

    reporter = make_reporter(quiet=args.json and not sys.stderr.isatty())
    report = asyncio.run(
        evacuate(
            args.from_uri,
            args.to,
            destination_connect_uri=args.to_connect,
            parallel=args.parallel,
            domains=args.domains,
            options={
                "plain": args.plain,
                "hold_timeout": args.hold_timeout,
                **({} if args.hold_mode is None else {"hold_mode": args.hold_mode}),
                "completion_timeout": args.timeout,
                "allow_taint": allow_taint(args),
                "migrate_tls": migrate_tls(args),
            },
            reporter=reporter,
        )
    )
    outcomes.record("evacuate", [_outcome(d, args.to) for d in report.domains])
    if args.json:
        print(report.model_dump_json(indent=1))
    else:
        for d in report.domains:
            wall = (
                f", migrateToURI3 {d.report.wall_ms:.0f} ms"
                if d.report and d.report.wall_ms
                else ""
            )
            print(f"{d.domain}: {d.outcome}{wall}" + (f" ({d.error})" if d.error else ""))
        for s in report.skipped:
            print(f"{s.domain}: skipped ({s.reason})")
        print(
            f"{len(report.domains)} domain(s) in {report.duration_ms / 1000:.1f} s: "
            + ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items()))
        )
    return int(for_evacuation(report))


def _outcome(result: DomainResult, destination: str) -> outcomes.Outcome:
    """One domain of the evacuation, as the journal and the textfile keep it."""
    if result.report is not None:
        return outcomes.of_report(result.report, result.domain, destination)
    return outcomes.Outcome(
        domain=result.domain,
        destination=destination,
        outcome="error" if result.error else result.outcome,
        reason=result.error or "",
    )
