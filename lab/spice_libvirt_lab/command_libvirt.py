"""``spice-libvirt lab ...`` for the two-host libvirt lab (``lab up --libvirt``).

:mod:`spice_libvirt_lab.command` dispatches here when ``<lab dir>/libvirt`` holds a libvirt
lab (or ``--libvirt`` is given); ``lab migrate`` then runs the seamless controller
(``--plain``: libvirt's own migration, the baseline). The lab itself is
:mod:`spice_libvirt_lab.libvirt_lab`; this module only parses and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from spice_libvirt.cli.render import print_hold, print_report, save_timeline
from spice_libvirt.errors import ConfigError
from spice_libvirt.exitcodes import ExitCode, for_evacuation, for_report
from spice_libvirt.migration.progress import make_reporter
from spice_libvirt_lab.memcheck import MemcheckOptions


def refuse(options: dict[str, bool], where: str) -> None:
    """A usage error naming every given option that does not apply to this lab kind:
    accepted and ignored, an option would make the user believe it took effect."""
    given = [name for name, present in options.items() if present]
    if given:
        raise ConfigError(f"{', '.join(given)}: not applicable to {where}")


def up(args: argparse.Namespace, path: Path, options: MemcheckOptions | None) -> int:
    from spice_libvirt_lab import libvirt_lab
    from spice_libvirt_lab.libvirt_fleet import FLEET_MEMORY_MIB

    domains = 1 if args.domains is None else args.domains
    state = libvirt_lab.up(
        path,
        client_rtt_ms=args.client_rtt_ms or 0.0,
        guest=args.guest,
        memory_mib=args.memory or (256 if args.domains is None else FLEET_MEMORY_MIB),
        tls=args.tls,
        tls_mode=args.tls_mode or "secure",
        ticket_file=args.ticket_file,
        ticket_valid_s=args.ticket_valid_s,
        domains=domains,
        clients=args.domains is not None and args.clients != "none",
        agent=args.agent,
        memcheck_options=options,
    )
    spice = libvirt_lab.spice_endpoint(state, "A")
    if args.json:
        print(state.model_dump_json(indent=1))
        return int(ExitCode.OK)
    print(
        f"libvirt lab {state.id} up in {path}: guest {state.domain} on hostA, SPICE "
        f"{spice.uri if spice else '?'}, client namespace {state.client.netns} "
        f"(rtt {state.bridge.rtt_ms} ms)"
    )
    print(f"  A: {state.hosts['A'].uri_unix}\n  B: {state.hosts['B'].uri_unix}")
    if state.extra_domains:
        print(f"  {len(state.all_domains)} guests on hostA, {len(state.clients)} clients in C")
    if state.ansible_inventory is not None:
        print(f"  ansible inventory: {state.ansible_inventory}")
    if spice and state.tls is not None:
        print(
            f"  TLS {state.tls.mode}: CA {state.tls.ca_cert}, subjects "
            + ", ".join(f"{h}={s!r}" for h, s in state.tls.subjects.items())
        )
        secure = " --spice-secure-channels=all" if state.tls.mode != "mixed" else ""
        print(
            f"connect a viewer: ip netns exec {state.client.netns} remote-viewer "
            f"--spice-ca-file={state.tls.ca_cert} '--spice-host-subject={spice.subject}'"
            f"{secure} '{spice.uri}'"
        )
    elif spice:
        print(f"connect a viewer: ip netns exec {state.client.netns} remote-viewer {spice.uri}")
    return int(ExitCode.OK)


def migrate(args: argparse.Namespace, path: Path) -> int:
    from spice_libvirt_lab.libvirt_migrate import lab_migrate

    refuse(
        {
            "--grace": args.grace is not None,
            "--downtime-limit": args.downtime_limit is not None,
            "--max-bandwidth": args.max_bandwidth is not None,
        },
        "the libvirt lab (libvirt holds and releases the migration itself)",
    )
    reporter = make_reporter(quiet=args.json and not sys.stderr.isatty())
    options = {
        "require_seamless": args.require_seamless,
        "hold": "auto" if args.wait_client else "none",
        "hold_timeout": args.link_timeout,
        "completion_timeout": args.timeout,
        "extend_ticket_s": args.extend_ticket,
    }
    report = lab_migrate(
        path, watch=args.watch, plain=args.plain, reporter=reporter, options=options
    )
    print_report(report, args.json)
    if not args.json:
        print_hold(report)
    save_timeline(report, getattr(args, "timeline", None))
    return int(for_report(report))


def status(args: argparse.Namespace, path: Path) -> int:
    from spice_libvirt_lab import libvirt_lab

    st = libvirt_lab.status(path)
    if args.json:
        print(st.model_dump_json(indent=1))
        return int(ExitCode.OK if st.healthy else ExitCode.LAB)
    print(f"libvirt lab {st.id} in {path}: {'up' if st.healthy else 'BROKEN'}")
    print(f"guest {st.domain} on host {st.active_host}, SPICE {st.spice.uri if st.spice else '-'}")
    print(
        f"client namespace {st.client_netns}, rtt {st.client_rtt_ms} ms; migrations {st.migrations}"
    )
    for h in st.hosts:
        alive = "alive" if h.libvirtd_alive else "dead"
        print(f"  {h.name}: libvirtd pid {h.libvirtd_pid} {alive}, domains {h.domains}")
    for p in (*st.daemons, *st.clients):
        alive = "alive" if p.alive else "DEAD"
        print(f"  {p.where}: {p.what} pid {p.proc.pid} {alive} {p.address or ''}")
    if st.ansible_inventory is not None:
        print(f"ansible inventory: {st.ansible_inventory}")
    return int(ExitCode.OK if st.healthy else ExitCode.LAB)


def down(args: argparse.Namespace, path: Path) -> int:
    from spice_libvirt_lab import libvirt_lab

    report = libvirt_lab.down(path, keep_logs=args.keep_logs)
    if args.json:
        print(report.model_dump_json(indent=1))
    else:
        print(f"libvirt lab {report.id} down: stopped {', '.join(report.stopped) or 'nothing'}")
    return int(ExitCode.OK)


def evacuate(args: argparse.Namespace, path: Path) -> int:
    """Drain the host the lab's guests run on; one line per domain (both ends' verdicts)."""
    from spice_libvirt_lab import libvirt_fleet

    options: dict[str, Any] = {"plain": args.plain}
    if args.hold_mode is not None:
        options["hold_mode"] = args.hold_mode
    result = libvirt_fleet.lab_evacuate(path, parallel=args.parallel, options=options)
    if args.json:
        print(result.model_dump_json(indent=1))
        return int(for_evacuation(result.report))
    for d in result.report.domains:
        client = result.clients.get(d.domain)
        held = d.report.hold.held_ms if d.report is not None and d.report.hold else None
        print(
            f"{d.domain}: host{result.source} -> host{result.destination}, {d.outcome}"
            + (f", client: {client.path}" if client is not None else "")
            + (f", held {held:.0f} ms" if held else "")
            + (f" ({d.error})" if d.error else "")
        )
    print(
        f"{len(result.report.domains)} domain(s) in {result.wall_s:.1f} s at --parallel "
        f"{args.parallel}: {result.seamless} seamless by both ends; "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.report.counts.items()))
    )
    return int(for_evacuation(result.report))


def clients(args: argparse.Namespace, path: Path) -> int:
    """Per domain, its client's own verdicts in order; exit 10 when the lab has no client
    or one of them is gone."""
    from spice_libvirt_lab import libvirt_clients
    from spice_libvirt_lab.libvirt_status import require_state

    state = require_state(path)
    result = libvirt_clients.report(state)
    healthy = bool(result.domains) and all(h.alive for h in result.domains.values())
    if args.json:
        print(result.model_dump_json(indent=1))
        return int(ExitCode.OK if healthy else ExitCode.LAB)
    if not result.domains:
        print(f"libvirt lab {state.id}: no clients (lab up --libvirt --domains N)")
    for name, history in result.domains.items():
        paths = ", ".join(v.path or "?" for v in history.verdicts) or "no migration yet"
        alive = "alive" if history.alive else "GONE"
        print(f"{name}: {paths} (client pid {history.pid} {alive})")
    return int(ExitCode.OK if healthy else ExitCode.LAB)


def rtt(args: argparse.Namespace, path: Path) -> int:
    """Measure (and with ``--set`` first change) the client's round-trip time."""
    from spice_libvirt_lab import libvirt_lab

    if args.set_ms is not None:
        libvirt_lab.set_client_rtt(path, args.set_ms)
    impairment = (args.loss_pct, args.jitter_ms, args.jitter_dist, args.seed)
    if any(value is not None for value in impairment):
        libvirt_lab.set_client_impairment(
            path,
            loss_pct=args.loss_pct,
            jitter_ms=args.jitter_ms,
            jitter_dist=args.jitter_dist,
            seed=args.seed,
        )
    probe = libvirt_lab.probe_rtt(path, samples=args.samples)
    if args.json:
        print(probe.model_dump_json(indent=1))
    else:
        print(f"client -> {probe.target}: median {probe.median_ms} ms {probe.samples_ms}")
    return int(ExitCode.OK)


def purge(args: argparse.Namespace) -> int:
    """Remove a libvirt lab whose state file is lost, by its namespace prefix."""
    from spice_libvirt_lab import libvirt_lab

    report = libvirt_lab.purge(args.prefix)
    if args.json:
        print(report.model_dump_json(indent=1))
    else:
        found = ", ".join(report.namespaces_deleted) or "nothing"
        print(f"{args.prefix}: removed {found}")
    return int(ExitCode.OK if not report.leftovers else ExitCode.LAB)
