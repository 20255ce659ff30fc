"""The memcheck guest's own figures: boot, fill, one verify pass, and how fast it reports a
flipped bit, under TCG and under this machine's nested KVM.

Each round starts the guest in QEMU exactly as the lab does (SPICE, qxl, the serial console
to a file: :mod:`spice_libvirt_lab.qemu_process`), and measures on the host's clock:

* ``boot_s``: QEMU spawned -> the guest's first line (``MEMCHECK-BOOT``) on its console;
* ``ready_s``: -> ``MEMCHECK-READY`` (the working set filled);
* ``pass_ms``: the guest's own time for one whole verify pass (its ``pass_took_ms``);
* ``detect_s``: one bit of one page flipped through ``/proc/PID/mem`` -> the guest's report
  naming that page (a page chosen at random in the working set, ``--pass-ms`` apart).

``--linux-kvm`` also boots the lab's ``linux`` guest under the nested KVM once per round and
records how long it takes to print anything (``boot_s``) and ``GUEST-READY`` (``ready_s``),
within ``--linux-timeout``: whether the lost-guest series can run under this machine's KVM.

    .venv/bin/python benchmarks/bench_memcheck.py --rounds 5
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import argparse
import asyncio
import datetime as dt
import os
import random
import shutil
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
    source_state,
)
from spice_libvirt_lab import memcheck
from spice_libvirt_lab.memcheck import MemcheckOptions
from spice_libvirt_lab.qemu_process import QemuGroup, QemuInstance

Accel = Literal["tcg", "kvm"]


class Round(BaseModel):
    guest: str = "memcheck"
    accel: Accel
    index: int
    working_set_mib: int
    boot_s: float | None = None
    ready_s: float | None = None
    pass_ms: int | None = None
    detect_s: float | None = None
    detected_page: int | None = None
    error: str | None = None
    load_1m: float
    commit: str | None
    dirty_tree: bool


class Cell(BaseModel):
    accel: Accel
    working_set_mib: int
    rounds: int
    boot_s: Distribution
    ready_s: Distribution
    pass_ms: Distribution
    detect_s: Distribution


class Summary(BaseModel):
    machine: Machine
    commit: str | None
    dirty_tree: bool
    started_at: str
    argv: str
    cells: list[Cell]
    linux_kvm: list[Round] = []


async def _console_line(vm: QemuInstance, text: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while text not in vm.serial_text():
        if time.monotonic() > deadline or not vm.is_running():
            raise TimeoutError(f"no {text} within {timeout:.0f} s")
        await asyncio.sleep(0.005)
    return time.monotonic()


async def _report(
    vm: QemuInstance, accept: object, timeout: float
) -> tuple[float, memcheck.MemcheckReport]:
    assert callable(accept)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = memcheck.read_console(vm.serial_log).report
        if report is not None and accept(report):
            return time.monotonic(), report
        await asyncio.sleep(0.005)
    raise TimeoutError(f"no such report within {timeout:.0f} s")


async def one_round(
    vms: QemuGroup, accel: Accel, index: int, options: MemcheckOptions, timeout: float
) -> Round:
    state = source_state()
    row = Round(
        accel=accel,
        index=index,
        working_set_mib=options.working_set_mib,
        load_1m=round(os.getloadavg()[0], 2),
        commit=state.commit,
        dirty_tree=state.dirty,
    )
    started = time.monotonic()
    vm = await vms(
        f"{accel}{index}",
        guest="memcheck",
        memory_mib=options.memory_mib,
        memcheck=options,
        accel=accel,
        timeout=60.0,
    )
    try:
        row.boot_s = round(await _console_line(vm, "MEMCHECK-BOOT", timeout) - started, 3)
        row.ready_s = round(await _console_line(vm, memcheck.READY_MARKER, timeout) - started, 3)
        _, checked = await _report(vm, lambda r: r.passes >= 2, timeout)
        row.pass_ms = checked.pass_took_ms
        page = random.randrange(options.working_set_mib * 256)
        memcheck.corrupt_page(vm.pid, page, options.memory_mib)
        flipped = time.monotonic()
        found_at, found = await _report(vm, lambda r: r.errors > 0, timeout)
        row.detect_s = round(found_at - flipped, 3)
        row.detected_page = found.first_bad.page if found.first_bad else None
    except (TimeoutError, OSError) as exc:
        row.error = str(exc)
    finally:
        await vm.stop()
    return row


async def linux_round(vms: QemuGroup, index: int, timeout: float) -> Round:
    """The linux guest under KVM: seconds to its first console line and to GUEST-READY."""
    state = source_state()
    row = Round(
        guest="linux",
        accel="kvm",
        index=index,
        working_set_mib=0,
        load_1m=round(os.getloadavg()[0], 2),
        commit=state.commit,
        dirty_tree=state.dirty,
    )
    started = time.monotonic()
    vm = await vms(f"linux{index}", guest="linux", memory_mib=256, accel="kvm", timeout=60.0)
    try:
        deadline = started + timeout
        while time.monotonic() < deadline and vm.is_running():
            text = vm.serial_text()
            if row.boot_s is None and text.strip():
                row.boot_s = round(time.monotonic() - started, 3)
            if "GUEST-READY" in text:
                row.ready_s = round(time.monotonic() - started, 3)
                break
            await asyncio.sleep(0.5)
        else:
            row.error = f"no GUEST-READY within {timeout:.0f} s" + (
                "" if row.boot_s else ", not a line on the console"
            )
    finally:
        await vm.stop()
    return row


def cells(rows: list[Round]) -> list[Cell]:
    out = []
    memcheck_rows = [r for r in rows if r.guest == "memcheck"]
    for accel, mib in sorted({(r.accel, r.working_set_mib) for r in memcheck_rows}):
        mine = [r for r in memcheck_rows if (r.accel, r.working_set_mib) == (accel, mib)]

        def dist(values: list[float | int | None]) -> Distribution:
            return distribution([float(v) for v in values if v is not None])

        out.append(
            Cell(
                accel=accel,
                working_set_mib=mib,
                rounds=len(mine),
                boot_s=dist([r.boot_s for r in mine]),
                ready_s=dist([r.ready_s for r in mine]),
                pass_ms=dist([r.pass_ms for r in mine]),
                detect_s=dist([r.detect_s for r in mine]),
            )
        )
    return out


def table(summary: Summary) -> str:
    lines = [
        "| accel | working set | rounds | boot (first line) | filled | one verify pass | "
        "flipped bit reported |",
        "|---|---:|---:|---|---|---|---|",
    ]

    def span(d: Distribution, unit: str, digits: int) -> str:
        if not d.n:
            return "-"
        return f"{fmt(d.median, unit, digits)} (max {fmt(d.max, unit, digits)})"

    for c in summary.cells:
        lines.append(
            f"| {c.accel} | {c.working_set_mib} MiB | {c.rounds} | {span(c.boot_s, ' s', 2)} | "
            f"{span(c.ready_s, ' s', 2)} | {span(c.pass_ms, ' ms', 0)} | "
            f"{span(c.detect_s, ' s', 2)} |"
        )
    for r in summary.linux_kvm:
        ready = f"GUEST-READY after {r.ready_s} s" if r.ready_s else r.error
        first = f"first console line after {r.boot_s} s" if r.boot_s else "no console line"
        lines.append(
            f"\nlinux guest under the nested KVM, round {r.index}: {first}; {ready} (load {r.load_1m})"
        )
    m = summary.machine
    lines.append(
        f"\n{m.cpus} CPUs, load(1m) {m.load_avg_1m}; {m.versions.get('qemu', '')}; commit "
        f"{summary.commit}{' (dirty tree)' if summary.dirty_tree else ''}; `{summary.argv}`"
    )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[Round]:
    rows: list[Round] = []
    workdir = Path(tempfile.mkdtemp(prefix="sl-mc-"))
    plans: list[tuple[Accel, MemcheckOptions]] = [
        ("tcg", MemcheckOptions(working_set_mib=args.tcg_mib, pass_ms=args.pass_ms)),
    ]
    if not args.no_kvm:
        plans.append(("kvm", MemcheckOptions(working_set_mib=args.kvm_mib, pass_ms=args.pass_ms)))
    try:
        async with QemuGroup(workdir) as vms:
            for index in range(args.rounds):
                for accel, options in plans:  # alternated: both share the machine's load
                    timeout = 60.0 if accel == "tcg" else 600.0
                    row = await one_round(vms, accel, index, options, timeout)
                    rows.append(row)
                    print(
                        f"{accel} {index}: boot {row.boot_s} s, ready {row.ready_s} s, pass "
                        f"{row.pass_ms} ms, detected {row.detect_s} s {row.error or ''}",
                        file=sys.stderr,
                        flush=True,
                    )
                if args.linux_kvm:
                    row = await linux_round(vms, index, args.linux_timeout)
                    rows.append(row)
                    print(f"linux kvm {index}: {row}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tcg-mib", type=int, default=256, help="TCG working set")
    parser.add_argument("--kvm-mib", type=int, default=1, help="KVM working set")
    parser.add_argument("--pass-ms", type=int, default=1000)
    parser.add_argument("--no-kvm", action="store_true", help="TCG only")
    parser.add_argument("--linux-kvm", action="store_true", help="also boot linux under KVM")
    parser.add_argument("--linux-timeout", type=float, default=600.0, help="s for linux")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    rows = asyncio.run(run(args))
    state = source_state()
    summary = Summary(
        machine=machine(tools=["qemu"]),
        commit=state.commit,
        dirty_tree=state.dirty,
        started_at=started.isoformat(),
        argv=" ".join(["bench_memcheck.py", *(argv if argv is not None else sys.argv[1:])]),
        cells=cells(rows),
        linux_kvm=[r for r in rows if r.guest == "linux"],
    )
    return finish(
        "memcheck-guest",
        summary,
        args,
        table,
        rows=("memcheck-guest", [r.model_dump() for r in rows]),
    )


if __name__ == "__main__":
    sys.exit(main())
