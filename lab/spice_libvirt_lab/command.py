"""``spice-libvirt lab``: the one lab command line, for both lab kinds.

The built-in QEMU lab (two QEMUs on loopback, :mod:`spice_libvirt_lab.qemu_lab`) and the
two-host libvirt lab (``up --libvirt``, :mod:`spice_libvirt_lab.libvirt_lab`, handled in
:mod:`spice_libvirt_lab.command_libvirt`) share one lab directory
(:func:`spice_libvirt_lab.labdir.default_lab_dir`); ``migrate``, ``status`` and ``down`` act
on the libvirt lab when ``<lab dir>/libvirt`` holds one. ``lab up`` returns while the lab
keeps running; ``lab migrate`` ping-pongs the VM; ``lab down`` removes everything by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from spice_libvirt.cli.migrate import add_common_arguments, request_options
from spice_libvirt.cli.migrate_libvirt import add_hold_mode_argument
from spice_libvirt.cli.render import add_timeline_argument, print_report, save_timeline
from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt.exitcodes import ExitCode, exit_codes_epilog, for_report
from spice_libvirt.migration.progress import make_reporter
from spice_libvirt_lab import command_libvirt, command_vagrant, labdir, memcheck
from spice_libvirt_lab.command_libvirt import refuse


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="run a lab: two QEMUs on loopback, or two libvirt hosts (--libvirt)",
        description=(
            "Start, migrate, inspect and remove a lab: the built-in two-QEMU lab on "
            "loopback, or (up --libvirt) two libvirt hosts and a delayed client in network "
            "namespaces."
        ),
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=(
            f"lab directory, created private (default: ${labdir.LAB_DIR_ENV}, else "
            f"{labdir.ROOT_LAB_DIR} for root, a per-user directory otherwise)"
        ),
    )
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    _add_up(sub)
    _add_migrate(sub)
    _add_inspection(sub)


def _add_up(sub: Any) -> None:
    up = sub.add_parser("up", help="start the source (running) and the destination (incoming)")
    _add_guest_arguments(up)
    up.add_argument(
        "--tls", action="store_true", help="also listen on TLS ports (lab CA); clients use TLS"
    )
    up.add_argument(
        "--tls-mode",
        choices=("secure", "mixed", "tls-only"),
        default=None,
        help=(
            "with --tls: 'secure' (default) every channel refuses plain text (the plain port "
            "answers NEED_SECURED); 'mixed' plain links are accepted too (QEMU lab) or only "
            "main, inputs and cursor are secure (libvirt lab); 'tls-only' (libvirt lab) "
            "no plain port at all"
        ),
    )
    up.add_argument("--json", action="store_true", help="print the lab state as JSON")
    _add_libvirt_up_arguments(up)
    up.set_defaults(handler=_up)


def _add_guest_arguments(up: argparse.ArgumentParser) -> None:
    """What runs in the lab's VM(s): ``--guest`` and its memory and memcheck options."""
    up.add_argument(
        "--guest",
        choices=("firmware", "linux", "memcheck"),
        default="firmware",
        help="firmware: SeaBIOS only (nothing to move, migrates in ms); linux: a small kernel "
        "writing a record stream into a SPICE port channel; memcheck: a bare-metal program "
        "that fills its memory and checks it every second ('lab guest' shows its account)",
    )
    up.add_argument(
        "--memory",
        type=int,
        default=None,
        metavar="MIB",
        help="guest memory (256; 128 with --domains); memcheck: its working set (it gets "
        f"{memcheck.RESERVED_MIB} MiB more RAM)",
    )
    up.add_argument(
        "--dirty-mib-s",
        type=int,
        default=None,
        metavar="R",
        help="memcheck: rewrite R MiB of its pages per second (0, the default: idle but full "
        "of data)",
    )
    up.add_argument(
        "--pass-ms",
        type=int,
        default=None,
        metavar="MS",
        help="memcheck: verify the whole working set every MS ms (1000); the guest halts "
        "in between",
    )


def _add_libvirt_up_arguments(up: argparse.ArgumentParser) -> None:
    """``up --libvirt`` and the options only the libvirt lab takes."""
    up.add_argument(
        "--libvirt",
        action="store_true",
        help="the two-host libvirt lab (namespaces, two libvirtds, a delayed client C)",
    )
    command_vagrant.add_up_argument(up)
    up.add_argument(
        "--client-rtt-ms", type=float, default=None, metavar="MS", help="libvirt lab: client RTT"
    )
    up.add_argument(
        "--ticket-file",
        type=Path,
        default=None,
        metavar="F",
        help="libvirt lab: set this SPICE ticket on the guest through libvirt (never argv)",
    )
    up.add_argument(
        "--ticket-valid-s",
        type=float,
        default=None,
        metavar="S",
        help="libvirt lab: the ticket expires S seconds after 'lab up' (passwdValidTo)",
    )
    up.add_argument(
        "--domains",
        type=int,
        default=None,
        metavar="N",
        help="libvirt lab: N guests on host A, firmware or all memcheck with --guest memcheck "
        "(each with a client, see --clients)",
    )
    up.add_argument(
        "--clients",
        choices=("watch", "none"),
        default=None,
        help="libvirt lab with --domains: one 'spice-libvirt watch' client per domain in the "
        "client namespace (watch, the default) or none",
    )
    up.add_argument(
        "--agent",
        action="store_true",
        help="libvirt lab: run 'spice-libvirt agent run' inside each host, as a hypervisor "
        "would (migrations started by plain virsh become seamless)",
    )


def _add_migrate(sub: Any) -> None:
    mig = sub.add_parser("migrate", help="migrate to the other side (and re-arm it)")
    mig.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="no embedded client: another client (remote-viewer) is the one connected",
    )
    add_common_arguments(mig)
    add_timeline_argument(mig)
    # None = not given: the libvirt lab refuses QEMU-only options instead of ignoring them
    mig.set_defaults(grace=None)
    mig.add_argument(
        "--extend-ticket",
        type=float,
        default=None,
        metavar="S",
        help="libvirt lab: extend a SPICE ticket that would expire before the client links "
        "(to now + S s; VDSM uses 120), instead of refusing",
    )
    mig.add_argument(
        "--plain",
        action="store_true",
        help="libvirt and Vagrant labs: libvirt's own p2p migration without our hold (the "
        "baseline; a running host agent holds it)",
    )
    mig.set_defaults(handler=_migrate)


def _add_inspection(sub: Any) -> None:
    """status, down, rtt, evacuate, guest and purge."""
    st = sub.add_parser("status", help="show the lab")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(handler=_status)

    down = sub.add_parser("down", help="stop everything the lab started (by PID)")
    down.add_argument("--json", action="store_true", help="print what was stopped as JSON")
    down.add_argument(
        "--keep-logs", action="store_true", help="libvirt lab: keep libvirtd and QEMU logs"
    )
    down.set_defaults(handler=_down)

    rtt = sub.add_parser("rtt", help="libvirt lab: measure (and --set) the client's RTT")
    rtt.add_argument("--set", type=float, dest="set_ms", metavar="MS", help="new RTT first")
    rtt.add_argument("--loss-pct", type=float, metavar="P", help="random loss each way, percent")
    rtt.add_argument("--jitter-ms", type=float, metavar="J", help="one-way jitter around RTT/2")
    rtt.add_argument(
        "--jitter-dist", choices=["uniform", "normal"], default=None, help="jitter's distribution"
    )
    rtt.add_argument("--seed", type=int, default=None, help="seed the loss/jitter RNG")
    rtt.add_argument(
        "--samples", type=int, default=5, help="TCP handshakes measured from the client (5)"
    )
    rtt.add_argument("--json", action="store_true", help="print the measured RTT as JSON")
    rtt.set_defaults(handler=_rtt)

    evac = sub.add_parser(
        "evacuate",
        help="libvirt lab: drain the host the guests run on (spice-libvirt evacuate)",
    )
    evac.add_argument("--parallel", type=int, default=1, metavar="P", help="at a time (1)")
    evac.add_argument("--plain", action="store_true", help="no hold: the baseline")
    add_hold_mode_argument(evac)
    evac.add_argument("--json", action="store_true", help="print per-domain verdicts as JSON")
    evac.set_defaults(handler=_evacuate)

    guest = sub.add_parser(
        "guest",
        help="the memcheck guests' own accounts: alive, errors, MiB verified, passes",
        description="Each memcheck guest's own account, read from its serial console on the "
        "host it runs on. Exit 10 when a guest is not alive or found errors.",
    )
    guest.add_argument("--json", action="store_true", help="print one object per domain")
    guest.set_defaults(handler=_guest)

    clients = sub.add_parser(
        "clients",
        help="libvirt lab with --domains: each domain's client's own verdicts, in order",
    )
    clients.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    clients.set_defaults(handler=_clients)

    purge = sub.add_parser("purge", help="libvirt lab: remove a lab whose state file is lost")
    purge.add_argument("prefix", help="its namespace prefix, e.g. slab1a2b3c")
    purge.add_argument("--json", action="store_true", help="print what was removed as JSON")
    purge.set_defaults(handler=command_libvirt.purge)


def _lab(args: argparse.Namespace) -> Any:
    from spice_libvirt_lab.qemu_lab import QemuLab

    return QemuLab(args.dir or labdir.default_lab_dir())


def _libvirt_dir(args: argparse.Namespace) -> Path | None:
    """The libvirt lab's directory (``<lab dir>/libvirt``) if it holds a libvirt lab."""
    from spice_libvirt_lab.libvirt_state import STATE_FILE

    path = labdir.libvirt_lab_dir(args.dir)
    return path if (path / STATE_FILE).exists() else None


def _up(args: argparse.Namespace) -> int:
    from spice_libvirt_lab.qemu_lab import dump, state_summary

    refuse({"--tls-mode without --tls": args.tls_mode is not None and not args.tls}, "lab up")
    if args.guest != "memcheck":
        refuse(
            {"--dirty-mib-s": args.dirty_mib_s is not None, "--pass-ms": args.pass_ms is not None},
            f"the {args.guest} guest (memcheck only)",
        )
    if args.vagrant:
        return command_vagrant.up(args)
    if args.tls_mode == "tls-only" and not args.libvirt:
        refuse({"--tls-mode tls-only": True}, "the QEMU lab (libvirt lab only)")
    if args.libvirt:
        from spice_libvirt_lab.libvirt_fleet import FLEET_MEMORY_MIB

        default_mib = 256 if args.domains is None else FLEET_MEMORY_MIB
        options = memcheck_options(args, default_mib)
        return command_libvirt.up(args, labdir.libvirt_lab_dir(args.dir), options)
    refuse(
        {
            "--client-rtt-ms": args.client_rtt_ms is not None,
            "--ticket-file": args.ticket_file is not None,
            "--ticket-valid-s": args.ticket_valid_s is not None,
            "--domains": args.domains is not None,
            "--clients": args.clients is not None,
            "--agent": args.agent,
        },
        "the QEMU lab (libvirt lab only)",
    )
    state = asyncio.run(
        _lab(args).up(
            args.guest,
            args.memory,
            tls=args.tls,
            tls_mode="mixed" if args.tls_mode == "mixed" else "secure",
            options=memcheck_options(args, 256),
        )
    )
    summary = state_summary(state)
    if args.json:
        print(dump(summary))
    else:
        src, dst = summary["source"], summary["destination"]
        print(f"lab up in {summary['directory']} ({summary['guest']}, {summary['accel']})")
        print(f"source:      {src['spice_uri']}  qmp {src['qmp']}  pid {src['pid']}")
        print(f"destination: {dst['spice_uri']}  qmp {dst['qmp']}  pid {dst['pid']}")
        if state.tls is not None:
            print(
                f"connect a viewer: remote-viewer --spice-ca-file={state.tls.ca_cert} "
                f"'--spice-host-subject={state.tls.subject}' --spice-secure-channels=all "
                f"'{src['spice_uri']}'  (TLS {state.tls.mode})"
            )
        else:
            print(f"connect a viewer: remote-viewer {src['spice_uri']}")
    return int(ExitCode.OK)


def memcheck_options(args: argparse.Namespace, default_mib: int) -> memcheck.MemcheckOptions | None:
    """The memcheck guest's options from ``lab up``'s arguments (None: another guest)."""
    if args.guest != "memcheck":
        return None
    memory = args.memory if args.memory is not None else default_mib
    given: dict[str, int] = {"working_set_mib": memory}
    if args.dirty_mib_s is not None:
        given["dirty_mib_s"] = args.dirty_mib_s
    if args.pass_ms is not None:
        given["pass_ms"] = args.pass_ms
    try:
        return memcheck.MemcheckOptions(**given)
    except ValueError as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        reason = f"{first['loc'][0]}: {first['msg']}" if first else str(exc)
        raise ConfigError(f"memcheck guest: {reason}") from None


def _guest(args: argparse.Namespace) -> int:
    """Print the memcheck guests' accounts; exit 10 if one is not alive or found errors."""
    if command_vagrant.lab_dir_if_up(args.dir) is not None:
        refuse({"lab guest": True}, "the Vagrant lab")
    if (path := _libvirt_dir(args)) is not None:
        from spice_libvirt_lab.libvirt_status import guest_accounts

        accounts = guest_accounts(path)
    else:
        accounts = _lab(args).guest_accounts()
    if args.json:
        print(json.dumps([a.model_dump(mode="json") for a in accounts], indent=1))
    else:
        for a in accounts:
            bad = f", first bad page {a.first_bad.page}" if a.first_bad else ""
            print(
                f"{a.domain}: {'alive' if a.alive else 'NOT ALIVE'} on "
                f"{a.host or 'no host'}, errors {a.errors}, passes {a.passes}, verified "
                f"{a.verified_mib} MiB, last report {a.last_report_age_s} s ago{bad}"
                + (f" ({a.fault})" if a.fault else "")
            )
    healthy = all(a.alive and a.errors == 0 for a in accounts)
    return int(ExitCode.OK if healthy else ExitCode.LAB)


def _migrate(args: argparse.Namespace) -> int:
    if command_vagrant.lab_dir_if_up(args.dir) is not None:
        return command_vagrant.migrate(args)
    if (path := _libvirt_dir(args)) is not None:
        return command_libvirt.migrate(args, path)
    refuse(
        {"--plain": args.plain, "--extend-ticket": args.extend_ticket is not None},
        "the QEMU lab (libvirt lab only)",
    )
    reporter = make_reporter(quiet=args.json and not sys.stderr.isatty())
    overrides = request_options(args)
    if overrides["grace"] is None:
        del overrides["grace"]  # the request's own default
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
    save_timeline(report, args.timeline)
    return int(for_report(report))


def _status(args: argparse.Namespace) -> int:
    if command_vagrant.lab_dir_if_up(args.dir) is not None:
        return command_vagrant.status(args)
    if (path := _libvirt_dir(args)) is not None:
        return command_libvirt.status(args, path)
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
    if command_vagrant.lab_dir_if_up(args.dir) is not None:
        return command_vagrant.down(args)
    if (path := _libvirt_dir(args)) is not None:
        return command_libvirt.down(args, path)

    stopped = asyncio.run(_lab(args).down())
    if args.json:
        print(json.dumps({"stopped_pids": stopped}))
    else:
        print(f"lab down: stopped {len(stopped)} QEMU(s) {stopped}" if stopped else "no lab was up")
    return int(ExitCode.OK)


def _libvirt_only(args: argparse.Namespace, command: str) -> Path:
    if (path := _libvirt_dir(args)) is None:
        raise LabError(
            f"no libvirt lab in {labdir.libvirt_lab_dir(args.dir)}: "
            f"'lab {command}' needs 'lab up --libvirt'"
        )
    return path


def _rtt(args: argparse.Namespace) -> int:
    return command_libvirt.rtt(args, _libvirt_only(args, "rtt"))


def _clients(args: argparse.Namespace) -> int:
    return command_libvirt.clients(args, _libvirt_only(args, "clients"))


def _evacuate(args: argparse.Namespace) -> int:
    return command_libvirt.evacuate(args, _libvirt_only(args, "evacuate"))
