"""Plain libvirt migration vs. the seamless controller, at several client RTTs, measured.

One two-host libvirt lab (:mod:`spice_libvirt_lab.libvirt_lab`); for each client RTT (set on
the lab's delaying bridge) and each method (``plain``: libvirt's own p2p migration, the
baseline; ``ours``: :func:`spice_libvirt_lab.libvirt_migrate.lab_migrate` with the hold) and each
client kind, N ping-pong migrations of the lab's guest (``--guest``):

* ``firmware`` (the default): the idle 256 MiB firmware guest, near-empty memory. It moves in
  ~1.4 s even at libvirt's speed floor, so the lab allows the controller the QMP throttle for
  it (``allow_taint``, :func:`spice_libvirt_lab.libvirt_state.lab_allows_taint`).
* ``memcheck``: the bare-metal guest that checks its own memory, ``--memory`` MiB of working
  set full of data (``lab up --libvirt --guest memcheck --memory M --dirty-mib-s R``), idle
  (``--dirty-mib-s 0``, the default) or rewriting R MiB/s. ``ours`` then runs the
  controller exactly as an operator does: its default hold, taint-free, no ``allow_taint``.

Each row records the guest, the hold policy and the hold applied, whether the monitor
passthrough was allowed, the controller's word on the taint and libvirt's own
(``custom-monitor`` lines that appeared in the domain's logs during the run), the commit
and whether the tree was dirty. Methods alternate run by run at each RTT.

* ``remote-viewer``: a *fresh* remote-viewer per run (a viewer that once fell back to
  switch-host refuses every later seamless migration, ``rtt-seamless.md`` pitfall 2), in the
  lab's client namespace C, under an Xvfb this script starts on a free display. Its
  ``SPICE_DEBUG=1`` log is the oracle: ``migrate-begin-seamless`` ... ``all channel
  migrated, success`` = seamless; ``migrate-switch-host`` = switch-host (display outage =
  from that line to the next ``display-2:0: channel up``); ``migrate-end`` = semi-seamless.
* ``embedded``: our own client (a fresh one per run) in C; its protocol record is the
  oracle and its display-channel blackout the outage.

Wall time is libvirt's ``migrateToURI3`` call. Everything started here is ended by PID; the
lab is torn down at the end (``--keep-lab`` keeps it).

``--tls`` runs the same on a TLS lab (``lab up --libvirt --tls``: per-host certificates,
``defaultMode='secure'``, the graphics URI with ``tlsPort``/``tlsSubject``): remote-viewer
then verifies the lab CA and each host's subject with every channel secure, our client
the same; each row records ``tls``, and the TLS handshakes' cost shows in the wall time
and the client's link time next to the plain-TCP table.

    .venv/bin/python benchmarks/bench_libvirt_rtt.py --rtts 0,50,150,300 --runs 10
    .venv/bin/python benchmarks/bench_libvirt_rtt.py --guest memcheck --rtts 0,50,150,300 \
        --runs 10 --clients remote-viewer --out benchmarks/results/libvirt-rtt-memcheck.jsonl
    .venv/bin/python benchmarks/bench_libvirt_rtt.py --tls --rtts 0,50,150,300 --runs 10 \
        --out benchmarks/results/libvirt-rtt-tls.jsonl
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from benchmarks.benchutil import arg_parser, fmt, machine, source_state
from spice_libvirt.libvirt.request import LibvirtMigrationReport, LibvirtMigrationRequest
from spice_libvirt.spice.record import ClientMigrationRecord
from spice_libvirt_lab import libvirt_lab
from spice_libvirt_lab.libvirt_lab import GuestKind
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from spice_libvirt_lab.libvirt_state import lab_allows_taint
from spice_libvirt_lab.libvirt_status import taint_lines
from spice_libvirt_lab.memcheck import MemcheckOptions
from tests.rigs.viewer import ViewerTls, log_time, start_viewer, viewer_outcome, xvfb

RESULTS_MD = Path(__file__).resolve().with_name("RESULTS-libvirt.md")
#: the TLS table goes beside the plain-TCP one, never over it
RESULTS_TLS_MD = RESULTS_MD.with_name("RESULTS-libvirt-tls.md")
#: method -> (plain, controller options, table label)
METHODS: dict[str, tuple[bool, dict[str, Any], str]] = {
    "plain": (True, {}, "plain `virsh migrate` (libvirt p2p)"),
    # the controller's default request (hold auto); the lab allows the QMP throttle for the
    # firmware guest only, every other guest is held taint-free as on a production host
    "ours": (False, {}, "ours (the controller's default hold)"),
    "ours-floor": (False, {"hold": "libvirt"}, "ours, taint-free hold (libvirt's 1 MiB/s floor)"),
    # the floor from QEMU's setup: the client's links and the memory transfer one after the
    # other (the default holds only the switchover, the bulk moving while the client links)
    "ours-bulk": (False, {"hold_mode": "bulk"}, "ours, the floor from the start (bulk hold)"),
    "nowait": (False, {"hold": "none"}, "ours without the hold (`--no-wait-client`: switch-host)"),
    # released 0.6 s after QEMU is active whatever the client did: at 150-300 ms it is
    # still linking, so it gets SWITCH_HOST in the middle (a late client)
    "late": (False, {"hold_timeout": 0.6}, "ours, hold cut at 0.6 s (a late client)"),
}


def method_spec(method: str) -> tuple[bool, dict[str, Any], str]:
    """A method of :data:`METHODS`, or ``ours-m<N>``: ours with a release margin of N ms,
    ``ours-e<N>``: with an embedded-client margin of N ms (the margin sweeps)."""
    if method in METHODS:
        return METHODS[method]
    if method.startswith("ours-e"):
        margin = float(method.removeprefix("ours-e"))
        return False, {"embedded_margin_ms": margin}, f"ours, embedded margin {margin:g} ms"
    margin = float(method.removeprefix("ours-m"))
    return False, {"release_margin_ms": margin}, f"ours, release margin {margin:g} ms"


def _commit() -> str | None:
    """The commit, with ``+dirty`` if the tree had uncommitted changes (other benchmarks'
    rows carry it in this one field)."""
    source = source_state()
    return f"{source.commit}+dirty" if source.commit and source.dirty else source.commit


class Run(BaseModel):
    rtt_ms: float
    method: str
    client: str
    index: int
    #: the oracle's word: remote-viewer's own log, or the embedded client's record
    outcome: str
    #: the controller's verdict (compared with the oracle: a misclassification if different)
    verdict: str | None = None
    #: the lab ran SPICE over TLS (every channel secure, CA and subject verified)
    tls: bool = False
    #: the lab's guest: firmware (near-empty) or memcheck (its working set full of data)
    guest: str = "firmware"
    memory_mib: int | None = None
    #: memcheck: MiB of its pages rewritten per second (0: idle)
    dirty_mib_s: int | None = None
    #: the controller's hold policy and what it applied (None: plain libvirt)
    hold_policy: str | None = None
    hold: str | None = None
    #: the controller was allowed the monitor passthrough (``allow_taint``)
    allow_taint: bool | None = None
    #: the controller's word that the domain was tainted, and libvirt's own: the
    #: ``custom-monitor`` lines that appeared in the domain's logs during this run
    tainted: bool | None = None
    taint_log_lines: int | None = None
    #: the hold's mode (``switchover``: the bulk at the domain's speed; ``bulk``: the floor
    #: from the start), and how long the speed was at the floor before the release
    hold_mode: str | None = None
    floor_ms: float | None = None
    #: where the controller counted the clients, and why it escalated to the QMP throttle
    census: str | None = None
    escalated: str | None = None
    #: the whole lab migration call (what a user waits for: hold, libvirt, verdict)
    total_s: float | None = None
    #: from libvirt's return to the verdict, and what made the evidence conclusive
    verdict_ms: float | None = None
    verdict_basis: str | None = None
    #: the client's last source channel closed, ms after libvirt returned (negative: before)
    left_source_ms: float | None = None
    #: the client's source channels seen leaving, of how many (the verdict's anchor)
    source_disconnects: str | None = None
    release_margin_ms: float | None = None
    #: seamless runs: how much later than needed the switchover came, from the viewer's own
    #: log: (first MIGRATE received - RTT/2) - (connections all ok + RTT/2); the release
    #: margin minus this is the smallest margin that would still have been seamless
    slack_ms: float | None = None
    load_1m: float | None = None
    commit: str | None = None
    #: the tree had uncommitted changes when the row was measured
    dirty: bool | None = None
    wall_s: float | None = None
    display_outage_s: float | None = None
    client_link_s: float | None = None
    held_ms: float | None = None
    released_after_ms: float | None = None
    rtt_estimate_ms: float | None = None
    release_reason: str | None = None
    error: str | None = None


def record_slack_ms(record: ClientMigrationRecord, rtt_ms: float) -> float | None:
    """The same spare time from our client's record: first MIGRATE received from the source
    minus the MIGRATE_CONNECTED_SEAMLESS it sent, minus one RTT."""
    sent = next((s.t_ms for s in record.steps if s.message == "MIGRATE_CONNECTED_SEAMLESS"), None)
    got = next((s.t_ms for s in record.steps if s.message == "MIGRATE" and s.side == "src"), None)
    if sent is None or got is None:
        return None
    return round(got - sent - rtt_ms, 1)


def slack_ms(segment: str, rtt_ms: float) -> float | None:
    """Spare time of a seamless run (see :attr:`Run.slack_ms`), or None."""
    lines = segment.splitlines()
    allok = next((log_time(x) for x in lines if "connections all ok" in x), None)
    migrate = next((log_time(x) for x in lines if "spice_channel_handle_migrate" in x), None)
    if allok is None or migrate is None:
        return None
    return round((migrate - allok) * 1000.0 - rtt_ms, 1)


# ---------------------------------------------------------------------- runs


def _migrate(lab_dir: Path, run: Run, *, watch: bool) -> LibvirtMigrationReport:
    """One lab migration by ``run.method``; the report's figures copied into ``run``."""
    plain, options, _ = method_spec(run.method)
    state = libvirt_lab.load_state(lab_dir)
    assert state is not None
    run.guest = state.guest
    if state.memcheck is not None:
        run.memory_mib = state.memcheck.working_set_mib
        run.dirty_mib_s = state.memcheck.dirty_mib_s
    run.load_1m = round(os.getloadavg()[0], 2)
    source = source_state()
    run.commit, run.dirty = source.commit, source.dirty
    taint_before = len(taint_lines(state))
    t0 = time.monotonic()
    report = lab_migrate(lab_dir, watch=watch, plain=plain, options=options)
    run.total_s = round(time.monotonic() - t0, 3)
    run.taint_log_lines = len(taint_lines(state)) - taint_before
    run.tainted = report.tainted or report.hold.tainted
    if not plain:
        # what lab_migrate's request gets: the option given, else the lab's rule
        run.allow_taint = bool(options.get("allow_taint", lab_allows_taint(state)))
        run.hold_policy = report.hold.policy
        run.hold = report.hold.applied
        run.census = report.hold.census
        run.escalated = report.hold.escalated
        run.hold_mode = report.hold.mode
        run.floor_ms = report.hold.floor_ms
    run.verdict = report.outcome
    run.wall_s = round((report.wall_ms or 0) / 1000.0, 3)
    run.verdict_ms = report.verdict_ready_ms
    run.verdict_basis = report.verdict_basis
    run.left_source_ms = report.client_left_source_ms
    run.source_disconnects = report.source_disconnects
    key = "embedded_margin_ms" if watch else "release_margin_ms"
    default = LibvirtMigrationRequest.model_fields[key].default
    held = not plain and options.get("hold") != "none"
    run.release_margin_ms = options.get(key, default) if held else None
    run.held_ms = report.hold.held_ms
    run.released_after_ms = report.hold.released_after_ms
    run.rtt_estimate_ms = report.hold.client_rtt_estimate_ms
    run.release_reason = report.hold.release_reason
    run.error = report.error
    return report


def _new_run(state: libvirt_lab.LabState, rtt: float, method: str, client: str, i: int) -> Run:
    """A row before its migration: what it measures and on which lab."""
    return Run(
        rtt_ms=rtt,
        method=method,
        client=client,
        index=i,
        outcome="?",
        tls=state.tls is not None,
        guest=state.guest,
    )


def _oracle(report: LibvirtMigrationReport) -> str:
    """The embedded client's own record, not the controller's verdict, as the oracle."""
    paths = [c.record.path for c in report.clients if c.record is not None]
    return paths[0] if paths else "no-record"


def run_viewer(lab_dir: Path, display: str, rtt: float, method: str, i: int, log_dir: Path) -> Run:
    state = libvirt_lab.load_state(lab_dir)
    assert state is not None
    where = state.active_host or "A"
    endpoint = libvirt_lab.spice_endpoint(state, where)
    assert endpoint is not None
    tls = None
    if state.tls is not None:
        assert endpoint.subject is not None  # a TLS lab names each host's subject
        tls = ViewerTls(state.tls.ca_cert, endpoint.subject)
    name = f"rv-{int(rtt)}-{method}-{i}"
    viewer = start_viewer(endpoint.uri, display, log_dir, name=name, tls=tls, ns=state.client.netns)
    run = _new_run(state, rtt, method, "remote-viewer", i)
    try:
        viewer.wait_channels(timeout=20.0)
        time.sleep(0.3)
        mark = len(viewer.log_text())
        _migrate(lab_dir, run, watch=False)
        deadline = time.monotonic() + 25.0
        while True:
            seen = viewer_outcome(viewer.log_text()[mark:])
            outcome, outage, link = seen.path, seen.display_outage_s, seen.link_s
            if outcome is not None or time.monotonic() > deadline:
                break
            if not viewer.alive():
                outcome = "lost"
                break
            time.sleep(0.1)
        run.outcome = outcome or "unknown"
        run.display_outage_s, run.client_link_s = outage, link
        if outcome == "seamless":
            run.slack_ms = slack_ms(viewer.log_text()[mark:], rtt)
        viewer.wait_relinked(mark)
    except Exception as exc:  # a broken run is recorded, not fatal
        run.outcome, run.error = "error", f"{type(exc).__name__}: {exc}"
    finally:
        viewer.stop()
    return run


def run_embedded(lab_dir: Path, rtt: float, method: str, i: int) -> Run:
    state = libvirt_lab.load_state(lab_dir)
    assert state is not None
    run = _new_run(state, rtt, method, "embedded", i)
    try:
        report = _migrate(lab_dir, run, watch=True)
        run.outcome = _oracle(report)
        for client in report.clients:
            if client.record is not None:
                black = client.record.blackout_ms.get("display:0")
                run.display_outage_s = round(black / 1000.0, 3) if black is not None else None
                rec = client.record
                if rec.connected_reply_at is not None and rec.started_at is not None:
                    run.client_link_s = round(rec.connected_reply_at - rec.started_at, 3)
                if rec.path == "seamless":
                    run.slack_ms = record_slack_ms(rec, rtt)
    except Exception as exc:
        run.outcome, run.error = "error", f"{type(exc).__name__}: {exc}"
    return run


# ---------------------------------------------------------------------- summary


def _med(values: list[float | None]) -> str:
    vs = [v for v in values if v is not None]
    if not vs:
        return "-"
    return f"{statistics.median(vs):.2f} ({min(vs):.2f}-{max(vs):.2f})"


#: the goal for the added wall time (remote-viewer), by client RTT in ms
ADDED_WALL_GOAL_S = {0.0: 0.1, 50.0: 0.3, 150.0: 0.6, 300.0: 1.2}


def _median(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def _cells(runs: list[Run]) -> list[tuple[float, str, str, list[Run]]]:
    order = list(dict.fromkeys(r.method for r in runs))
    keys = sorted(
        {(r.rtt_ms, r.client, r.method) for r in runs},
        key=lambda k: (k[0], k[1], order.index(k[2])),
    )
    return [
        (rtt, client, method, [r for r in runs if (r.rtt_ms, r.client, r.method) == key])
        for key in keys
        for rtt, client, method in [key]
    ]


def table(runs: list[Run]) -> str:
    """One row per (RTT, client, method): the oracle's counts, how often the controller's
    verdict agreed with it, the wall a user waits for, and the verdict phase."""
    head = (
        "| RTT ms | client | method | n | seamless | switch-host | other | verdict = oracle | "
        "total wall s, median (range) | verdict after libvirt ms, median (max) | "
        "migrateToURI3 s, median | display outage s, median | held ms, median | load 1m |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for rtt, client, method, rs in _cells(runs):
        seam = sum(r.outcome == "seamless" for r in rs)
        sw = sum(r.outcome == "switch-host" for r in rs)
        agree = sum(r.verdict == r.outcome for r in rs)
        verdict = [r.verdict_ms for r in rs if r.verdict_ms is not None]
        vcell = f"{statistics.median(verdict):.0f} ({max(verdict):.0f})" if verdict else "-"
        rows.append(
            f"| {rtt:g} | {client} | {method_spec(method)[2]} | {len(rs)} | **{seam}** | {sw} | "
            f"{len(rs) - seam - sw} | {agree}/{len(rs)} | {_med([r.total_s for r in rs])} | "
            f"{vcell} | {fmt(_median([r.wall_s for r in rs]), digits=2)} | "
            f"{fmt(_median([r.display_outage_s for r in rs]), digits=2)} | "
            f"{fmt(_median([r.held_ms for r in rs]), digits=0)} | "
            f"{fmt(_median([r.load_1m for r in rs]), digits=2)} |"
        )
    return head + "\n".join(rows) + "\n"


def added_table(runs: list[Run], baseline: str = "plain") -> str:
    """Added wall time per RTT and client: each method's median total minus plain's."""
    head = (
        "| RTT ms | client | method | plain total s | total s | added s | goal s | seamless | "
        "verdict ms, max | within 1 RTT + 100 ms |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for rtt, client, method, rs in _cells(runs):
        base = [r for r in runs if (r.rtt_ms, r.client, r.method) == (rtt, client, baseline)]
        if method == baseline or not base:
            continue
        plain_s, ours_s = _median([r.total_s for r in base]), _median([r.total_s for r in rs])
        added = ours_s - plain_s if ours_s is not None and plain_s is not None else None
        goal = ADDED_WALL_GOAL_S.get(rtt) if client == "remote-viewer" else None
        seamless = [r for r in rs if r.outcome == "seamless"]
        verdict = [r.verdict_ms for r in seamless if r.verdict_ms is not None]
        within = sum(v <= rtt + 100.0 for v in verdict)
        rows.append(
            f"| {rtt:g} | {client} | {method_spec(method)[2]} | {fmt(plain_s, digits=2)} | "
            f"{fmt(ours_s, digits=2)} | {fmt(added, digits=2)} | {fmt(goal, digits=1)} | "
            f"{len(seamless)}/{len(rs)} | {fmt(max(verdict) if verdict else None, digits=0)} | "
            f"{within}/{len(verdict)} |"
        )
    return head + "\n".join(rows) + "\n"


def margin_table(runs: list[Run]) -> str:
    """The release margin's distribution: per RTT and margin, each seamless run's spare time
    (``slack_ms``) and the smallest margin that would still have been seamless in it."""
    head = (
        "| client | RTT ms | margin ms | seamless / n | slack ms, min / median / max | "
        "smallest margin that would have held, ms: worst (max) / median |\n"
        "|---|---|---|---|---|---|\n"
    )
    rows = []
    keys = sorted(
        {(r.client, r.rtt_ms, r.release_margin_ms) for r in runs if r.release_margin_ms is not None}
    )
    needed_all: list[float] = []
    for client, rtt, margin in keys:
        assert margin is not None
        rs = [r for r in runs if (r.client, r.rtt_ms, r.release_margin_ms) == (client, rtt, margin)]
        rs = [r for r in rs if r.method not in {"late", "nowait"}]
        slack = [r.slack_ms for r in rs if r.outcome == "seamless" and r.slack_ms is not None]
        if not slack:
            continue
        needed = [margin - x for x in slack]
        needed_all += needed
        seam = sum(r.outcome == "seamless" for r in rs)
        rows.append(
            f"| {client} | {rtt:g} | {margin:g} | {seam}/{len(rs)} | {min(slack):.0f} / "
            f"{statistics.median(slack):.0f} / {max(slack):.0f} | {max(needed):.0f} / "
            f"{statistics.median(needed):.0f} |"
        )
    if not rows:
        return ""
    return (
        head
        + "\n".join(rows)
        + f"\n\nOver all {len(needed_all)} seamless runs the smallest margin that would still "
        f"have been seamless was at most {max(needed_all):.0f} ms (median "
        f"{statistics.median(needed_all):.0f} ms).\n"
    )


def guest_line(runs: list[Run]) -> str:
    """The guests the rows were measured on, in words."""
    kinds = dict.fromkeys(
        "idle 256 MiB firmware guest (near-empty memory)"
        if r.guest == "firmware"
        else f"memcheck guest, {r.memory_mib} MiB working set full of data, "
        + (f"rewriting {r.dirty_mib_s} MiB/s" if r.dirty_mib_s else "idle")
        for r in runs
    )
    return "; ".join(kinds) or "?"


def hold_line(runs: list[Run]) -> str:
    """How the controller's runs were held, and libvirt's word on the taint."""
    held = [r for r in runs if r.hold is not None]
    if not held:
        return ""
    applied = ", ".join(
        f"{h} {sum(r.hold == h for r in held)}" for h in dict.fromkeys(r.hold for r in held)
    )
    allowed = sum(bool(r.allow_taint) for r in held)
    tainted = sum(bool(r.taint_log_lines) for r in runs)
    return (
        f" The controller's runs: hold applied {applied}; monitor passthrough allowed in "
        f"{allowed}/{len(held)}; runs that added a `custom-monitor` line to the domain's log "
        f"{tainted}/{len(runs)}."
    )


def summary_md(runs: list[Run], argv: str, started: dt.datetime, seconds: float | None) -> str:
    info = machine(tools=["remote-viewer"])
    loads = [r.load_1m for r in runs if r.load_1m is not None]
    commits = list(dict.fromkeys(r.commit for r in runs if r.commit))
    span = " .. ".join(commits[:: max(1, len(commits) - 1)]) if commits else "?"
    dirty = sum(bool(r.dirty) for r in runs)
    return (
        f"Measured {started:%Y-%m-%d %H:%M} UTC, summarized by `{argv}`"
        f"{'' if seconds is None else f' ({seconds:.0f} s)'}, at commit {span} "
        f"({dirty} of {len(runs)} rows from a tree with uncommitted changes); {info.cpus} CPUs "
        f"({info.cpu_model}), kernel {info.kernel}, "
        f"{info.versions.get('remote-viewer', 'remote-viewer ?')}; load average "
        f"(1 min) during the runs {min(loads, default=0):.2f}-{max(loads, default=0):.2f} "
        f"(median {statistics.median(loads) if loads else 0:.2f}). Two-host libvirt lab, "
        f"{guest_line(runs)}.{hold_line(runs)} Raw rows: one JSON line per migration.\n\n"
        + table(runs)
        + "\n## Added wall time (medians, each method against plain in the same run)\n\n"
        + added_table(runs)
        + (f"\n## Release margin\n\n{margins}" if (margins := margin_table(runs)) else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__, summary=False)
    parser.add_argument("--rtt", "--rtts", dest="rtts", default="0,50,150,300")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--methods",
        default="plain,ours",
        help=f"of {', '.join(METHODS)}, or ours-m<N> (release margin N ms)",
    )
    parser.add_argument("--clients", default="remote-viewer,embedded")
    parser.add_argument(
        "--guest",
        choices=("firmware", "memcheck"),
        default="firmware",
        help="the lab's guest: firmware (idle, near-empty; the lab allows the QMP throttle "
        "for it) or memcheck (its memory full of data; held taint-free by default)",
    )
    parser.add_argument(
        "--memory",
        type=int,
        default=None,
        metavar="MIB",
        help="memcheck: its working set in MiB (256), as lab up --memory",
    )
    parser.add_argument(
        "--dirty-mib-s",
        type=int,
        default=None,
        metavar="R",
        help="memcheck: rewrite R MiB of its pages per second (0, the default: idle but full)",
    )
    parser.add_argument("--lab-dir", type=Path, default=None)
    parser.add_argument("--keep-lab", action="store_true")
    parser.add_argument(
        "--tls", action="store_true", help="a TLS lab (lab up --libvirt --tls, all secure)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file of the runs")
    parser.add_argument(
        "--write-results", action="store_true", help=f"write {RESULTS_MD.name} (or --results)"
    )
    parser.add_argument("--results", type=Path, default=None, help="the summary's file")
    parser.add_argument(
        "--from-rows",
        type=Path,
        default=None,
        help="no migration: print (and with --write-results write) the summary of these rows",
    )
    args = parser.parse_args(argv)
    if args.guest != "memcheck" and (args.memory, args.dirty_mib_s) != (None, None):
        parser.error("--memory, --dirty-mib-s: the memcheck guest only")
    options = None
    if args.guest == "memcheck":
        try:
            options = MemcheckOptions(
                working_set_mib=256 if args.memory is None else args.memory,
                dirty_mib_s=args.dirty_mib_s or 0,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            parser.error(f"memcheck guest: {first['loc'][0]}: {first['msg']}")
    if args.from_rows is not None:
        rows = [Run.model_validate_json(x) for x in args.from_rows.read_text().splitlines() if x]
        when = dt.datetime.fromtimestamp(args.from_rows.stat().st_mtime, dt.UTC)
        command = f"benchmarks/bench_libvirt_rtt.py --from-rows {args.from_rows}"
        text = summary_md(rows, command, when, None)
        print(text)
        if args.write_results:
            _write(args.results or RESULTS_MD, text, args.tls)
        return 0
    rtts = [float(x) for x in args.rtts.split(",")]
    methods = args.methods.split(",")
    for method in methods:
        try:
            method_spec(method)
        except ValueError:
            parser.error(f"unknown method {method!r}")
    clients = args.clients.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-libvirt-rtt-"))
    lab_dir = (args.lab_dir or work / "lab").absolute()
    out = args.out or work / "runs.jsonl"
    runs: list[Run] = []
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    existing = libvirt_lab.load_state(lab_dir)
    own_lab = existing is None
    if existing is None:
        guest: GuestKind = args.guest
        libvirt_lab.up(
            lab_dir,
            client_rtt_ms=rtts[0],
            tls=args.tls,
            guest=guest,
            memcheck_options=options,
        )
    elif args.tls != (existing.tls is not None):
        parser.error(f"--tls does not match the lab already up in {lab_dir}")
    elif (existing.guest, existing.memcheck) != (args.guest, options):
        parser.error(f"--guest/--memory/--dirty-mib-s do not match the lab up in {lab_dir}")
    print(f"raw rows: {out}; logs: {work}", flush=True)
    try:
        with xvfb(work) as xserver:
            display = xserver.display
            for rtt in rtts:
                libvirt_lab.set_client_rtt(lab_dir, rtt)
                # methods interleaved run by run: a load change hits plain and ours alike
                for i in range(args.runs):
                    for client in clients:
                        for method in methods:
                            if client == "remote-viewer":
                                run = run_viewer(lab_dir, display, rtt, method, i, work)
                            else:
                                run = run_embedded(lab_dir, rtt, method, i)
                            runs.append(run)
                            with out.open("a") as fh:
                                fh.write(run.model_dump_json() + "\n")
                            print(
                                f"{time.monotonic() - t0:7.1f}s rtt {rtt:g} {method:8} "
                                f"{client:13} #{i}: {run.outcome:12} verdict {run.verdict} "
                                f"total {run.total_s} s verdict {run.verdict_ms} ms "
                                f"load {run.load_1m} {run.error or ''}",
                                flush=True,
                            )
    finally:
        if own_lab and not args.keep_lab:
            libvirt_lab.down(lab_dir)
    seconds = time.monotonic() - t0
    command = "benchmarks/bench_libvirt_rtt.py " + " ".join(argv or sys.argv[1:])
    text = summary_md(runs, command, started, seconds)
    print(text)
    print(f"raw rows: {out}; logs: {work}; {seconds:.0f} s")
    if args.write_results:
        _write(args.results or (RESULTS_TLS_MD if args.tls else RESULTS_MD), text, args.tls)
    return 0


def _write(target: Path, text: str, tls: bool) -> None:
    title = "# Plain libvirt migration vs. the seamless controller, by client RTT"
    target.write_text(f"{title}{' (SPICE over TLS)' if tls else ''}\n\n{text}")
    print(f"wrote {target}")


if __name__ == "__main__":
    raise SystemExit(main())
