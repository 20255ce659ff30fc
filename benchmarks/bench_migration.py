"""Migration benchmarks: seamless rate, client blackout, controller overhead.

Why: the project's claim is that waiting for the client's link before ``migrate`` turns a
race into a certainty, at a cost of about one client link time, and that a seamless
migration leaves the user dark for no longer than QEMU's own downtime. This script measures
exactly those three things on the built-in lab (two QEMUs on loopback, through the Python
API of :class:`~spice_libvirt_lab.qemu_lab.QemuLab`, with the embedded client attached):

(a) seamless rate with the link wait and without it (``wait_client=False``, the
    ``--no-wait-client`` equivalent), for the firmware guest (KVM) and the linux guest (TCG,
    streaming 32-byte records on the spiceport: gaps and duplicates are counted);
(b) per-channel blackout (median, p95) and the record stream's longest stall around the
    migration, against QEMU's reported downtime (goal: blackout <= downtime + 1 RTT +
    20 ms; loopback RTT ~ 0);
(c) controller overhead: the controller's whole wall time minus a bare ``migrate``'s
    (``migrate`` -> ``MIGRATION completed`` on two plain QEMUs with no client), against
    the client's link time (goal: overhead <= link time + 50 ms). The controller's fixed
    ``settle`` window (it watches the destination for a late session after SPICE finished)
    is reported apart: it is a chosen observation time, not work.

Run: ``.venv/bin/python benchmarks/bench_migration.py [--rounds N] [--linux-rounds N]
[--json]``. Raw rows go to ``benchmarks/results/migration-rounds.jsonl``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from benchmarks.benchutil import (
    Distribution,
    Machine,
    arg_parser,
    distribution,
    finish,
    fmt,
    machine,
    write_jsonl,
)
from spice_libvirt import errors
from spice_libvirt.migration.report import MigrationReport
from spice_libvirt.qemu.qmp import QMPConnection
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_lab import QemuLab
from spice_libvirt_lab.qemu_process import QemuGroup

Guest = Literal["firmware", "linux"]
Mode = Literal["wait", "no-wait"]
RTT_MS = 0.0  # loopback
BLACKOUT_MARGIN_MS = 20.0
OVERHEAD_MARGIN_MS = 50.0


class MigrationRow(BaseModel):
    """One migration through the controller, as the benchmark keeps it."""

    guest: Guest
    mode: Mode
    round: int
    outcome: str
    client_path: str | None
    duration_ms: float
    settle_ms: float
    phases_ms: dict[str, float]
    link_wait_ms: float | None
    link_result: str
    downtime_ms: int | None
    total_time_ms: int | None
    migrate_to_completed_ms: float | None
    blackout_ms: dict[str, float]
    stream_records: int | None = None
    stream_gaps: int | None = None
    stream_duplicates: int | None = None
    stream_max_stall_ms: float | None = None
    error: str | None = None
    #: the verdict's note on the client and the client's own error, when it had one
    client_note: str | None = None
    client_error: str | None = None


def _row(guest: Guest, mode: Mode, number: int, report: MigrationReport) -> MigrationRow:
    phases = {p.name: round(p.duration_ms, 3) for p in report.phases}
    client = report.clients[0] if report.clients else None
    stream = report.stream or (client.stream if client else None)
    return MigrationRow(
        guest=guest,
        mode=mode,
        round=number,
        outcome=report.outcome,
        client_path=client.path if client else None,
        duration_ms=round(report.duration_ms, 3),
        settle_ms=phases.get("settle", 0.0),
        phases_ms=phases,
        link_wait_ms=report.link_wait.duration_ms,
        link_result=report.link_wait.result,
        downtime_ms=report.migration.downtime_ms,
        total_time_ms=report.migration.total_time_ms,
        migrate_to_completed_ms=report.migration.migrate_to_completed_ms,
        blackout_ms=dict(client.blackout_ms) if client else {},
        stream_records=stream.records if stream and guest == "linux" else None,
        stream_gaps=stream.gaps if stream and guest == "linux" else None,
        stream_duplicates=stream.duplicates if stream and guest == "linux" else None,
        stream_max_stall_ms=stream.max_stall_ms if stream and guest == "linux" else None,
        error=report.error,
        client_note=client.note if client else None,
        client_error=client.record.error if client and client.record else None,
    )


async def controller_rounds(guest: Guest, rounds: int, workdir: Path) -> list[MigrationRow]:
    """``rounds`` migrations per mode, alternating wait / no-wait, on one lab.

    A QEMU that dies is recorded as an outcome of its own (``qemu-died``, with its log
    tail), and the lab is rebuilt so that the remaining rounds still run.
    """
    lab = QemuLab(workdir / f"lab-{guest}")
    rows: list[MigrationRow] = []
    await lab.up(guest)
    try:
        for number in range(1, rounds + 1):
            modes: tuple[Mode, ...] = ("wait", "no-wait")
            for mode in modes:
                try:
                    report = await lab.migrate(watch=True, wait_client=mode == "wait")
                except errors.LabError as exc:
                    rows.append(_broken_row(guest, mode, number, lab, exc))
                    print(f"  {guest} {mode} #{number}: {exc}; rebuilding the lab", file=sys.stderr)
                    await lab.down()
                    await lab.up(guest)
                    continue
                row = _row(guest, mode, number, report)
                rows.append(row)
                print(
                    f"  {guest} {mode:<7} #{number:<2} {row.outcome:<12}"
                    f" {row.duration_ms:7.1f} ms downtime {row.downtime_ms} ms"
                    f" blackout max {max(row.blackout_ms.values(), default=0):.1f} ms"
                    f"{(' error: ' + row.error) if row.error else ''}"
                    f"{(' client: ' + row.client_error) if row.client_error else ''}",
                    file=sys.stderr,
                )
    finally:
        await lab.down()
    return rows


def _broken_row(
    guest: Guest, mode: Mode, number: int, lab: QemuLab, exc: errors.LabError
) -> MigrationRow:
    tails = []
    for log in sorted(lab.directory.glob("lab-*.log")):
        text = log.read_text(errors="replace").strip()
        if text:
            tails.append(f"{log.name}: {text[-600:]}")
    return MigrationRow(
        guest=guest,
        mode=mode,
        round=number,
        outcome="qemu-died",
        client_path=None,
        duration_ms=0.0,
        settle_ms=0.0,
        phases_ms={},
        link_wait_ms=None,
        link_result="skipped",
        downtime_ms=None,
        total_time_ms=None,
        migrate_to_completed_ms=None,
        blackout_ms={},
        error=f"{exc}; " + " | ".join(tails),
    )


class BareRow(BaseModel):
    round: int
    wall_ms: float
    total_time_ms: int | None
    downtime_ms: int | None


async def bare_rounds(rounds: int, workdir: Path) -> list[BareRow]:
    """``migrate`` alone between two fresh firmware QEMUs, no client, no controller.

    The clock runs from sending ``migrate`` to reading the ``MIGRATION`` event with status
    ``completed`` (the ``events`` capability is switched on first, as the controller does).
    """
    rows = []
    for number in range(1, rounds + 1):
        async with QemuGroup(workdir / f"bare-{number}") as vms:
            port = free_tcp_port()
            src = await vms.start(name="src", guest="firmware")
            await vms.start(name="dst", guest="firmware", incoming=f"tcp:127.0.0.1:{port}")
            async with (
                QMPConnection.open(src.qmp_path, name="bare-src") as qmp,
                qmp.events("MIGRATION") as stream,
            ):
                await qmp.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]},
                )
                start = time.monotonic()
                await qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
                while True:
                    event = await stream.get(timeout=60)
                    status = event.data.get("status")
                    if status in ("completed", "failed", "cancelled"):
                        break
                wall = (time.monotonic() - start) * 1000
                if status != "completed":
                    raise RuntimeError(f"bare migration {number} ended {status}")
                info = await qmp.execute("query-migrate")
            rows.append(
                BareRow(
                    round=number,
                    wall_ms=round(wall, 3),
                    total_time_ms=info.get("total-time"),
                    downtime_ms=info.get("downtime"),
                )
            )
    return rows


# -- summaries --------------------------------------------------------------------------


class ModeSummary(BaseModel):
    guest: Guest
    mode: Mode
    migrations: int
    outcomes: dict[str, int]
    seamless_rate: float
    downtime_ms: Distribution
    duration_ms: Distribution
    link_wait_ms: Distribution
    blackout_ms: dict[str, Distribution]
    blackout_over_goal: int = 0
    blackout_checked: int = 0
    stream_gaps_total: int | None = None
    stream_duplicates_total: int | None = None
    stream_max_stall_ms: Distribution | None = None


class OverheadSummary(BaseModel):
    bare_wall_ms: Distribution
    controller_duration_ms: Distribution
    controller_without_settle_ms: Distribution
    settle_ms: Distribution
    link_wait_ms: Distribution
    overhead_ms_median: float | None
    overhead_without_settle_ms_median: float | None
    goal_ms: float | None
    goal_met_without_settle: bool
    phases_median_ms: dict[str, float]


class MigrationSummary(BaseModel):
    benchmark: str = "migration"
    machine: Machine
    modes: list[ModeSummary]
    overhead: OverheadSummary | None
    wall_time_s: float
    notes: list[str] = []


def summarise_mode(rows: list[MigrationRow]) -> ModeSummary:
    first = rows[0]
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    per_channel: dict[str, list[float]] = {}
    over = checked = 0
    for r in rows:
        for ch, ms in r.blackout_ms.items():
            per_channel.setdefault(ch, []).append(ms)
            if r.outcome == "seamless" and r.downtime_ms is not None:
                checked += 1
                over += ms > r.downtime_ms + RTT_MS + BLACKOUT_MARGIN_MS
    linux = first.guest == "linux"
    return ModeSummary(
        guest=first.guest,
        mode=first.mode,
        migrations=len(rows),
        outcomes=outcomes,
        seamless_rate=round(outcomes.get("seamless", 0) / len(rows), 3),
        downtime_ms=distribution([r.downtime_ms for r in rows if r.downtime_ms is not None]),
        duration_ms=distribution([r.duration_ms for r in rows]),
        link_wait_ms=distribution([r.link_wait_ms for r in rows if r.link_wait_ms is not None]),
        blackout_ms={ch: distribution(v) for ch, v in sorted(per_channel.items())},
        blackout_over_goal=over,
        blackout_checked=checked,
        stream_gaps_total=sum(r.stream_gaps or 0 for r in rows) if linux else None,
        stream_duplicates_total=sum(r.stream_duplicates or 0 for r in rows) if linux else None,
        stream_max_stall_ms=(
            distribution([r.stream_max_stall_ms or 0.0 for r in rows]) if linux else None
        ),
    )


def summarise_overhead(rows: list[MigrationRow], bare: list[BareRow]) -> OverheadSummary:
    # seamless migrations only: a failed one's wall time is a timeout, not the flow's cost
    wait = [
        r for r in rows if r.guest == "firmware" and r.mode == "wait" and r.outcome == "seamless"
    ]
    bare_med = statistics.median(b.wall_ms for b in bare)
    durations = [r.duration_ms for r in wait]
    no_settle = [r.duration_ms - r.settle_ms for r in wait]
    links = [r.link_wait_ms for r in wait if r.link_wait_ms is not None]
    overhead = statistics.median(durations) - bare_med
    overhead_ns = statistics.median(no_settle) - bare_med
    goal = statistics.median(links) + OVERHEAD_MARGIN_MS if links else None
    phase_names = sorted({p for r in wait for p in r.phases_ms})
    phases = {
        p: round(statistics.median(r.phases_ms.get(p, 0.0) for r in wait), 3) for p in phase_names
    }
    return OverheadSummary(
        bare_wall_ms=distribution([b.wall_ms for b in bare]),
        controller_duration_ms=distribution(durations),
        controller_without_settle_ms=distribution(no_settle),
        settle_ms=distribution([r.settle_ms for r in wait]),
        link_wait_ms=distribution(links),
        overhead_ms_median=round(overhead, 3),
        overhead_without_settle_ms_median=round(overhead_ns, 3),
        goal_ms=None if goal is None else round(goal, 3),
        goal_met_without_settle=goal is not None and overhead_ns <= goal,
        phases_median_ms=phases,
    )


async def run(
    rounds: int, linux_rounds: int, bare: int, keep: bool, *, save: bool = True
) -> MigrationSummary:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="slb-mig-"))
    rows: list[MigrationRow] = []
    bare_rows: list[BareRow] = []
    notes: list[str] = []
    try:
        rows += await controller_rounds("firmware", rounds, workdir)
        if bare:
            bare_rows = await bare_rounds(bare, workdir)
        if linux_rounds:
            rows += await controller_rounds("linux", linux_rounds, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if save:
        write_jsonl("migration-rounds", [r.model_dump() for r in rows])
        write_jsonl("migration-bare", [b.model_dump() for b in bare_rows])
    modes = []
    for guest in ("firmware", "linux"):
        for mode in ("wait", "no-wait"):
            subset = [r for r in rows if r.guest == guest and r.mode == mode]
            if subset:
                modes.append(summarise_mode(subset))
    failed = [r for r in rows if r.error or r.client_error]
    for r in failed:
        notes.append(
            f"{r.guest}/{r.mode} #{r.round}: {r.outcome}: {r.error or ''} {r.client_error or ''}"
        )
    return MigrationSummary(
        machine=machine(tools=("qemu",)),
        modes=modes,
        overhead=summarise_overhead(rows, bare_rows) if bare_rows else None,
        wall_time_s=round(time.monotonic() - started, 1),
        notes=notes,
    )


def markdown(s: MigrationSummary) -> str:
    m = s.machine
    lines = [
        f"{m.cpus} cores ({m.cpu_model}), Python {m.python}, {m.versions.get('qemu', '')},"
        f" spice-server {m.versions.get('spice-server', '?')}; loopback (RTT ~0);"
        f" embedded client attached; run took {s.wall_time_s:.0f} s.",
        "",
        "**(a) Seamless rate**",
        "",
        "| guest | link wait | migrations | seamless | outcomes | link wait median | QEMU downtime median | stream gaps / dups |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for ms in s.modes:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(ms.outcomes.items()))
        gaps = (
            "-"
            if ms.stream_gaps_total is None
            else f"{ms.stream_gaps_total} / {ms.stream_duplicates_total}"
        )
        lines.append(
            f"| {ms.guest} | {'yes' if ms.mode == 'wait' else 'no (--no-wait-client)'}"
            f" | {ms.migrations} | {ms.seamless_rate:.0%} | {outcomes}"
            f" | {fmt(ms.link_wait_ms.median, ' ms')} | {fmt(ms.downtime_ms.median, ' ms')}"
            f" | {gaps} |"
        )
    lines += [
        "",
        "**(b) Blackout per channel** (embedded client: last message from the source to first"
        " from/to the destination), against QEMU's downtime; goal: blackout <= downtime + RTT"
        " + 20 ms, checked on every seamless migration and channel",
        "",
        "| guest | link wait | channel | median | p95 | max | downtime median | stream max stall median / max |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for ms in s.modes:
        stall = "-"
        if ms.stream_max_stall_ms is not None:
            stall = f"{fmt(ms.stream_max_stall_ms.median, ' ms')} / {fmt(ms.stream_max_stall_ms.max, ' ms')}"
        for ch, d in ms.blackout_ms.items():
            lines.append(
                f"| {ms.guest} | {ms.mode} | {ch} | {fmt(d.median, ' ms')} | {fmt(d.p95, ' ms')}"
                f" | {fmt(d.max, ' ms')} | {fmt(ms.downtime_ms.median, ' ms')} | {stall} |"
            )
    lines.append("")
    for ms in s.modes:
        lines.append(
            f"- {ms.guest}/{ms.mode}: {ms.blackout_over_goal} of {ms.blackout_checked}"
            " channel blackouts over the goal"
        )
    o = s.overhead
    if o is not None:
        lines += [
            "",
            "**(c) Controller overhead** (firmware, link wait on, seamless migrations)",
            "",
            "| figure | median | p90 |",
            "|---|---:|---:|",
            f"| bare `migrate` -> completed (no client) | {fmt(o.bare_wall_ms.median, ' ms')} | {fmt(o.bare_wall_ms.p90, ' ms')} |",
            f"| controller, whole flow | {fmt(o.controller_duration_ms.median, ' ms')} | {fmt(o.controller_duration_ms.p90, ' ms')} |",
            f"| of which settle window | {fmt(o.settle_ms.median, ' ms')} | {fmt(o.settle_ms.p90, ' ms')} |",
            f"| controller without settle | {fmt(o.controller_without_settle_ms.median, ' ms')} | {fmt(o.controller_without_settle_ms.p90, ' ms')} |",
            f"| client link time (link wait) | {fmt(o.link_wait_ms.median, ' ms')} | {fmt(o.link_wait_ms.p90, ' ms')} |",
            "",
            f"Overhead (median): {fmt(o.overhead_ms_median, ' ms')} whole flow,"
            f" {fmt(o.overhead_without_settle_ms_median, ' ms')} without the settle window;"
            f" goal <= link time + 50 ms = {fmt(o.goal_ms, ' ms')}:"
            f" {'met' if o.goal_met_without_settle else 'MISSED'} (without settle).",
            "",
            "Phase medians: " + ", ".join(f"{k} {v:.1f} ms" for k, v in o.phases_median_ms.items()),
        ]
    lines += [f"\nNote: {n}" for n in s.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="firmware migrations per mode")
    parser.add_argument("--linux-rounds", type=int, default=10, help="linux migrations per mode")
    parser.add_argument("--bare", type=int, default=None, help="bare migrations (default: rounds)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    bare = args.rounds if args.bare is None else args.bare
    summary = asyncio.run(run(args.rounds, args.linux_rounds, bare, args.keep, save=args.save))
    return finish("migration", summary, args, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
