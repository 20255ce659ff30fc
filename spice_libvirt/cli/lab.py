"""``spice-libvirt lab``: the built-in two-QEMU lab on loopback.

``lab up`` returns while both QEMUs keep running; ``lab migrate`` ping-pongs the VM
between them; ``lab status`` and ``lab down`` inspect and remove it. See
:mod:`spice_libvirt.lab.qemu_lab`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from spice_libvirt.cli.migrate import (
    add_common_arguments,
    exit_code_for,
    print_report,
    request_options,
)
from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.progress import make_reporter


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="run the built-in QEMU lab (two QEMUs on loopback)",
        description="Start, migrate, inspect and remove the built-in two-QEMU lab.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="lab directory (default: $SPICE_LIBVIRT_LAB_DIR or /run/spice-libvirt/lab)",
    )
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    up = sub.add_parser("up", help="start the source (running) and the destination (incoming)")
    up.add_argument("--guest", choices=("firmware", "linux"), default="firmware")
    up.add_argument("--memory", type=int, default=None, metavar="MIB")
    up.add_argument(
        "--tls", action="store_true", help="also listen on TLS ports (lab CA); clients use TLS"
    )
    up.add_argument("--json", action="store_true")
    up.add_argument(
        "--libvirt",
        action="store_true",
        help="the two-host libvirt lab (namespaces, two libvirtds, a delayed client C)",
    )
    up.add_argument(
        "--client-rtt-ms", type=float, default=0.0, metavar="MS", help="libvirt lab: client RTT"
    )
    up.set_defaults(handler=_up)

    mig = sub.add_parser("migrate", help="migrate to the other side (and re-arm it)")
    mig.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="no embedded client: another client (remote-viewer) is the one connected",
    )
    add_common_arguments(mig)
    mig.add_argument(
        "--plain",
        action="store_true",
        help="libvirt lab: libvirt's own p2p migration without the hold (the baseline)",
    )
    mig.set_defaults(handler=_migrate)

    st = sub.add_parser("status", help="show the lab")
    st.add_argument("--json", action="store_true")
    st.set_defaults(handler=_status)

    down = sub.add_parser("down", help="stop both QEMUs (by PID) and remove the state")
    down.add_argument("--json", action="store_true")
    down.set_defaults(handler=_down)


def _lab(args: argparse.Namespace) -> Any:
    from spice_libvirt.lab.qemu_lab import QemuLab

    return QemuLab(args.dir)


def _libvirt_dir(args: argparse.Namespace) -> Path | None:
    """The libvirt lab's directory (``<lab dir>/libvirt``) if it holds a libvirt lab."""
    from spice_libvirt.lab.qemu_lab import default_lab_dir

    path = ((args.dir or default_lab_dir()) / "libvirt").absolute()
    return path if (path / "state.json").exists() else None


def _up(args: argparse.Namespace) -> int:
    from spice_libvirt.lab.qemu_lab import dump, state_summary

    if args.libvirt:
        from spice_libvirt.libvirt import lab_cli

        return lab_cli.up(args)

    state = asyncio.run(_lab(args).up(args.guest, args.memory, tls=args.tls))
    summary = state_summary(state)
    if args.json:
        print(dump(summary))
    else:
        src, dst = summary["source"], summary["destination"]
        print(f"lab up in {summary['directory']} ({summary['guest']}, {summary['accel']})")
        print(f"source:      {src['spice_uri']}  qmp {src['qmp']}  pid {src['pid']}")
        print(f"destination: {dst['spice_uri']}  qmp {dst['qmp']}  pid {dst['pid']}")
        print(f"connect a viewer: remote-viewer {src['spice_uri']}")
    return int(ExitCode.OK)


def _migrate(args: argparse.Namespace) -> int:
    if (path := _libvirt_dir(args)) is not None:
        from spice_libvirt.libvirt import lab_cli

        return lab_cli.migrate(args, path)
    reporter = make_reporter(quiet=args.json and not sys.stderr.isatty())
    overrides = request_options(args)
    require = overrides.pop("require_seamless")
    wait_client = overrides.pop("wait_client")
    report = asyncio.run(
        _lab(args).migrate(
            watch=args.watch,
            wait_client=wait_client,
            require_seamless=require,
            reporter=reporter,
            request_overrides=overrides,
        )
    )
    print_report(report, args.json)
    return int(exit_code_for(report))


def _status(args: argparse.Namespace) -> int:
    if (path := _libvirt_dir(args)) is not None:
        from spice_libvirt.libvirt import lab_cli

        return lab_cli.status(args, path)
    status = asyncio.run(_lab(args).status())
    if args.json:
        print(status.model_dump_json(indent=1))
        return int(ExitCode.OK if status.up else ExitCode.LAB)
    if status.source is None or status.destination is None:
        print(f"no lab in {status.directory}")
        return int(ExitCode.LAB)
    print(f"lab in {status.directory}: {'up' if status.up else 'BROKEN'} ({status.guest})")
    print(f"migrations: {status.migrations}, last outcome: {status.last_outcome}")
    for side in (status.source, status.destination):
        print(
            f"{side.role:<12} {side.side} pid {side.pid} "
            f"{'alive' if side.alive else 'dead'} {side.qemu_status or '-'} {side.spice_uri}"
        )
    return int(ExitCode.OK if status.up else ExitCode.LAB)


def _down(args: argparse.Namespace) -> int:
    import json

    if (path := _libvirt_dir(args)) is not None:
        from spice_libvirt.libvirt import lab_cli

        return lab_cli.down(args, path)

    stopped = asyncio.run(_lab(args).down())
    if args.json:
        print(json.dumps({"stopped_pids": stopped}))
    else:
        print(f"lab down: stopped {len(stopped)} QEMU(s) {stopped}" if stopped else "no lab was up")
    return int(ExitCode.OK)
