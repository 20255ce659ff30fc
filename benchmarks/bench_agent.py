"""Migrations started by someone else: plain libvirt vs. the host agent vs. our controller.

One two-host libvirt lab with the ``linux`` guest (the agent's taint-free hold needs a guest
with memory to move; the firmware guest cannot be held that way, see README). For each
client RTT (set on the lab's delaying bridge) and each method, N migrations ping-pong:

* ``plain``: ``virsh migrate --live --p2p`` (a caller that is not us), no agent;
* ``agent``: the same ``virsh migrate``, with ``spice-libvirt agent run`` inside each host
  (its default hold: the switchover, not the bulk);
* ``agent-bulk``: the same with ``--hold-mode bulk`` (1 MiB/s from the start, the hold
  before the switchover hold existed);
* ``controller``: our own ``spice-libvirt migrate`` (:func:`lab_migrate`), no agent.

Each run has a *fresh* remote-viewer in the client namespace (a viewer that once fell back
to switch-host refuses later seamless migrations); its ``SPICE_DEBUG`` log is the oracle.
Wall time is the migrating caller's: the ``virsh`` process for plain and agent, the
controller call for ours. "Held" is the agent's journal (``held_ms``: setup to release;
``throttled_ms``: the part at 1 MiB/s) or the controller's report. "Tainted" counts runs
after which the domain's log gained a ``custom-monitor`` line. The methods alternate run by
run and the RTTs round by round (round ``i`` visits every RTT), so they share the machine's
load and a run cut short leaves every cell with its rounds so far. ``--out`` appends each
row to a JSON-lines file as soon as it is measured, with the commit and whether the tree
was dirty.

    .venv/bin/python benchmarks/bench_agent.py --rtts 0,50,150,300 --runs 10
    .venv/bin/python benchmarks/bench_agent.py --methods plain,agent --runs 10 --no-save \
        --out benchmarks/results/agent-rtt-COMMIT.jsonl
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import contextlib
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from benchmarks.benchutil import Machine, arg_parser, finish, fmt, machine, source_state
from spice_libvirt.hook.journal import Journal
from spice_libvirt_lab import libvirt_agent, libvirt_lab, netns
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from spice_libvirt_lab.libvirt_state import LabState, save
from spice_libvirt_lab.libvirt_status import set_client_rtt, taint_lines
from tests.rigs.viewer import start_viewer, viewer_outcome, xvfb

METHODS = ("plain", "agent", "agent-bulk", "controller")
#: the agent's options per method
AGENT_OPTIONS = {"agent": [], "agent-bulk": ["--hold-mode", "bulk"]}
RESULTS_MD = Path(__file__).resolve().with_name("RESULTS-agent.md")


class Run(BaseModel):
    rtt_ms: float
    method: str
    i: int
    src: str
    outcome: str | None = None
    wall_s: float | None = None
    #: switch-host: from ``migrate-switch-host`` to the new display channel (seamless: 0)
    display_outage_s: float | None = None
    #: the viewer's own link time to the destination (``migrate-begin-seamless`` to
    #: ``connections all ok``)
    client_link_s: float | None = None
    held_ms: float | None = None
    throttled_ms: float | None = None
    client_rtt_ms: float | None = None
    agent_outcome: str | None = None
    released_why: str | None = None
    tainted: bool = False
    load_1m: float = 0.0
    commit: str | None = None
    #: the tree had uncommitted changes when the row was measured
    dirty: bool | None = None
    error: str | None = None


class Cell(BaseModel):
    rtt_ms: float
    method: str
    n: int
    seamless: int
    wall_median_s: float | None
    added_median_s: float | None = Field(description="median wall minus plain's median wall")
    held_median_ms: float | None
    throttled_median_ms: float | None = None
    tainted: int


class Summary(BaseModel):
    machine: Machine
    commit: str | None
    started_at: str
    seconds: float
    argv: str
    load_1m_start: float
    cells: list[Cell]


def _commit() -> str | None:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


def _taint_lines(state: LabState) -> int:
    return len(taint_lines(state))


def _agent_verdict(state: LabState, host: str, before: int) -> dict[str, Any] | None:
    path = libvirt_agent.journal_path(state, host)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if path.exists():
            entries = [e for e in Journal(path).entries(limit=5) if e.source == "agent"]
            total = Journal(path).count()
            if total > before and entries:
                return dict(json.loads(entries[0].detail))
        time.sleep(0.1)
    return None


def _journal_count(state: LabState, host: str) -> int:
    path = libvirt_agent.journal_path(state, host)
    return Journal(path).count() if path.exists() else 0


@contextlib.contextmanager
def _agents(state: LabState, method: str) -> Iterator[None]:
    options = AGENT_OPTIONS.get(method)
    refs = (
        [libvirt_agent.start_agent(state, h, options) for h in ("A", "B")]
        if options is not None
        else []
    )
    try:
        yield
    finally:
        netns.terminate(refs, timeout=15.0)


def one_run(state: LabState, display: str, rtt: float, method: str, i: int) -> Run:
    src, dst = libvirt_agent.running_host(state)
    source = source_state()
    run = Run(rtt_ms=rtt, method=method, i=i, src=src, commit=source.commit, dirty=source.dirty)
    run.load_1m = round(os.getloadavg()[0], 2)
    uri = f"spice://{state.hosts[src].config.ip}:5900"
    name = f"bench-{method}-{rtt:.0f}-{i}"
    viewer = start_viewer(uri, display, state.run_dir, name=name, ns=state.client.netns)
    taint_before = _taint_lines(state)
    journal_before = _journal_count(state, src)
    try:
        viewer.wait_channels(timeout=30.0)
        time.sleep(0.5)
        mark = len(viewer.log_text())
        t0 = time.monotonic()
        if method == "controller":
            fresh = libvirt_lab.load_state(state.lab_dir)
            assert fresh is not None
            fresh.active_host = src
            save(fresh)
            report = lab_migrate(state.lab_dir, watch=False)
            run.wall_s = round(time.monotonic() - t0, 3)
            run.held_ms = report.hold.held_ms
            run.released_why = report.hold.release_reason
        else:
            done = subprocess.run(
                libvirt_agent.plain_migrate_argv(state, src, dst),
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            run.wall_s = round(time.monotonic() - t0, 3)
            if done.returncode != 0:
                run.error = done.stderr.strip()[:300]
        deadline = time.monotonic() + 8.0
        while run.outcome is None and time.monotonic() < deadline:
            seen = viewer_outcome(viewer.log_text()[mark:])
            run.outcome, run.display_outage_s = seen.path, seen.display_outage_s
            run.client_link_s = seen.link_s
            time.sleep(0.1)
        if method in AGENT_OPTIONS:
            verdict = _agent_verdict(state, src, journal_before)
            if verdict is not None:
                run.held_ms = verdict.get("held_ms")
                run.throttled_ms = verdict.get("throttled_ms")
                run.client_rtt_ms = verdict.get("client_rtt_ms")
                run.agent_outcome = verdict.get("outcome")
                run.released_why = verdict.get("released_why")
    except Exception as exc:  # one bad run is a row, not the end of the benchmark
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        viewer.stop()
    run.tainted = _taint_lines(state) > taint_before
    return run


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def cells(runs: list[Run]) -> list[Cell]:
    out: list[Cell] = []
    rtts = sorted({r.rtt_ms for r in runs})
    for rtt in rtts:
        plain = _median(
            [r.wall_s for r in runs if r.rtt_ms == rtt and r.method == "plain" and r.wall_s]
        )
        for method in METHODS:
            mine = [r for r in runs if r.rtt_ms == rtt and r.method == method]
            if not mine:
                continue
            wall = _median([r.wall_s for r in mine if r.wall_s is not None])
            held = [r.held_ms for r in mine if r.held_ms is not None]
            out.append(
                Cell(
                    rtt_ms=rtt,
                    method=method,
                    n=len(mine),
                    seamless=sum(r.outcome == "seamless" for r in mine),
                    wall_median_s=wall,
                    added_median_s=None
                    if wall is None or plain is None
                    else round(wall - plain, 3),
                    held_median_ms=_median(held),
                    throttled_median_ms=_median(
                        [r.throttled_ms for r in mine if r.throttled_ms is not None]
                    ),
                    tainted=sum(r.tainted for r in mine),
                )
            )
    return out


def table(summary: Summary) -> str:
    lines = [
        "| client RTT | method | seamless (remote-viewer's log) | wall (median) | added vs plain | held (median) | at 1 MiB/s (median) | tainted runs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in summary.cells:
        lines.append(
            f"| {c.rtt_ms:.0f} ms | {c.method} | {c.seamless}/{c.n} | {fmt(c.wall_median_s, ' s', 2)} "
            f"| {fmt(c.added_median_s, ' s', 2)} | {fmt(c.held_median_ms, ' ms', 0)} | {fmt(c.throttled_median_ms, ' ms', 0)} | {c.tainted} |"
        )
    m = summary.machine
    lines.append(
        f"\n{m.cpus} CPUs ({m.cpu_model}), kernel {m.kernel}; commit {summary.commit}, "
        f"load(1m) at start {summary.load_1m_start}; {summary.seconds / 60:.1f} min; "
        f"`{summary.argv}`"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rtts", default="0,50,150,300", help="client RTTs in ms (comma list)")
    parser.add_argument("--runs", type=int, default=10, help="migrations per RTT and method")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="append each row to this JSON-lines file at once"
    )
    args = parser.parse_args(argv)
    rtts = [float(x) for x in args.rtts.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]
    if not set(methods) <= set(METHODS) or args.runs < 1:
        parser.error("unknown method or --runs < 1")
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    load0 = round(os.getloadavg()[0], 2)
    top = Path(tempfile.mkdtemp(prefix="sl-bench-agent-"))
    runs: list[Run] = []
    try:
        state = libvirt_lab.up(top / "lab", client_rtt_ms=rtts[0], guest="linux")
        with xvfb(state.run_dir) as xserver:
            display = xserver.display
            for i in range(args.runs):
                for rtt in rtts:
                    set_client_rtt(state.lab_dir, rtt)
                    for method in methods:
                        with _agents(state, method):
                            run = one_run(state, display, rtt, method, i)
                            runs.append(run)
                            if args.out is not None:
                                with args.out.open("a") as fh:
                                    fh.write(run.model_dump_json() + "\n")
                            print(
                                f"{rtt:4.0f} ms {method:10} {i:2}: {run.outcome} wall "
                                f"{fmt(run.wall_s, ' s', 2)} held {fmt(run.held_ms, ' ms', 0)}"
                                f"{' TAINTED' if run.tainted else ''}"
                                f"{' error ' + run.error if run.error else ''}",
                                file=sys.stderr, flush=True,
                            )  # fmt: skip
    finally:
        libvirt_lab.down(top / "lab")
        shutil.rmtree(top, ignore_errors=True)
    summary = Summary(
        machine=machine(tools=["qemu", "remote-viewer"]),
        commit=_commit(),
        started_at=started.isoformat(),
        seconds=round(time.monotonic() - t0, 1),
        argv=" ".join(["bench_agent.py", *(argv if argv is not None else sys.argv[1:])]),
        load_1m_start=load0,
        cells=cells(runs),
    )
    if args.save:
        RESULTS_MD.write_text(
            "# Host agent: plain vs agent vs controller\n\n" + table(summary) + "\n"
        )
    return finish(
        "agent-rtt", summary, args, table, rows=("agent-rtt", [r.model_dump() for r in runs])
    )


if __name__ == "__main__":
    sys.exit(main())
