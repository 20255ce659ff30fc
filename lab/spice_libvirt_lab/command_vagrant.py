"""``spice-libvirt lab ...`` for the Vagrant lab (``lab up --vagrant``).

:mod:`spice_libvirt_lab.command` dispatches here when ``--vagrant`` is given to ``up``, or when
``<lab dir>/vagrant`` holds a Vagrant lab that is not down (:func:`lab_dir_if_up`). The lab
itself is :mod:`spice_libvirt_lab.vagrant_lab` (up, down) and
:mod:`spice_libvirt_lab.vagrant_migrate`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spice_libvirt.cli.render import print_hold, print_report
from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.progress import make_reporter
from spice_libvirt_lab.command_libvirt import refuse


def add_up_argument(up: argparse.ArgumentParser) -> None:
    """``lab up --vagrant``."""
    up.add_argument(
        "--vagrant",
        action="store_true",
        help=(
            "two hypervisor VMs (hv1, hv2) on vagrant-libvirt, provisioned with ansible/lab.yml "
            "over ssh; the guest on hv1, this machine the SPICE client (minutes: TCG VMs)"
        ),
    )


def lab_dir_if_up(base: Path | None) -> Path | None:
    """The Vagrant lab's directory if it holds a lab that is not down, else None."""
    from spice_libvirt_lab.vagrant_lab import vagrant_lab_dir
    from spice_libvirt_lab.vagrant_state import load_state

    state = load_state(vagrant_lab_dir(base))
    return state.directory if state is not None and state.phase != "down" else None


def up(args: argparse.Namespace) -> int:
    from spice_libvirt_lab import vagrant_lab

    refuse(
        {
            "--libvirt": getattr(args, "libvirt", False),
            "--tls": getattr(args, "tls", False),
            "--guest linux": getattr(args, "guest", "firmware") != "firmware",
            "--memory": getattr(args, "memory", None) is not None,
            "--client-rtt-ms": getattr(args, "client_rtt_ms", None) is not None,
            "--ticket-file": getattr(args, "ticket_file", None) is not None,
            "--ticket-valid-s": getattr(args, "ticket_valid_s", None) is not None,
            "--domains": getattr(args, "domains", None) is not None,
            "--clients": getattr(args, "clients", None) is not None,
            "--agent": getattr(args, "agent", False),
        },
        "the Vagrant lab",
    )
    state = vagrant_lab.up(args.dir)
    if args.json:
        print(state.model_dump_json(indent=1))
        return int(ExitCode.OK)
    t = state.timings
    print(
        f"vagrant lab up in {state.directory} ({state.driver}): box {t.get('box')} s, "
        f"up {t.get('up')} s, provision {t.get('provision')} s, guest {t.get('guest')} s"
    )
    for name, host in state.hosts.items():
        print(
            f"  {name}: ssh -F {state.ssh_config} {name}   ({host.address}, {state.tcp_uri(name)})"
        )
    print(f"  ansible inventory: {state.inventory}")
    print(f"guest {state.domain} on {state.location}; 'lab migrate' moves it to the other host")
    return int(ExitCode.OK)


def migrate(args: argparse.Namespace) -> int:
    from spice_libvirt_lab import vagrant_migrate

    refuse(
        {
            "--grace": getattr(args, "grace", None) is not None,
            "--downtime-limit": getattr(args, "downtime_limit", None) is not None,
            "--max-bandwidth": getattr(args, "max_bandwidth", None) is not None,
            "--extend-ticket": getattr(args, "extend_ticket", None) is not None,
        },
        "the Vagrant lab",
    )
    reporter = make_reporter(quiet=args.json and not sys.stderr.isatty())
    options = {
        "require_seamless": args.require_seamless,
        "hold": "auto" if args.wait_client else "none",
        "completion_timeout": args.timeout,
        "plain": getattr(args, "plain", False),  # libvirt's own migration: the agent holds it
    }
    if args.link_timeout is not None:
        options["hold_timeout"] = args.link_timeout
    report, journals = vagrant_migrate.migrate(
        args.dir, watch=args.watch, reporter=reporter, options=options
    )
    if args.json:
        doc = json.loads(report.model_dump_json())
        doc["hook_journals"] = journals.model_dump()
        print(json.dumps(doc, indent=1))
    else:
        print_report(report, False)
        print_hold(report)
        for host, rows in journals.entries.items():
            print(f"hook journal on {host}: {len(rows)} entries, newest: {rows[:1]}")
    return int(for_report(report))


def status(args: argparse.Namespace) -> int:
    from spice_libvirt_lab.vagrant_lab import leftovers, vagrant_lab_dir
    from spice_libvirt_lab.vagrant_state import load_state

    state = load_state(vagrant_lab_dir(args.dir))
    if state is None:
        print(f"no Vagrant lab in {vagrant_lab_dir(args.dir)}")
        return int(ExitCode.LAB)
    alive = state.libvirtd is not None and state.libvirtd.alive()
    vms = state.libvirtd.names("domain") if state.libvirtd is not None and alive else []
    healthy = state.phase == "up" and alive and len(vms) == 2
    doc = {
        "kind": "vagrant",
        "directory": str(state.directory),
        "phase": state.phase,
        "healthy": healthy,
        "driver": state.driver,
        "vms": vms,
        "domain": state.domain,
        "location": state.location,
        "migrations": state.migrations,
        "last_outcome": state.last_outcome,
        "ansible_inventory": str(state.inventory),
        "ssh_config": str(state.ssh_config),
        "libvirt_uri": state.libvirtd.uri if state.libvirtd is not None else None,
        "timings": state.timings,
        "leftovers": leftovers(state) if state.phase == "down" else [],
    }
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(
            f"vagrant lab in {state.directory}: {state.phase}{'' if healthy else ' (NOT healthy)'}"
        )
        print(f"  VMs {vms or '-'} ({state.driver}); guest {state.domain} on {state.location}")
        print(f"  migrations {state.migrations}, last outcome {state.last_outcome}")
        print(f"  ansible inventory {state.inventory}; timings {state.timings}")
    return int(ExitCode.OK if healthy else ExitCode.LAB)


def down(args: argparse.Namespace) -> int:
    from spice_libvirt_lab import vagrant_lab

    report = vagrant_lab.down(args.dir)
    if args.json:
        print(report.model_dump_json(indent=1))
    else:
        print(f"vagrant lab down in {report.timings.get('down', 0)} s: removed {report.removed}")
        if report.leftovers:
            print(f"LEFT BEHIND: {report.leftovers}")
    return int(ExitCode.OK if not report.leftovers else ExitCode.LAB)


def build_parser() -> argparse.ArgumentParser:
    """``python -m spice_libvirt_lab.command_vagrant`` until ``spice-libvirt lab`` hooks these in."""
    from spice_libvirt.cli.migrate import add_common_arguments
    from spice_libvirt.exitcodes import exit_codes_epilog

    parser = argparse.ArgumentParser(
        prog="spice-libvirt-lab-vagrant",
        description="The Vagrant lab: hv1 and hv2 on vagrant-libvirt, provisioned by the role.",
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", type=Path, default=None, help="lab directory")
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    up_p = sub.add_parser("up", help="box, VMs, provisioning, guest on hv1")
    up_p.add_argument("--json", action="store_true")
    add_up_argument(up_p)  # accepted, as 'spice-libvirt lab up --vagrant' takes it
    up_p.set_defaults(handler=up)
    mig = sub.add_parser("migrate", help="move the guest to the other hypervisor")
    mig.add_argument("--no-watch", dest="watch", action="store_false", help="no embedded client")
    mig.add_argument(
        "--plain", action="store_true", help="libvirt's own migration: the host agent holds it"
    )
    add_common_arguments(mig)
    mig.set_defaults(handler=migrate, grace=None)
    for name, handler in (("status", status), ("down", down)):
        p = sub.add_parser(name, help=f"{name} of the Vagrant lab")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    from spice_libvirt.errors import SpiceLibvirtError
    from spice_libvirt.exitcodes import for_error

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except SpiceLibvirtError as exc:
        print(f"spice-libvirt: error: {exc}", file=sys.stderr)
        return int(for_error(exc))


if __name__ == "__main__":
    sys.exit(main())
