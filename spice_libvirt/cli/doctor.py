"""``spice-libvirt doctor``: the readiness checks of :mod:`spice_libvirt.doctor`, as a table
or JSON, and exit code 13 (NOT_READY) when any check failed.

The role's verify step and ``ansible/evacuate.yml`` run ``doctor --json`` and stop on 13.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from spice_libvirt.exitcodes import ExitCode, exit_codes_epilog
from spice_libvirt.hook import install as hook_install

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "--  "}


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check that this hypervisor is ready for seamless SPICE migration",
        description=(
            "Read-only checks of this host, each with a one-line fix: hook installed and "
            "loaded by the running libvirtd, configuration valid, spice_address set, every "
            "running domain's SPICE reachable (not loopback), TLS files usable and not "
            "expiring soon, libvirt new enough for hooks/qemu.d/, peers' ports reachable, "
            "the code the hook shim and the agent's unit make root run writable by root only. "
            f"Exit {int(ExitCode.NOT_READY)} when a check failed (warnings do not count)."
        ),
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--connect",
        metavar="URI",
        default="qemu:///system",
        help="libvirt URI of this host's daemon, opened read-only (default: %(default)s)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="URI",
        help="a migration peer as a libvirt URI (qemu+tcp://hostB/system); its libvirt, "
        "migration and SPICE ports must be reachable (repeatable)",
    )
    parser.add_argument(
        "--hooks-dir",
        type=Path,
        default=hook_install.DEFAULT_HOOKS_DIR,
        help="libvirt's hook directory (default: %(default)s)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the hook's configuration file (default: $SPICE_LIBVIRT_CONFIG, else the one "
        "the installed shim names, else /etc/spice-libvirt/config.toml)",
    )
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=Path("/etc/pki/libvirt-spice"),
        help="SPICE TLS directory of qemu.conf's spice_tls_x509_cert_dir (default: %(default)s)",
    )
    parser.add_argument(
        "--tls-days",
        type=_days,
        default=30,
        metavar="N",
        help="fail when a certificate expires within N days (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="S",
        help="per connection attempt to a peer's port (default: %(default)s)",
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="checks for draining this host: the hook and spice_address (which only "
        "migrations into this host need) warn instead of failing",
    )
    parser.add_argument(
        "--agent-unit",
        type=Path,
        default=None,
        metavar="FILE",
        help="the host agent's systemd unit to check (default: spice-libvirt-agent.service in "
        "/etc/systemd/system, /lib/systemd/system or /usr/lib/systemd/system)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from spice_libvirt.doctor import diagnose

    report = diagnose(
        args.connect,
        hooks_dir=args.hooks_dir,
        config=args.config,
        peers=tuple(args.peer),
        tls_dir=args.tls_dir,
        tls_days=args.tls_days,
        timeout=args.timeout,
        drain=args.drain,
        agent_unit=args.agent_unit,
    )
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        width = max(len(c.name) for c in report.checks)
        for c in report.checks:
            print(f"{_MARK[c.status]}  {c.name:<{width}}  {c.detail}")
            if c.fix and c.status in ("fail", "warn"):
                print(f"      {'':<{width}}  fix: {c.fix}")
        verdict = "ready" if report.ready else "NOT READY"
        print(f"{report.host}: {verdict} for seamless SPICE migration", file=sys.stdout)
    return int(ExitCode.OK if report.ready else ExitCode.NOT_READY)
