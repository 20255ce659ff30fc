"""QEMU's TCG loses dirty pages in migration: a reproducer without SPICE and without our code.

Two plain QEMUs on loopback (no SPICE, no display, no libvirt, nothing of spice-libvirt but
the memcheck guest image), the memcheck guest under TCG, migrated back and forth over QMP.
Each migration is driven through the parameter sequence one of the holds uses, written out
here as bare QMP commands:

* ``plain``: what libvirt does unheld: unlimited bandwidth, QEMU's 300 ms downtime limit;
* ``floor``: our controller's taint-free hold: 1 MiB/s from the start, unlimited after
  ``--hold-s`` (the client's link time);
* ``throttle``: our controller's QMP hold: 1 MiB/s, then 4 KiB/s once QEMU says ``active``,
  unlimited after ``--hold-s``;
* ``agent``: the host agent's hold of a migration someone else started: unlimited, then at
  ``setup`` 1 MiB/s and a 1 ms downtime limit, the caller's values back after ``--hold-s``.

After each migration the guest must report from the destination within a few seconds (else
it is *lost*: it printed a CPU fault or stopped), with no integrity error. The guest runs with
its TLB flushes off (``tlb_flush=0``, the bug as it is) and on (the lab's default), and the
sequences alternate within each. The cause (QEMU before 9.0 does not reset its software TLB
when a dirty-bitmap sync clears a page's bit; upstream commit 03bfc2188f) is in
docs/findings.md.

    .venv/bin/python benchmarks/repro_tcg_dirty.py --migrations 50 --working-set-mib 32 --dirty-mib-s 4
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from qemu.qmp import ConnectError, QMPClient

from benchmarks.benchutil import Machine, arg_parser, finish, machine, source_state
from spice_libvirt_lab import memcheck
from spice_libvirt_lab.ports import free_tcp_port

SEQUENCES = ("plain", "floor", "throttle", "agent")
UNLIMITED = 1 << 40  # bytes/s: what libvirt's "unlimited" speed amounts to
FLOOR = 1 << 20  # libvirt's 1 MiB/s floor
THROTTLE = 4096  # the QMP hold
REPORT_WAIT_S = 4.0


class Row(BaseModel):
    index: int
    sequence: str
    tlb_flush: bool
    status: str
    total_ms: int | None = None
    downtime_ms: int | None = None
    dirty_syncs: int | None = None
    lost: bool = False
    errors: int | None = None
    first_bad: dict[str, Any] | None = None
    fault: str | None = None
    load_1m: float
    commit: str | None
    dirty_tree: bool


class Cell(BaseModel):
    sequence: str
    tlb_flush: bool
    migrations: int
    lost: int
    with_errors: int


class Summary(BaseModel):
    machine: Machine
    commit: str | None
    dirty_tree: bool
    started_at: str
    seconds: float
    argv: str
    working_set_mib: int
    dirty_mib_s: int
    hold_s: float
    load_1m_start: float
    load_1m_end: float
    cells: list[Cell]


class Vm:
    """One QEMU with the memcheck guest and a QMP socket (no SPICE, no display)."""

    def __init__(self, workdir: Path, name: str, image: Path, guest: str, ram_mib: int) -> None:
        self.serial = workdir / f"{name}.serial"
        self.qmp_path = workdir / f"{name}.qmp"
        self.argv = [
            os.environ.get("SPICE_LIBVIRT_QEMU", "qemu-system-x86_64"),
            "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-m", str(ram_mib),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(image), "-append", guest,
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        self.log = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(name)

    async def start(self, incoming: str | None = None) -> None:
        for stale in (self.serial, self.qmp_path):
            stale.unlink(missing_ok=True)
        argv = self.argv + (["-incoming", incoming] if incoming else [])
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while True:  # the socket file shows a moment before QEMU listens on it
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {self.log.read_text()[-300:]}")
            try:
                await self.qmp.connect(str(self.qmp_path))
                return
            except ConnectError:
                self.qmp = QMPClient(self.qmp.name)
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.qmp = QMPClient(self.qmp.name)

    async def params(self, **values: int) -> None:
        args = {k.replace("_", "-"): v for k, v in values.items()}
        await self.qmp.execute("migrate-set-parameters", args)

    async def status(self) -> dict[str, Any]:
        reply = await self.qmp.execute("query-migrate")
        assert isinstance(reply, dict)
        return reply


async def _wait_status(vm: Vm, wanted: tuple[str, ...], timeout: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = await vm.status()
        if info.get("status") in wanted or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.005)


async def migrate(src: Vm, port: int, sequence: str, hold_s: float) -> dict[str, Any]:
    """One migration through ``sequence``'s parameter changes; QEMU's final query-migrate."""
    start_speed = FLOOR if sequence in ("floor", "throttle") else UNLIMITED
    await src.params(max_bandwidth=start_speed, downtime_limit=300)
    await src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    if sequence != "plain":
        phase = ("setup", "active") if sequence == "agent" else ("active",)
        await _wait_status(src, (*phase, "completed", "failed"))
        if sequence == "throttle":
            await src.params(max_bandwidth=THROTTLE)
        elif sequence == "agent":
            await src.params(max_bandwidth=FLOOR, downtime_limit=1)
        await asyncio.sleep(hold_s)
        if (await src.status()).get("status") not in ("completed", "failed"):
            await src.params(max_bandwidth=UNLIMITED, downtime_limit=300)
    return await _wait_status(src, ("completed", "failed", "cancelled"))


def _verdict(serial: Path, since: float) -> tuple[bool, memcheck.Console]:
    """(alive, console): alive when the destination reported after the migration."""
    console = memcheck.read_console(serial)
    fresh = console.written_at is not None and console.written_at >= since
    return fresh and console.report is not None and console.fault is None, console


@contextlib.asynccontextmanager
async def pair(workdir: Path, image: Path, guest: str, ram_mib: int) -> AsyncIterator[list[Vm]]:
    vms = [Vm(workdir, name, image, guest, ram_mib) for name in ("x", "y")]
    try:
        yield vms
    finally:
        for vm in vms:
            await vm.stop()


async def series(args: Any, workdir: Path, image: Path, tlb_flush: bool, rows: list[Row]) -> None:
    options = memcheck.MemcheckOptions(
        working_set_mib=args.working_set_mib, dirty_mib_s=args.dirty_mib_s, pass_ms=500
    )
    guest = f"{options.cmdline()} tlb_flush={int(tlb_flush)}"
    async with pair(workdir, image, guest, options.memory_mib) as vms:
        src, dst = vms
        fresh = True
        for i in range(args.migrations * len(SEQUENCES)):
            sequence = SEQUENCES[i % len(SEQUENCES)]
            if fresh:
                await src.stop()
                await src.start()
                await asyncio.to_thread(memcheck.wait_ready, src.serial, 120)
                await asyncio.sleep(1.0)
                fresh = False
            port = free_tcp_port()
            await dst.start(f"tcp:127.0.0.1:{port}")
            info = await migrate(src, port, sequence, args.hold_s)
            state = source_state()
            row = Row(
                index=i,
                sequence=sequence,
                tlb_flush=tlb_flush,
                status=str(info.get("status")),
                total_ms=info.get("total-time"),
                downtime_ms=info.get("downtime"),
                dirty_syncs=(info.get("ram") or {}).get("dirty-sync-count"),
                load_1m=round(os.getloadavg()[0], 2),
                commit=state.commit,
                dirty_tree=state.dirty,
            )
            if row.status != "completed":
                await dst.stop()
                rows.append(row)
                continue
            done = time.time()
            await src.stop()
            await asyncio.sleep(REPORT_WAIT_S)
            alive, console = _verdict(dst.serial, done)
            row.lost = not alive
            row.fault = console.fault
            if console.report is not None:
                row.errors = console.report.errors
                if console.report.first_bad is not None:
                    row.first_bad = console.report.first_bad.model_dump()
            rows.append(row)
            print(
                f"flush={int(tlb_flush)} {i:3} {sequence:8} {row.total_ms} ms, "
                f"{row.dirty_syncs} syncs: {'LOST' if row.lost else 'ok'} errors {row.errors}"
                f"{' ' + row.fault if row.fault else ''}",
                file=sys.stderr,
                flush=True,
            )
            src, dst = dst, src
            fresh = row.lost or bool(row.errors)


def cells(rows: list[Row]) -> list[Cell]:
    out = []
    for flush in (False, True):
        for sequence in SEQUENCES:
            mine = [r for r in rows if r.tlb_flush == flush and r.sequence == sequence]
            done = [r for r in mine if r.status == "completed"]
            if mine:
                out.append(
                    Cell(
                        sequence=sequence,
                        tlb_flush=flush,
                        migrations=len(done),
                        lost=sum(r.lost for r in done),
                        with_errors=sum(bool(r.errors) for r in done),
                    )
                )
    return out


def table(summary: Summary) -> str:
    lines = [
        "| guest TLB flushes | parameter sequence | migrations | guest lost | integrity errors |",
        "|---|---|---:|---:|---:|",
    ]
    for c in summary.cells:
        flush = "on (lab default)" if c.tlb_flush else "off (tlb_flush=0)"
        lines.append(f"| {flush} | {c.sequence} | {c.migrations} | {c.lost} | {c.with_errors} |")
    lines.append(
        f"\nmemcheck {summary.working_set_mib} MiB at {summary.dirty_mib_s} MiB/s, hold "
        f"{summary.hold_s} s, TCG, {summary.machine.versions.get('qemu', 'qemu ?')}; commit "
        f"{summary.commit}{' (dirty tree)' if summary.dirty_tree else ''}; load(1m) "
        f"{summary.load_1m_start} -> {summary.load_1m_end}; {summary.seconds / 60:.1f} min"
    )
    return "\n".join(lines)


async def run(args: Any) -> list[Row]:
    image = memcheck.ensure_memcheck_guest().image
    workdir = Path(tempfile.mkdtemp(prefix="sl-repro-"))
    rows: list[Row] = []
    try:
        flushes = {"off": [False], "on": [True], "both": [False, True]}[args.tlb_flush]
        for flush in flushes:
            await series(args, workdir, image, flush, rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--migrations", type=int, default=25, help="per sequence and flush mode")
    parser.add_argument("--working-set-mib", type=int, default=32)
    parser.add_argument("--dirty-mib-s", type=int, default=4)
    parser.add_argument("--hold-s", type=float, default=1.0, help="how long a hold lasts")
    parser.add_argument("--tlb-flush", choices=("off", "on", "both"), default="both")
    parser.add_argument("--name", default="tcg-dirty-repro", help="results file name")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    load0 = round(os.getloadavg()[0], 2)
    rows = asyncio.run(run(args))
    state = source_state()
    summary = Summary(
        machine=machine(tools=["qemu"]),
        commit=state.commit,
        dirty_tree=state.dirty,
        started_at=started.isoformat(),
        seconds=round(time.monotonic() - t0, 1),
        argv=" ".join(["repro_tcg_dirty.py", *(argv if argv is not None else sys.argv[1:])]),
        working_set_mib=args.working_set_mib,
        dirty_mib_s=args.dirty_mib_s,
        hold_s=args.hold_s,
        load_1m_start=load0,
        load_1m_end=round(os.getloadavg()[0], 2),
        cells=cells(rows),
    )
    return finish(args.name, summary, args, table, rows=(args.name, [r.model_dump() for r in rows]))


if __name__ == "__main__":
    sys.exit(main())
