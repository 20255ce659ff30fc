"""Never lose a guest: hundreds of migrations of guests that check themselves, methods alternated.

One two-host libvirt lab, a ``spice-libvirt watch`` client attached from the client namespace
at ``--rtt`` ms (150), and four ways to migrate, alternated migration by migration so they
share the machine's load:

* ``plain``: ``virsh migrate --live --p2p``, nothing of ours running (the baseline);
* ``qmp``: our controller, held by QEMU's bandwidth through the QMP passthrough (taints);
* ``floor``: our controller, held at libvirt's 1 MiB/s speed floor (taint-free);
* ``agent``: the same ``virsh migrate`` with the host agent running in both hosts.

Phases (each resumable: rows are appended as they come, a restart continues where the file
stops, up to ``--max-hours`` per run):

``memcheck``
    the memcheck guest under TCG, ``--working-set-mib`` (256) rewritten at
    ``--dirty-mib-s`` (32) and idle, in alternating blocks; ``--memcheck`` migrations per
    method (half of them dirtying).
``linux``
    the ``linux`` guest (the one lost once, see docs/findings.md) with its memory dirtier,
    ``--linux`` held (``qmp``, the hold it was lost with) and plain migrations; its console
    is searched for a panic after each.
``kvm``
    the memcheck guest under this machine's nested KVM with a small working set
    (``--kvm-working-set-mib``, idle: a memory loop there is thousands of times slower than
    under TCG), ``--kvm`` migrations per method: the same hold on another platform.

After each migration: the migration's result, the client's own verdict (its ``watch`` line),
the controller's or the agent's, and the guest's own account from the destination once it
finished a whole pass there (memcheck) or a few seconds later (linux): alive, integrity
errors, the first bad page. A guest that is lost or found errors is replaced by a fresh one
(so every error is counted once, against the migration that caused it).

    .venv/bin/python benchmarks/bench_integrity.py --phases memcheck,linux,kvm --max-hours 6
    .venv/bin/python benchmarks/bench_integrity.py --report      # the table from the rows
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from benchmarks.benchutil import RESULTS_DIR, Machine, arg_parser, machine, source_state
from spice_libvirt.libvirt.request import LibvirtMigrationRequest
from spice_libvirt_lab import libvirt_agent, libvirt_lab
from spice_libvirt_lab.libvirt_lab import GuestKind, LabState
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from spice_libvirt_lab.libvirt_status import account_after_pass, guest_accounts, serial_console
from spice_libvirt_lab.memcheck import GuestAccount, MemcheckOptions

METHODS = ("plain", "qmp", "floor", "agent")
LINUX_METHODS = ("plain", "qmp")
ROWS = RESULTS_DIR / "integrity.jsonl"
#: what a Linux console says when the kernel is in trouble
PANIC = re.compile(r"Kernel panic|BUG:|Oops|general protection fault|Call Trace")
#: the linux guest's memory dirtier, as in the busy-guest benchmark that lost it
LINUX_DIRTIER = "dirty_mb=32 dirty_ms=20"
#: memcheck rows per mode block before the other mode's block
BLOCK = 10


class Row(BaseModel):
    phase: str
    index: int
    method: str
    mode: str
    guest: str
    accel: str
    working_set_mib: int | None = None
    dirty_mib_s: int | None = None
    src: str
    dst: str | None = None
    migrated: bool = False
    error: str | None = None
    wall_s: float | None = None
    client_path: str | None = None
    outcome: str | None = None
    hold: str | None = None
    held_ms: float | None = None
    alive: bool = False
    errors: int | None = None
    passes_before: int | None = None
    passes_after: int | None = None
    boot_same: bool | None = None
    first_bad: dict[str, Any] | None = None
    fault: str | None = None
    panic: str | None = None
    load_1m: float
    at: str
    commit: str | None
    dirty_tree: bool


# --------------------------------------------------------------------------- the lab


def client_lines(state: LabState) -> int:
    path = state.run_dir / "clients" / f"{state.domain}.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def client_verdict(state: LabState, before: int, timeout: float = 15.0) -> str | None:
    """The path of the client's first verdict line after ``before`` (None: no word)."""
    path = state.run_dir / "clients" / f"{state.domain}.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) > before:
            with contextlib.suppress(ValueError):
                return str(json.loads(lines[before]).get("path"))
            return "unreadable"
        time.sleep(0.1)
    return None


def client_alive(state: LabState) -> bool:
    return all(c.proc.alive() for c in state.clients if c.domain == state.domain)


def account(state: LabState) -> GuestAccount:
    (only,) = guest_accounts(state.lab_dir)
    return only


def running_on(state: LabState) -> str | None:
    with contextlib.suppress(Exception):
        return libvirt_agent.running_host(state)[0]
    return None


# --------------------------------------------------------------------------- one migration


def hold_options(method: str) -> dict[str, Any]:
    """The controller's request options that select ``method``'s hold explicitly."""
    options: dict[str, Any] = {"hold": "qmp" if method == "qmp" else "libvirt"}
    if method == "qmp" and "allow_taint" in LibvirtMigrationRequest.model_fields:
        options["allow_taint"] = True
    return options


def migrate(state: LabState, method: str, row: Row) -> None:
    """One migration by ``method``; fills the migration's part of ``row``."""
    src = row.src
    dst = "B" if src == "A" else "A"
    t0 = time.monotonic()
    if method in ("qmp", "floor"):
        report = lab_migrate(state.lab_dir, watch=False, options=hold_options(method))
        row.migrated = report.migration.status == "completed"
        row.error = report.error
        row.outcome = report.outcome
        row.hold = report.hold.applied
        row.held_ms = report.hold.held_ms
    else:
        seen = len(libvirt_agent.verdicts(state, src)) if method == "agent" else 0
        done = subprocess.run(
            libvirt_agent.plain_migrate_argv(state, src, dst),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        row.migrated = done.returncode == 0
        row.error = done.stderr.strip()[-300:] or None
        if method == "agent":
            with contextlib.suppress(Exception):
                verdict = libvirt_agent.next_verdict(state, src, seen, timeout=30.0)
                row.outcome = verdict.get("outcome")
                row.held_ms = verdict.get("held_ms")
                row.hold = verdict.get("hold")
    row.wall_s = round(time.monotonic() - t0, 3)
    row.dst = running_on(state)


def check_memcheck(state: LabState, before: GuestAccount, row: Row, timeout: float) -> None:
    after = account_after_pass(state.lab_dir, before, timeout)
    row.alive = after.alive and (after.passes or 0) >= (before.passes or 0) + 2
    row.errors = after.errors
    row.passes_before, row.passes_after = before.passes, after.passes
    row.boot_same = after.boot == before.boot if after.boot else None
    row.first_bad = after.first_bad.model_dump() if after.first_bad else None
    row.fault = after.fault
    if row.boot_same is False:
        row.alive = False


def check_linux(state: LabState, row: Row, console_mark: dict[str, int]) -> None:
    """Alive: running on the destination five seconds on, no panic on either console."""
    time.sleep(5.0)
    host = running_on(state)
    texts = []
    for h in ("A", "B"):
        path = serial_console(state, h, state.domain)
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            texts.append(data[console_mark.get(h, 0) :].decode(errors="replace"))
            console_mark[h] = len(data)
    found = [m.group(0) for t in texts for m in [PANIC.search(t)] if m]
    row.panic = found[0] if found else None
    row.alive = host is not None and host == row.dst and row.panic is None


# --------------------------------------------------------------------------- phases


def plan(phase: str, args: Any) -> list[tuple[str, str]]:
    """(method, mode) of every migration of ``phase``, in the order they run."""
    if phase == "memcheck":
        per_mode = args.memcheck // 2
        out: list[tuple[str, str]] = []
        for start in range(0, per_mode, BLOCK):
            for mode in ("dirty", "idle"):
                for _ in range(min(BLOCK, per_mode - start)):
                    out += [(m, mode) for m in METHODS]
        return out
    if phase == "linux":
        return [(m, "dirty") for _ in range(args.linux) for m in LINUX_METHODS]
    return [(m, "idle") for _ in range(args.kvm) for m in METHODS]


def guest_for(phase: str, mode: str, args: Any) -> tuple[GuestKind, MemcheckOptions | None, str]:
    if phase == "linux":
        return "linux", None, LINUX_DIRTIER
    if phase == "kvm":
        options = MemcheckOptions(
            working_set_mib=args.kvm_working_set_mib, dirty_mib_s=0, pass_ms=args.kvm_pass_ms
        )
        return "memcheck", options, ""
    dirty = args.dirty_mib_s if mode == "dirty" else 0
    return "memcheck", MemcheckOptions(working_set_mib=args.working_set_mib, dirty_mib_s=dirty), ""


@contextlib.contextmanager
def agents_when(state: LabState, on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    with libvirt_agent.running_agents(state):
        yield


def run_phase(phase: str, args: Any, rows: list[Row], deadline: float) -> None:
    lab_dir = args.lab_dir
    done = [r for r in rows if r.phase == phase]
    todo = plan(phase, args)[len(done) :]
    accel = "kvm" if phase == "kvm" else "tcg"
    os.environ["SPICE_LIBVIRT_MEMCHECK_ACCEL"] = accel
    current: tuple[str, str] | None = None
    fresh = True
    console_mark: dict[str, int] = {}
    for index, (method, mode) in enumerate(todo, start=len(done)):
        if time.monotonic() > deadline:
            print(f"{phase}: out of time after {index} rows", file=sys.stderr, flush=True)
            return
        guest, options, kernel_args = guest_for(phase, mode, args)
        state = libvirt_lab.load_state(lab_dir)
        assert state is not None
        wanted = (guest, repr(options) + kernel_args)
        if fresh or wanted != current or not client_alive(state):
            state = libvirt_lab.restart_guest(
                lab_dir, guest=guest, memcheck_options=options, kernel_args=kernel_args
            )
            current, fresh, console_mark = wanted, False, {}
            time.sleep(1.0)
        src = running_on(state) or "A"
        sstate = source_state()
        row = Row(
            phase=phase,
            index=index,
            method=method,
            mode=mode,
            guest=guest,
            accel=accel,
            working_set_mib=options.working_set_mib if options else None,
            dirty_mib_s=options.dirty_mib_s if options else None,
            src=src,
            load_1m=round(os.getloadavg()[0], 2),
            at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            commit=sstate.commit,
            dirty_tree=sstate.dirty,
        )
        before = account(state) if guest == "memcheck" else None
        lines = client_lines(state)
        try:
            with agents_when(state, method == "agent"):
                migrate(state, method, row)
                row.client_path = client_verdict(state, lines) if row.migrated else None
                if before is not None:
                    wait = args.kvm_check_timeout if phase == "kvm" else args.check_timeout
                    check_memcheck(state, before, row, wait)
                else:
                    check_linux(state, row, console_mark)
        except Exception as exc:  # one bad run is a row, not the end of the soak
            row.error = f"{type(exc).__name__}: {exc}"[-400:]
        rows.append(row)
        with args.rows.open("a") as out:
            out.write(row.model_dump_json() + "\n")
        print(
            f"{phase} {index:4} {method:6} {mode:5} {row.src}->{row.dst}: "
            f"{'migrated' if row.migrated else 'NOT MIGRATED'} {row.client_path} "
            f"held {row.held_ms} | {'alive' if row.alive else 'LOST'} errors {row.errors} "
            f"{row.panic or row.fault or ''} load {row.load_1m}",
            file=sys.stderr,
            flush=True,
        )
        fresh = not row.alive or bool(row.errors)


# --------------------------------------------------------------------------- the table


class Cell(BaseModel):
    method: str
    guest: str
    migrations: int
    seamless: int
    integrity_errors: int
    guests_lost: int
    not_migrated: int


def cells(rows: list[Row]) -> list[Cell]:
    out = []
    keys = sorted({(r.phase, r.method) for r in rows}, key=lambda k: (k[0], METHODS.index(k[1])))
    for phase, method in keys:
        mine = [r for r in rows if (r.phase, r.method) == (phase, method)]
        moved = [r for r in mine if r.migrated]
        guest = {
            "memcheck": "memcheck 256 MiB, TCG (dirtying / idle)",
            "linux": "linux (dirtier on), TCG",
            "kvm": "memcheck small, nested KVM",
        }.get(phase, phase)
        if phase == "memcheck" and mine and mine[0].working_set_mib:
            guest = guest.replace("256", str(mine[0].working_set_mib))
        out.append(
            Cell(
                method=method,
                guest=guest,
                migrations=len(moved),
                seamless=sum(r.client_path == "seamless" for r in moved),
                integrity_errors=sum(bool(r.errors) for r in moved),
                guests_lost=sum(not r.alive for r in moved),
                not_migrated=len(mine) - len(moved),
            )
        )
    return out


NAMES = {
    "plain": "plain libvirt (virsh)",
    "qmp": "ours: QMP throttle",
    "floor": "ours: libvirt speed floor",
    "agent": "agent + plain virsh",
}


def table(rows: list[Row]) -> str:
    lines = [
        "| method | guest | migrations | seamless | integrity errors | guests lost |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in cells(rows):
        failed = f" (+{c.not_migrated} failed)" if c.not_migrated else ""
        lines.append(
            f"| {NAMES.get(c.method, c.method)} | {c.guest} | {c.migrations}{failed} | "
            f"{c.seamless}/{c.migrations} | {c.integrity_errors} | {c.guests_lost} |"
        )
    if rows:
        commits = sorted({f"{r.commit}{'+dirty' if r.dirty_tree else ''}" for r in rows})
        loads = sorted(r.load_1m for r in rows)
        lines.append(
            f"\n{len(rows)} rows, {rows[0].at} .. {rows[-1].at}; commit(s) {', '.join(commits)}; "
            f"load(1m) median {loads[len(loads) // 2]} (min {loads[0]}, max {loads[-1]})"
        )
    return "\n".join(lines)


def load_rows(path: Path) -> list[Row]:
    if not path.exists():
        return []
    return [Row.model_validate_json(line) for line in path.read_text().splitlines() if line]


class Summary(BaseModel):
    machine: Machine
    argv: str
    cells: list[Cell]


# --------------------------------------------------------------------------- main


def _interrupted(signum: int, _frame: object) -> None:
    """SIGTERM ends the run like ^C: the lab comes down (unless kept), the rows stay."""
    raise KeyboardInterrupt(f"signal {signum}")


def ensure_lab(args: Any) -> None:
    state = libvirt_lab.load_state(args.lab_dir)
    if state is not None and state.phase == "up" and libvirt_lab.status(args.lab_dir).healthy:
        return
    if state is not None:
        libvirt_lab.down(args.lab_dir)
    libvirt_lab.up(
        args.lab_dir,
        client_rtt_ms=args.rtt,
        guest="memcheck",
        memcheck_options=MemcheckOptions(working_set_mib=args.working_set_mib),
        clients=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__, summary=False)
    parser.add_argument("--phases", default="memcheck,linux,kvm", help="comma list, in order")
    parser.add_argument("--memcheck", type=int, default=200, help="migrations per method")
    parser.add_argument("--linux", type=int, default=100, help="held and plain migrations each")
    parser.add_argument("--kvm", type=int, default=25, help="migrations per method under KVM")
    parser.add_argument("--working-set-mib", type=int, default=256)
    parser.add_argument("--dirty-mib-s", type=int, default=32)
    parser.add_argument("--kvm-working-set-mib", type=int, default=1)
    parser.add_argument("--kvm-pass-ms", type=int, default=5000)
    parser.add_argument("--rtt", type=float, default=150.0, help="client RTT, ms")
    parser.add_argument("--check-timeout", type=float, default=60.0, help="s for a whole pass")
    parser.add_argument(
        "--kvm-check-timeout",
        type=float,
        default=300.0,
        help="s for a whole pass under KVM (a pass of 1 MiB took 8-21 s there)",
    )
    parser.add_argument("--max-hours", type=float, default=8.0, help="stop (resumable) after")
    parser.add_argument(
        "--lab-dir",
        type=Path,
        default=Path("/run/spice-libvirt") / os.environ.get("USER", "root") / "integrity-lab",
        help="the lab (kept between runs, so a run resumes where the last one stopped)",
    )
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab up at the end")
    parser.add_argument("--report", action="store_true", help="only print the table of the rows")
    parser.add_argument("--rows", type=Path, default=ROWS, help="the rows file (appended to)")
    args = parser.parse_args(argv)
    rows = load_rows(args.rows)
    if args.report:
        print(table(rows))
        return 0
    deadline = time.monotonic() + args.max_hours * 3600
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        ensure_lab(args)
        for phase in [p for p in args.phases.split(",") if p]:
            run_phase(phase, args, rows, deadline)
    except KeyboardInterrupt:
        print("interrupted: the rows so far are kept", file=sys.stderr)
    finally:
        if not args.keep_lab:
            with contextlib.suppress(Exception):
                libvirt_lab.down(args.lab_dir)
    summary = Summary(
        machine=machine(tools=["qemu"]),
        argv=" ".join(["bench_integrity.py", *(argv if argv is not None else sys.argv[1:])]),
        cells=cells(rows),
    )
    args.rows.with_suffix(".json").write_text(summary.model_dump_json(indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
