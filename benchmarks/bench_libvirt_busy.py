"""A busy guest under libvirt: the linux lab guest dirtying memory, migrated with the hold.

The ``linux`` lab guest (``lab up --libvirt --guest linux``) is restarted on
host A with its in-guest memory dirtier on (``dirty_mb``/``dirty_ms`` on the kernel command
line, what the QEMU lab's ``dirty_mb`` does), so every migration needs several passes; then N
ping-pong migrations through the seamless controller with our embedded client in the
client namespace at the chosen RTT. Per run: the client's verdict, the port stream's gaps
and duplicates (the guest's sequence writer, checked by the client), the passes, and the
downtime against the limit libvirt had configured (``migrateGetMaxDowntime``).

    .venv/bin/python benchmarks/bench_libvirt_busy.py --runs 10 --rtt 150 --dirty-mb 32

Everything is torn down at the end (``--keep-lab`` keeps it; a lab already up in
``--lab-dir`` is reused as it is). "total" includes one second of records read before each
migration.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import asyncio
import datetime as dt
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from benchmarks.benchutil import arg_parser, fmt, machine
from spice_libvirt.libvirt.connection import require_libvirt
from spice_libvirt.libvirt.controller import LibvirtMigrationReport, migrate_libvirt
from spice_libvirt_lab import libvirt_lab, libvirt_tls, netns
from spice_libvirt_lab.libvirt_lab import HostName, LabState
from spice_libvirt_lab.libvirt_migrate import lab_request, migrate_by_report
from spice_libvirt_lab.witness_thread import netns_witness

RESULTS_MD = Path(__file__).resolve().with_name("RESULTS-libvirt-busy.md")
CMDLINE = re.compile(r"<cmdline>([^<]*)</cmdline>")
#: the guest's sequence writer's port (the lab domain's spiceport chardev)
STREAM_PORT = "org.spice-libvirt.stream"


class BusyRun(BaseModel):
    index: int
    rtt_ms: float
    dirty_mb: int
    #: libvirt's own migration (no hold): the baseline
    plain: bool = False
    outcome: str
    total_s: float | None = None
    wall_s: float | None = None
    passes: int | None = None
    downtime_ms: int | None = None
    downtime_limit_ms: int | None = None
    stream_records: int | None = None
    gaps: int | None = None
    duplicates: int | None = None
    held_ms: float | None = None
    verdict_ms: float | None = None
    load_1m: float | None = None
    error: str | None = None


def restart_dirtying(lab_dir: Path, dirty_mb: int, dirty_ms: int, timeout: float = 180) -> None:
    """Restart the guest on A with the dirtier on (its kernel command line), wait until up."""
    lv = require_libvirt()
    state = libvirt_lab.load_state(lab_dir)
    assert state is not None
    assert state.active_host == "A"
    console = libvirt_lab.serial_log(state, "A")
    ready_before = console.read_text(errors="replace").count("GUEST-READY")
    conn = state.host("A").open()
    try:
        dom = conn.lookupByName(state.domain)
        xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)
        line = CMDLINE.search(xml)
        assert line is not None, "the linux guest has a kernel command line"
        args = f"{line[1]} dirty_mb={dirty_mb} dirty_ms={dirty_ms}"
        dom.destroy()
        conn.defineXML(xml.replace(line[0], f"<cmdline>{args}</cmdline>")).create()
    finally:
        conn.close()
    netns.wait_for(
        lambda: console.read_text(errors="replace").count("GUEST-READY") > ready_before,
        timeout=timeout,
        what="the dirtying guest to boot",
        interval=0.2,
    )


async def _with_stream_witness(
    state: LabState, source: HostName, destination: HostName, plain: bool
) -> LibvirtMigrationReport:
    """The lab migration with our client reading the guest's record stream on the port
    channel (the lab's own witness does not open it), so that gaps are counted."""
    endpoint = libvirt_lab.spice_endpoint(state, source)
    assert endpoint is not None, f"no SPICE server on {source}"
    options = libvirt_tls.client_options(
        state, source, endpoint.address, endpoint.port, endpoint.tls_port
    ).model_copy(update={"stream_port_name": STREAM_PORT})
    witness = netns_witness(options, state.client.netns)
    async with witness:
        request = lab_request(
            state, source, destination, witness_one_way_ms=witness.one_way_ms, plain=plain
        )
        await asyncio.sleep(1.0)  # a second of records before the migration
        return await migrate_libvirt(request, witness, None)


def migrate_streaming(lab_dir: Path, plain: bool) -> LibvirtMigrationReport:
    """One ping-pong lab migration through :func:`_with_stream_witness`."""

    def run(state: LabState, source: HostName, destination: HostName) -> LibvirtMigrationReport:
        return asyncio.run(_with_stream_witness(state, source, destination, plain))

    return migrate_by_report(lab_dir, run)


def one(lab_dir: Path, i: int, rtt: float, dirty_mb: int, plain: bool) -> BusyRun:
    run = BusyRun(index=i, rtt_ms=rtt, dirty_mb=dirty_mb, outcome="?", plain=plain)
    run.load_1m = round(os.getloadavg()[0], 2)
    t0 = time.monotonic()
    try:
        report = migrate_streaming(lab_dir, plain)
    except Exception as exc:  # a broken run is recorded, not fatal
        run.outcome, run.error = "error", f"{type(exc).__name__}: {exc}"
        return run
    run.total_s = round(time.monotonic() - t0, 3)
    run.outcome = report.outcome
    run.wall_s = round((report.wall_ms or 0) / 1000.0, 3)
    figures = report.migration
    run.passes, run.downtime_ms = figures.passes, figures.downtime_ms
    run.downtime_limit_ms = figures.downtime_limit_ms
    if report.stream is not None:
        run.stream_records = report.stream.records
        run.gaps, run.duplicates = report.stream.gaps, report.stream.duplicates
    run.held_ms, run.verdict_ms = report.hold.held_ms, report.verdict_ready_ms
    run.error = report.error
    return run


def summary(runs: list[BusyRun], argv: str, started: dt.datetime) -> str:
    info = machine()
    seamless = sum(r.outcome == "seamless" for r in runs)
    gaps = sum((r.gaps or 0) + (r.duplicates or 0) for r in runs)
    over = [r for r in runs if None not in (r.downtime_ms, r.downtime_limit_ms)]
    over_limit = sum((r.downtime_ms or 0) > (r.downtime_limit_ms or 0) for r in over)

    def med(values: list[float | int | None]) -> float | None:
        vs = [float(v) for v in values if v is not None]
        return statistics.median(vs) if vs else None

    rows = "\n".join(
        f"| {r.index} | {r.outcome} | {r.passes} | {r.downtime_ms} / {r.downtime_limit_ms} | "
        f"{r.stream_records} | {r.gaps} / {r.duplicates} | {fmt(r.held_ms, digits=0)} | "
        f"{fmt(r.total_s, digits=2)} | {fmt(r.verdict_ms, digits=0)} | {r.load_1m} |"
        for r in runs
    )
    return (
        "# A busy guest under libvirt: the linux lab guest dirtying memory\n\n"
        f"Measured {started:%Y-%m-%d %H:%M} UTC by `{argv}`; {info.cpus} CPUs, kernel "
        f"{info.kernel}; method: {'plain libvirt (no hold)' if runs and runs[0].plain else 'ours'}"
        f". **{seamless}/{len(runs)} seamless**, stream gaps + duplicates "
        f"{gaps}, downtime over the configured limit in {over_limit}/{len(over)} runs; median "
        f"passes {fmt(med([r.passes for r in runs]), digits=0)}, median downtime "
        f"{fmt(med([r.downtime_ms for r in runs]), ' ms', 0)}.\n\n"
        "| # | verdict | passes | downtime / limit ms | stream records | gaps / dups | "
        "held ms | total s | verdict ms | load 1m |\n|---|---|---|---|---|---|---|---|---|---|\n"
        + rows
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__, summary=False)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rtt", type=float, default=150.0)
    parser.add_argument("--dirty-mb", type=int, default=32)
    parser.add_argument("--dirty-ms", type=int, default=20)
    parser.add_argument("--memory", type=int, default=256, help="guest MiB")
    parser.add_argument("--lab-dir", type=Path, default=None)
    parser.add_argument("--keep-lab", action="store_true")
    parser.add_argument("--plain", action="store_true", help="libvirt's own migration, no hold")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file of the runs")
    parser.add_argument("--write-results", action="store_true", help=f"write {RESULTS_MD.name}")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-libvirt-busy-"))
    lab_dir = (args.lab_dir or work / "lab").absolute()
    out = args.out or work / "runs.jsonl"
    started = dt.datetime.now(dt.UTC)
    own_lab = libvirt_lab.load_state(lab_dir) is None
    if own_lab:
        libvirt_lab.up(lab_dir, client_rtt_ms=args.rtt, guest="linux", memory_mib=args.memory)
    else:
        libvirt_lab.set_client_rtt(lab_dir, args.rtt)
    runs: list[BusyRun] = []
    try:
        if own_lab:
            restart_dirtying(lab_dir, args.dirty_mb, args.dirty_ms)
        for i in range(args.runs):
            run = one(lab_dir, i, args.rtt, args.dirty_mb, args.plain)
            runs.append(run)
            with out.open("a") as fh:
                fh.write(run.model_dump_json() + "\n")
            print(
                f"#{i}: {run.outcome} passes {run.passes} downtime {run.downtime_ms}/"
                f"{run.downtime_limit_ms} ms gaps {run.gaps} dups {run.duplicates} "
                f"total {run.total_s} s {run.error or ''}",
                flush=True,
            )
    finally:
        if own_lab and not args.keep_lab:
            libvirt_lab.down(lab_dir)
    text = summary(
        runs, "benchmarks/bench_libvirt_busy.py " + " ".join(argv or sys.argv[1:]), started
    )
    print(text)
    print(f"raw rows: {out}")
    if args.write_results:
        RESULTS_MD.write_text(text)
        print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
