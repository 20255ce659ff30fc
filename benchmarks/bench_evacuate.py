"""Whole-host evacuation: N desktops with a client each, drained ours vs plain vs sequential.

One libvirt lab (``lab up --libvirt --domains N``): N firmware guests on host A, each with
its own ``spice-libvirt watch`` client in the client namespace behind the delaying bridge
at ``--rtt`` ms. Each round drains the host the guests run on three ways, each a separate
``spice-libvirt lab evacuate --json`` process (what an operator runs; the guests go back
and forth, so every evacuation starts from a full host):

* ``ours``: ``--parallel P`` with the hold (the seamless controller);
* ``plain``: ``--parallel P --plain``, libvirt's own p2p migrations (the baseline);
* ``sequential``: ours at ``--parallel 1``.

A domain counts seamless when the controller's verdict *and* its client's own record say
so. The controller's own cost is that process's CPU time and peak RSS (``wait4``): the
clients, libvirtds and QEMUs are other processes. Per concurrent migration: CPU / N, and the
peak RSS above the sequential run's divided by P - 1. Every row carries the commit, the
machine and ``os.getloadavg()``.

    .venv/bin/python benchmarks/bench_evacuate.py --domains 8 --parallel 8 --rtt 150 --rounds 3
    .venv/bin/python benchmarks/bench_evacuate.py --domains 32 --parallel 8 --rtt 150
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from benchmarks.bench_libvirt_rtt import _commit
from benchmarks.benchutil import Machine, arg_parser, finish, fmt, machine
from spice_libvirt_lab import libvirt_lab, netns

#: mode -> extra ``lab evacuate`` arguments (P is filled in)
MODES = ("ours", "plain", "sequential")


class Row(BaseModel):
    """One evacuation of the whole host."""

    commit: str | None
    machine: Machine
    loadavg: tuple[float, float, float]
    round: int
    mode: str
    domains: int
    parallel: int
    rtt_ms: float
    source: str
    destination: str
    exit_code: int
    wall_s: float = Field(description="the lab evacuate process, start to exit")
    evacuation_s: float = Field(description="the evacuation itself (report.duration_ms)")
    seamless_both: int = Field(description="seamless by the controller and the client")
    outcomes: dict[str, int]
    client_paths: dict[str, int]
    held_ms_median: float | None
    controller_cpu_s: float
    controller_maxrss_mib: float


class ModeSummary(BaseModel):
    mode: str
    parallel: int
    runs: int
    seamless: str
    wall_s_median: float
    evacuation_s_median: float
    cpu_s_median: float
    cpu_ms_per_migration: float
    maxrss_mib_median: float


class Summary(BaseModel):
    benchmark: str = "evacuate"
    domains: int
    parallel: int
    rtt_ms: float
    commit: str | None
    machine: Machine
    modes: list[ModeSummary]
    #: memory check: the guests' QEMUs (RSS, all on one host) and what the machine had left
    qemu_rss_mib_total: float | None = None
    mem_available_mib: float | None = None
    rss_mib_per_concurrent_migration: float | None = None
    speedup_vs_sequential: float | None = None
    added_vs_plain_s: float | None = None


def _evacuate(lab_root: Path, parallel: int, plain: bool) -> tuple[dict[str, Any], int, float, Any]:
    """One ``lab evacuate --json`` process: its report, exit code, wall time and rusage."""
    argv = [sys.executable, "-m", "spice_libvirt", "lab", "--dir", str(lab_root), "evacuate",
            "--parallel", str(parallel), "--json", *(["--plain"] if plain else [])]  # fmt: skip
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if not text.strip():
            raise SystemExit(f"lab evacuate printed nothing: {err.read().decode()[-2000:]}")
    return json.loads(text), proc.returncode, wall, usage


def _row(
    args: Any, rnd: int, mode: str, parallel: int, doc: dict[str, Any], code: int, wall: float,
    usage: Any,
) -> Row:  # fmt: skip
    domains = doc["report"]["domains"]
    clients: dict[str, Any] = doc["clients"]
    held = [
        d["report"]["hold"]["held_ms"]
        for d in domains
        if d.get("report") and d["report"].get("hold") and d["report"]["hold"].get("held_ms")
    ]
    paths: dict[str, int] = {}
    for c in clients.values():
        paths[str(c["path"])] = paths.get(str(c["path"]), 0) + 1
    both = sum(
        1
        for d in domains
        if d["outcome"] == "seamless" and clients.get(d["domain"], {}).get("path") == "seamless"
    )
    return Row(
        commit=_commit(),
        machine=machine(),
        loadavg=os.getloadavg(),
        round=rnd,
        mode=mode,
        domains=len(domains),
        parallel=parallel,
        rtt_ms=args.rtt,
        source=doc["source"],
        destination=doc["destination"],
        exit_code=code,
        wall_s=round(wall, 3),
        evacuation_s=round(doc["report"]["duration_ms"] / 1000.0, 3),
        seamless_both=both,
        outcomes=doc["report"]["counts"],
        client_paths=paths,
        held_ms_median=round(statistics.median(held), 1) if held else None,
        controller_cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
        controller_maxrss_mib=round(usage.ru_maxrss / 1024.0, 1),
    )


def _meminfo_mib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return 0.0


def _qemu_rss_mib(state: libvirt_lab.LabState) -> float:
    """Resident memory of every QEMU in the lab's host namespaces."""
    total = 0
    for name in libvirt_lab.HOSTS:
        for pid in netns.pids_in(state.hosts[name].config.netns):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if "qemu-system" in status.splitlines()[0]:
                rss = [ln for ln in status.splitlines() if ln.startswith("VmRSS:")]
                total += int(rss[0].split()[1]) if rss else 0
    return round(total / 1024.0, 1)


def _summary(args: Any, rows: list[Row]) -> Summary:
    modes: list[ModeSummary] = []
    for mode in MODES:
        mine = [r for r in rows if r.mode == mode]
        if not mine:
            continue
        cpu = statistics.median(r.controller_cpu_s for r in mine)
        modes.append(
            ModeSummary(
                mode=mode,
                parallel=mine[0].parallel,
                runs=len(mine),
                seamless=f"{sum(r.seamless_both for r in mine)}/{sum(r.domains for r in mine)}",
                wall_s_median=round(statistics.median(r.wall_s for r in mine), 2),
                evacuation_s_median=round(statistics.median(r.evacuation_s for r in mine), 2),
                cpu_s_median=round(cpu, 2),
                cpu_ms_per_migration=round(cpu * 1000.0 / args.domains, 1),
                maxrss_mib_median=round(
                    statistics.median(r.controller_maxrss_mib for r in mine), 1
                ),
            )
        )
    by = {m.mode: m for m in modes}
    summary = Summary(
        domains=args.domains,
        parallel=args.parallel,
        rtt_ms=args.rtt,
        commit=rows[0].commit if rows else None,
        machine=machine(tools=["qemu"]),
        modes=modes,
    )
    if "ours" in by and "sequential" in by:
        summary.speedup_vs_sequential = round(
            by["sequential"].evacuation_s_median / by["ours"].evacuation_s_median, 2
        )
        if args.parallel > 1:
            extra = by["ours"].maxrss_mib_median - by["sequential"].maxrss_mib_median
            summary.rss_mib_per_concurrent_migration = round(extra / (args.parallel - 1), 2)
    if "ours" in by and "plain" in by:
        summary.added_vs_plain_s = round(
            by["ours"].evacuation_s_median - by["plain"].evacuation_s_median, 2
        )
    return summary


def _markdown(s: Summary) -> str:
    lines = [
        f"{s.domains} domains, client RTT {s.rtt_ms:.0f} ms, commit {s.commit}, "
        f"{s.machine.cpus} CPUs, load {s.machine.load_avg_1m}",
        "",
        "| mode | parallel | runs | seamless (both ends) | evacuation median | process wall "
        "| controller CPU | CPU per migration | controller peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in s.modes:
        lines.append(
            f"| {m.mode} | {m.parallel} | {m.runs} | {m.seamless} | {m.evacuation_s_median:.1f} s "
            f"| {m.wall_s_median:.1f} s | {m.cpu_s_median:.2f} s | {m.cpu_ms_per_migration:.0f} ms "
            f"| {m.maxrss_mib_median:.0f} MiB |"
        )
    lines += [
        "",
        f"ours vs sequential: {fmt(s.speedup_vs_sequential, 'x', 2)} faster; ours vs plain: "
        f"+{fmt(s.added_vs_plain_s, ' s', 1)}; peak RSS per concurrent migration: "
        f"{fmt(s.rss_mib_per_concurrent_migration, ' MiB', 2)}; the guests' QEMUs: "
        f"{fmt(s.qemu_rss_mib_total, ' MiB', 0)} RSS, {fmt(s.mem_available_mib, ' MiB', 0)} "
        "still available",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--rtt", type=float, default=150.0, help="client RTT in ms")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--memory", type=int, default=128, help="MiB per guest")
    parser.add_argument("--modes", default=",".join(MODES), help="which of " + ",".join(MODES))
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    root = Path(tempfile.mkdtemp(prefix="slbe-"))
    rows: list[Row] = []
    try:
        t0 = time.monotonic()
        state = libvirt_lab.up(
            root / "libvirt", client_rtt_ms=args.rtt, domains=args.domains, clients=True,
            memory_mib=args.memory, timeout=300.0,
        )  # fmt: skip
        print(f"lab up: {args.domains} domains in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        memory = (_qemu_rss_mib(state), _meminfo_mib("MemAvailable"))
        for rnd in range(args.rounds):
            for mode in modes:
                parallel = 1 if mode == "sequential" else args.parallel
                doc, code, wall, usage = _evacuate(root, parallel, plain=mode == "plain")
                row = _row(args, rnd, mode, parallel, doc, code, wall, usage)
                rows.append(row)
                print(
                    f"round {rnd} {mode}: {row.seamless_both}/{row.domains} seamless, "
                    f"{row.evacuation_s} s, cpu {row.controller_cpu_s} s, "
                    f"rss {row.controller_maxrss_mib} MiB, load {row.loadavg[0]:.2f}",
                    file=sys.stderr,
                )
    finally:
        libvirt_lab.down(root / "libvirt")
        shutil.rmtree(root, ignore_errors=True)
    summary = _summary(args, rows)
    summary.qemu_rss_mib_total, summary.mem_available_mib = memory
    name = f"evacuate-{args.domains}"
    return finish(
        name, summary, args, _markdown, rows=(name, [r.model_dump(mode="json") for r in rows])
    )


if __name__ == "__main__":
    sys.exit(main())
