"""A host of desktops with real memory, drained by other people's callers: with and without
the host agent, and by our own evacuate.

One libvirt lab per (domains, workload): N ``memcheck`` guests on host A (every page of their
working set full of data, ``idle``; or rewriting ``--dirty-mib-s`` MiB/s, ``dirty``), each
with its own ``spice-libvirt watch`` client in the client namespace ``--rtt`` ms away. Each
run drains the host the guests are on to the other one -- the guests go back and forth, so
every run starts from a full host -- with one caller:

* ``virsh``: N concurrent ``virsh migrate --live --p2p`` (an operator's loop, all at once);
* ``vdsm``: ``benchmarks/vdsm_caller.py`` (VDSM's way: 2 at a time, 52 MiB/s, the
  downtime schedule, the ticket revived);
* ``ansible``: ``ansible/evacuate.yml`` through the lab's inventory (over ssh, our
  ``spice-libvirt evacuate`` on the host, ``--parallel`` as given);
* ``evacuate``: ``spice-libvirt lab evacuate --parallel P --hold-mode switchover`` (our
  controller); ``evacuate-bulk`` with ``--hold-mode bulk``, the floor from QEMU's setup
  (evacuate's default with ``--parallel`` above 1);

and the agent ``off``, ``on`` (its default: the switchover hold) or ``bulk`` (``--hold-mode
bulk``: 1 MiB/s from the start, the hold before the switchover hold). The runs alternate
(caller, agent) in a fixed rotation, so they share the machine's load.

Per run: seamless by each client's own record (``lab clients``); evacuation wall; the
agents' verdicts (held ms, the part at 1 MiB/s); the agent's CPU per held migration and
its peak RSS (``VmHWM``, the agents are started for the run) with all holds at once; our
controller's CPU per migration (the evacuating process's rusage); integrity errors (the
memcheck guests' own accounts: errors, a new boot, not alive) and guests lost (not running
on the destination). Rows are appended one per run as they come (``--out``), so a run that
is cut short keeps what it measured; ``--budget-min`` stops starting new runs after that long.

    .venv/bin/python benchmarks/bench_fleet.py --domains 8 --workloads idle,dirty \\
        --callers virsh,vdsm,ansible,evacuate --agents off,on,bulk --out results/fleet-8.jsonl
    .venv/bin/python benchmarks/bench_fleet.py --domains 32 ... --out results/fleet-32.jsonl
    .venv/bin/python benchmarks/bench_fleet.py --from-rows results/fleet-8.jsonl,... --write-docs
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from benchmarks.benchutil import REPOSITORY, arg_parser, fmt, machine, source_state
from benchmarks.vdsm_caller import Caller, Options
from spice_libvirt.hook.journal import Journal
from spice_libvirt_lab import libvirt_agent, libvirt_clients, libvirt_lab, netns
from spice_libvirt_lab.libvirt_state import HostName, LabState, save
from spice_libvirt_lab.libvirt_status import guest_accounts, where
from spice_libvirt_lab.memcheck import MemcheckOptions

#: ``evacuate-bulk``: our evacuate with ``--hold-mode bulk`` (the floor from QEMU's setup)
CALLERS = ("virsh", "vdsm", "ansible", "evacuate", "evacuate-bulk")
AGENTS = {"off": None, "on": [], "bulk": ["--hold-mode", "bulk"]}
#: how long a client may take to write its verdict after the caller returned
CLIENT_WAIT_S = 60.0
ANSIBLE_DIR = REPOSITORY / "ansible"
BIN = Path(sys.executable).parent


class Row(BaseModel):
    domains: int
    memory_mib: int
    workload: str
    dirty_mib_s: int
    rtt_ms: float
    caller: str
    agent: str
    round: int
    source: str
    wall_s: float | None = None
    #: each client's own path for this run, by domain
    paths: dict[str, str | None] = Field(default_factory=dict)
    seamless: int = 0
    migrated: int = 0
    lost: list[str] = Field(default_factory=list)
    integrity_errors: int = 0
    new_boots: list[str] = Field(default_factory=list)
    not_alive: list[str] = Field(default_factory=list)
    agent_verdicts: int = 0
    agent_outcomes: dict[str, int] = Field(default_factory=dict)
    held_ms: list[float] = Field(default_factory=list)
    throttled_ms: list[float] = Field(default_factory=list)
    reacted_ms: list[float] = Field(default_factory=list)
    samples: list[int] = Field(default_factory=list)
    #: the agents' verdicts that were not seamless: domain, outcome and their notes
    agent_trouble: list[str] = Field(default_factory=list)
    agent_cpu_ms: float | None = None
    agent_cpu_ms_per_hold: float | None = None
    agent_peak_rss_mib: float | None = None
    controller_cpu_ms_per_migration: float | None = None
    caller_error: str | None = None
    load_1m_start: float = 0.0
    load_1m_end: float = 0.0
    #: how long ``lab up`` took to boot these guests and fill their working sets
    lab_up_s: float | None = None
    #: the host's MemAvailable before and after the run
    mem_available_mib_start: int | None = None
    mem_available_mib_end: int | None = None
    commit: str | None = None
    dirty_tree: bool | None = None


# ------------------------------------------------------------------------------ measures


def _proc_cpu_ms(pid: int) -> float | None:
    """utime + stime of a live process (ms)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) * 1000.0 / ticks


def _mem_available_mib() -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return None


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def _agent_verdicts(state: LabState, host: str, since: float) -> list[dict[str, Any]]:
    path = libvirt_agent.journal_path(state, host)
    if not path.exists():
        return []
    entries = Journal(path).entries(limit=500)
    return [json.loads(e.detail) for e in entries if e.source == "agent" and e.ts >= since]


def _running_on(state: LabState, host: HostName) -> set[str]:
    out = state.host(host).run(["virsh", "list", "--name", "--state-running"], timeout=60)
    return {line.strip() for line in out.splitlines() if line.strip()}


def _client_counts(state: LabState) -> dict[str, int]:
    return {d: len(h.verdicts) for d, h in libvirt_clients.client_histories(state).items()}


def _new_paths(state: LabState, before: dict[str, int], wait_s: float) -> dict[str, str | None]:
    """Each client's path for the migration just made (None: it said nothing in time)."""
    deadline = time.monotonic() + wait_s
    while True:
        histories = libvirt_clients.client_histories(state)
        done = all(len(h.verdicts) > before.get(d, 0) for d, h in histories.items())
        if done or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    paths: dict[str, str | None] = {}
    for domain, history in histories.items():
        fresh = history.verdicts[before.get(domain, 0) :]
        paths[domain] = fresh[0].path if fresh else None
    return paths


# ------------------------------------------------------------------------------ callers


def _virsh_argv(state: LabState, src: HostName, dst: HostName, name: str) -> list[str]:
    dest = f"qemu+tcp://{state.hosts[dst].config.hostname}/system"
    return ["virsh", "-c", state.hosts[src].uri_unix, "migrate", "--live", "--p2p", name, dest]


def _virsh(state: LabState, src: HostName, dst: HostName) -> tuple[str | None, float | None]:
    procs = [
        subprocess.Popen(
            _virsh_argv(state, src, dst, name),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in state.all_domains
    ]
    errors = []
    for proc in procs:
        _out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            errors.append(err.strip()[:200])
    return ("; ".join(errors) or None), None


def _vdsm(state: LabState, src: HostName, dst: HostName) -> tuple[str | None, float | None]:
    options = Options(
        source_uri=state.hosts[src].uri_unix, destination=state.hosts[dst].config.hostname
    )
    records = Caller(options).drain(state.all_domains)
    errors = [f"{r.domain}: {r.error}" for r in records if not r.ok]
    return ("; ".join(errors)[:600] or None), None


def _child_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000.0


def _ansible(
    state: LabState, src: HostName, dst: HostName, parallel: int
) -> tuple[str | None, float | None]:
    assert state.ansible_inventory is not None
    home = state.run_dir / "ansible-home"
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_HOME": str(home / "home"),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
    })  # fmt: skip
    argv = [
        str(BIN / "ansible-playbook"), "-i", str(state.ansible_inventory),
        str(ANSIBLE_DIR / "evacuate.yml"), "-e", f"evacuate_hosts=host{src}",
        "-e", f"evacuate_target=host{dst}", "-e", f"spice_libvirt_evacuate_parallel={parallel}",
        "-e", "spice_libvirt_require_seamless=false",
    ]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600, check=False)
    error = None if done.returncode == 0 else (done.stdout + done.stderr).strip()[-400:]
    return error, None  # the controller runs on the host, over ssh: its CPU is not ours to see


def _evacuate(
    state: LabState, parallel: int, mode: str, row: Row
) -> tuple[str | None, float | None]:
    """Our evacuate; its controller's holds into ``row`` (held: QEMU active to the
    release; at 1 MiB/s: the part at libvirt's floor), as the agents' verdicts are."""
    before = _child_cpu_ms()
    argv = [
        str(BIN / "spice-libvirt"), "lab", "--dir", str(state.lab_dir.parent), "evacuate",
        "--parallel", str(parallel), "--hold-mode", mode, "--json",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    cpu = _child_cpu_ms() - before
    error = None if done.returncode in (0, 8) else done.stderr.strip()[-400:]
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for domain in json.loads(done.stdout)["report"]["domains"]:
            hold = (domain.get("report") or {}).get("hold") or {}
            if hold.get("held_ms") is not None:
                row.held_ms.append(hold["held_ms"])
                row.throttled_ms.append(hold.get("floor_ms") or 0.0)
    return error, cpu


# ------------------------------------------------------------------------------ one run


@contextlib.contextmanager
def _agents(state: LabState, mode: str) -> Iterator[dict[str, netns.ProcRef]]:
    extra = AGENTS[mode]
    refs: dict[str, netns.ProcRef] = {}
    try:
        if extra is not None:
            for host in ("A", "B"):
                refs[host] = libvirt_agent.start_agent(state, host, extra)
        yield refs
    finally:
        netns.terminate([r for r in refs.values() if r.alive()], timeout=15.0)


def one_run(
    state: LabState, caller: str, agent: str, round_: int, workload: str, lab_up_s: float, args: Any
) -> Row:
    src = where(state)
    dst: HostName = "B" if src == "A" else "A"
    source = source_state()
    row = Row(
        domains=len(state.all_domains), memory_mib=args.memory, workload=workload,
        dirty_mib_s=args.dirty_mib_s if workload == "dirty" else 0, rtt_ms=args.rtt,
        caller=caller, agent=agent, round=round_, source=src, commit=source.commit,
        dirty_tree=source.dirty,
        load_1m_start=round(os.getloadavg()[0], 2), lab_up_s=lab_up_s,
        mem_available_mib_start=_mem_available_mib(),
    )  # fmt: skip
    accounts_before = {a.domain: a for a in guest_accounts(state.lab_dir)}
    clients_before = _client_counts(state)
    since = time.time()
    with _agents(state, agent) as refs:
        cpu0 = {h: _proc_cpu_ms(r.pid) for h, r in refs.items()}
        t0 = time.monotonic()
        try:
            if caller == "virsh":
                error, cpu = _virsh(state, src, dst)
            elif caller == "vdsm":
                error, cpu = _vdsm(state, src, dst)
            elif caller == "ansible":
                error, cpu = _ansible(state, src, dst, args.parallel)
            else:
                mode = "bulk" if caller == "evacuate-bulk" else "switchover"
                error, cpu = _evacuate(state, args.parallel, mode, row)
        except Exception as exc:  # one bad run is a row, not the end of the benchmark
            error, cpu = f"{type(exc).__name__}: {exc}", None
        row.wall_s = round(time.monotonic() - t0, 3)
        row.caller_error = error
        row.paths = _new_paths(state, clients_before, CLIENT_WAIT_S)
        if refs:
            time.sleep(2.0)  # the verdicts come a moment after the end of each migration
            ref = refs[src]
            used = _proc_cpu_ms(ref.pid)
            if used is not None and cpu0.get(src) is not None:
                row.agent_cpu_ms = round(used - (cpu0[src] or 0.0), 1)
            row.agent_peak_rss_mib = _peak_rss_mib(ref.pid)
    verdicts = _agent_verdicts(state, src, since)
    row.agent_verdicts = len(verdicts)
    for v in verdicts:
        row.agent_outcomes[v["outcome"]] = row.agent_outcomes.get(v["outcome"], 0) + 1
        if v.get("held_ms") is not None:
            row.held_ms.append(v["held_ms"])
        if v.get("throttled_ms") is not None:
            row.throttled_ms.append(v["throttled_ms"])
        if v.get("reacted_ms") is not None:
            row.reacted_ms.append(v["reacted_ms"])
        row.samples.append(int(v.get("samples") or 0))
        if v["outcome"] not in ("seamless", "skipped"):
            notes = "; ".join(v.get("notes", []))[:400]
            row.agent_trouble.append(f"{v['domain']}: {v['outcome']} ({notes})")
    if row.agent_cpu_ms is not None and row.held_ms:
        row.agent_cpu_ms_per_hold = round(row.agent_cpu_ms / len(row.held_ms), 2)
    if cpu is not None:
        row.controller_cpu_ms_per_migration = round(cpu / len(state.all_domains), 1)
    running = _running_on(state, dst)
    row.migrated = sum(d in running for d in state.all_domains)
    row.lost = [d for d in state.all_domains if d not in running | _running_on(state, src)]
    row.seamless = sum(p == "seamless" for p in row.paths.values())
    for account in guest_accounts(state.lab_dir):
        was = accounts_before.get(account.domain)
        row.integrity_errors += max(0, (account.errors or 0) - ((was.errors or 0) if was else 0))
        if was is not None and was.boot is not None and account.boot not in (None, was.boot):
            row.new_boots.append(account.domain)
        if not account.alive:
            row.not_alive.append(account.domain)
    fresh = libvirt_lab.load_state(state.lab_dir)
    if fresh is not None:  # the callers moved the guests behind the lab's back
        fresh.active_host = dst if row.migrated else src
        save(fresh)
    row.load_1m_end = round(os.getloadavg()[0], 2)
    row.mem_available_mib_end = _mem_available_mib()
    return row


# ------------------------------------------------------------------------------ summary


class Cell(BaseModel):
    domains: int
    memory_mib: int
    workload: str
    caller: str
    agent: str
    runs: int
    seamless: str
    wall_s: float | None
    wall_vs_off: float | None = Field(description="wall / the same caller's without the agent")
    added_s: float | None
    held_ms_median: float | None
    throttled_ms_median: float | None
    agent_cpu_ms_per_hold: float | None
    agent_peak_rss_mib: float | None
    controller_cpu_ms_per_migration: float | None
    integrity_errors: int
    lost: int
    load_1m: float | None


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def cells(rows: list[Row]) -> list[Cell]:
    out: list[Cell] = []
    rows = [r for r in rows if r.caller in CALLERS]  # not the record of a lab that never came up
    workloads = ("idle", "dirty")
    keys = sorted({(r.domains, r.workload, r.caller, r.agent) for r in rows},
                  key=lambda k: (k[0], workloads.index(k[1]) if k[1] in workloads else 9,
                                 CALLERS.index(k[2]), list(AGENTS).index(k[3])))  # fmt: skip
    for n, workload, caller, agent in keys:
        mine = [r for r in rows if (r.domains, r.workload, r.caller, r.agent) == (n, workload, caller, agent)]  # fmt: skip
        base = [r for r in rows if (r.domains, r.workload, r.caller, r.agent) == (n, workload, caller, "off")]  # fmt: skip
        wall = _median([r.wall_s for r in mine if r.wall_s is not None])
        base_wall = _median([r.wall_s for r in base if r.wall_s is not None])
        out.append(
            Cell(
                domains=n, memory_mib=mine[0].memory_mib, workload=workload, caller=caller,
                agent=agent, runs=len(mine),
                seamless=f"{sum(r.seamless for r in mine)}/{sum(len(r.paths) for r in mine)}",
                wall_s=wall,
                wall_vs_off=round(wall / base_wall, 3) if wall and base_wall and agent != "off" else None,
                added_s=round(wall - base_wall, 2) if wall and base_wall and agent != "off" else None,
                held_ms_median=_median([x for r in mine for x in r.held_ms]),
                throttled_ms_median=_median([x for r in mine for x in r.throttled_ms]),
                agent_cpu_ms_per_hold=_median([r.agent_cpu_ms_per_hold for r in mine if r.agent_cpu_ms_per_hold is not None]),
                agent_peak_rss_mib=max((r.agent_peak_rss_mib for r in mine if r.agent_peak_rss_mib), default=None),
                controller_cpu_ms_per_migration=_median([r.controller_cpu_ms_per_migration for r in mine if r.controller_cpu_ms_per_migration is not None]),
                integrity_errors=sum(r.integrity_errors + len(r.new_boots) for r in mine),
                lost=sum(len(r.lost) for r in mine),
                load_1m=_median([r.load_1m_start for r in mine]),
            )
        )  # fmt: skip
    return out


def table(rows: list[Row]) -> str:
    lines = [
        "| domains | workload | caller | agent | runs | seamless (clients) | wall s | x off | added s "
        "| held ms | at 1 MiB/s ms | agent CPU ms/hold | agent peak RSS MiB | controller CPU ms/migration "
        "| integrity errors | lost | load 1m |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells(rows):
        lines.append(
            f"| {c.domains} | {c.workload} | {c.caller} | {c.agent} | {c.runs} | {c.seamless} "
            f"| {fmt(c.wall_s, '', 1)} | {fmt(c.wall_vs_off, '', 2)} | {fmt(c.added_s, '', 1)} "
            f"| {fmt(c.held_ms_median, '', 0)} | {fmt(c.throttled_ms_median, '', 0)} "
            f"| {fmt(c.agent_cpu_ms_per_hold, '', 1)} | {fmt(c.agent_peak_rss_mib, '', 1)} "
            f"| {fmt(c.controller_cpu_ms_per_migration, '', 0)} | {c.integrity_errors} "
            f"| {c.lost} | {fmt(c.load_1m, '', 1)} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plot


def plot(rows: list[Row], path: Path) -> None:
    """Evacuation wall per caller as horizontal bars, one group per (domains, workload),
    one bar per (caller, agent); plain SVG, no plotting library."""
    from html import escape

    colours = {"off": "#999999", "on": "#1f77b4", "bulk": "#ff7f0e"}
    bars = [c for c in cells(rows) if c.wall_s is not None]
    longest = max((c.wall_s or 0.0 for c in bars), default=1.0) or 1.0
    left, right, bar_h, gap, top = 190, 160, 14, 12, 40
    width = 760
    height = top + len(bars) * (bar_h + 3) + gap * len({(c.domains, c.workload) for c in bars}) + 30
    scale = (width - left - right) / longest
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">Evacuation wall per '
        "caller (s): agent off (grey), on (blue), bulk hold (orange)</text>",
    ]
    y = top
    group = None
    for c in bars:
        if (c.domains, c.workload) != group:
            group = (c.domains, c.workload)
            if y > top:
                y += gap
            parts.append(
                f'<text x="4" y="{y + 10}" font-weight="bold">'
                f"{c.domains} x {c.memory_mib} MiB, {escape(c.workload)}</text>"
            )
            y += bar_h + 3
        w = (c.wall_s or 0.0) * scale
        parts.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">'
                     f"{escape(c.caller)} / agent {escape(c.agent)}</text>")  # fmt: skip
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                     f'fill="{colours.get(c.agent, "#2ca02c")}"/>')  # fmt: skip
        label = f"{c.wall_s:.1f} s, {c.seamless} seamless"
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 11}">{escape(label)}</text>')
        y += bar_h + 3
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# ------------------------------------------------------------------------------ main


def _rotation(callers: list[str], agents: list[str]) -> list[tuple[str, str]]:
    """Every (caller, agent) once, in a fixed order. The agents step aside for our own
    controller: ``evacuate`` runs without them, ``ansible`` (our evacuate on the host) without
    and with them in their default mode, which measures what their presence costs."""
    skip = {"evacuate": {"on", "bulk"}, "evacuate-bulk": {"on", "bulk"}, "ansible": {"bulk"}}
    return [(c, a) for c in callers for a in agents if a not in skip.get(c, set())]


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__, summary=False)
    parser.add_argument("--domains", type=int, default=8)
    parser.add_argument("--memory", type=int, default=256, help="working set MiB per guest")
    parser.add_argument("--workloads", default="idle,dirty")
    parser.add_argument("--dirty-mib-s", type=int, default=4, help="the dirty workload's rate")
    parser.add_argument("--rtt", type=float, default=150.0)
    parser.add_argument("--callers", default=",".join(CALLERS))
    parser.add_argument("--agents", default="off,on,bulk")
    parser.add_argument("--parallel", type=int, default=8, help="evacuate/ansible at a time")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--budget-min", type=float, default=240.0, help="no new run after this")
    parser.add_argument("--up-timeout", type=float, default=1800.0, help="lab up's bound (s)")
    parser.add_argument("--out", type=Path, help="JSON lines, one row per run (appended)")
    parser.add_argument("--from-rows", help="comma list of rows files: print the table only")
    parser.add_argument("--plot", type=Path, help="with --from-rows: write the SVG plot here")
    args = parser.parse_args(argv)
    if args.from_rows:
        files = [Path(f) for f in args.from_rows.split(",") if f]
        loaded = [
            Row.model_validate_json(line)
            for f in files
            for line in f.read_text().splitlines()
            if line.strip()
        ]
        print(table(loaded))
        if args.plot:
            plot(loaded, args.plot)
        return 0
    callers = [c for c in args.callers.split(",") if c]
    agents = [a for a in args.agents.split(",") if a]
    if not set(callers) <= set(CALLERS) or not set(agents) <= set(AGENTS):
        parser.error(f"callers of {CALLERS}, agents of {tuple(AGENTS)}")
    started = time.monotonic()
    rows: list[Row] = []
    print(f"machine: {machine(tools=['qemu']).model_dump_json()}", file=sys.stderr, flush=True)
    for workload in [w for w in args.workloads.split(",") if w]:
        if time.monotonic() - started > args.budget_min * 60:
            break
        top = Path(tempfile.mkdtemp(prefix="sl-fleet-"))
        try:
            options = MemcheckOptions(
                working_set_mib=args.memory,
                dirty_mib_s=args.dirty_mib_s if workload == "dirty" else 0,
            )
            t_up = time.monotonic()
            try:
                state = libvirt_lab.up(
                    top / "libvirt", client_rtt_ms=args.rtt, guest="memcheck",
                    domains=args.domains, clients=True, memcheck_options=options,
                    timeout=args.up_timeout,
                )  # fmt: skip
            except Exception as exc:  # a fleet this host cannot bring up is a measurement too
                failed = Row(
                    domains=args.domains, memory_mib=args.memory, workload=workload,
                    dirty_mib_s=options.dirty_mib_s, rtt_ms=args.rtt, caller="lab-up",
                    agent="off", round=0, source="A", commit=source_state().commit,
                    dirty_tree=source_state().dirty, lab_up_s=round(time.monotonic() - t_up, 1),
                    caller_error=f"{type(exc).__name__}: {exc}"[:600],
                    load_1m_end=round(os.getloadavg()[0], 2),
                    mem_available_mib_end=_mem_available_mib(),
                )  # fmt: skip
                if args.out:
                    with args.out.open("a") as out:
                        out.write(failed.model_dump_json() + "\n")
                print(f"lab up failed after {failed.lab_up_s} s: {failed.caller_error}",
                      file=sys.stderr, flush=True)  # fmt: skip
                continue
            lab_up_s = round(time.monotonic() - t_up, 1)
            print(f"lab up: {args.domains} x {workload} in {lab_up_s:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f}, MemAvailable {_mem_available_mib()} MiB",
                  file=sys.stderr, flush=True)  # fmt: skip
            for round_ in range(args.rounds):
                for caller, agent in _rotation(callers, agents):
                    if time.monotonic() - started > args.budget_min * 60:
                        break
                    row = one_run(state, caller, agent, round_, workload, lab_up_s, args)
                    rows.append(row)
                    if args.out:
                        with args.out.open("a") as out:
                            out.write(row.model_dump_json() + "\n")
                    print(
                        f"{args.domains} {workload} {caller:8} {agent:4} r{round_}: "
                        f"{row.seamless}/{len(row.paths)} seamless, wall {row.wall_s} s, "
                        f"held {_median(row.held_ms)} ms, errors {row.integrity_errors}, "
                        f"lost {len(row.lost)}, load {row.load_1m_start}"
                        + (f", ERROR {row.caller_error[:200]}" if row.caller_error else ""),
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
        finally:
            libvirt_lab.down(top / "libvirt")
            shutil.rmtree(top, ignore_errors=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
