"""Wall time of one libvirt hook call, whole process, against a bare interpreter start.

Why: libvirtd runs the ``qemu.d`` hook on every event of every domain (prepare, start,
started, stopped, release, migrate, restore, reconnect...) and blocks the guest operation
until it returns. A hook that costs many interpreter starts delays every VM operation on
the host, and 16 of them at once on two cores delay each other. Goal: one
call costs at most twice a bare ``python3 -I -c pass`` on the same machine.

What runs, exactly as libvirtd runs it: the shim ``hook install`` writes (``/bin/sh`` execs
the interpreter), with a domain XML on stdin, a host configuration file and a real SQLite
journal, so every call parses the XML and writes one journal row. Commands, alternated in a
shuffled order every round so that load changes hit all of them alike:

* baselines: ``/usr/bin/python3 -I -c pass`` (the distribution's interpreter), and the
  venv's own interpreter (the one the hook runs on) with ``-I -c pass`` and ``-I -S -c pass``;
* the hook for ``vm1 started begin -`` and ``vm1 release end -`` (no rewrite: what almost
  every call is), ``vm1 migrate begin -`` with a wildcard listen address (decided from the
  expat pass: nothing to rewrite) and with a foreign one (a rewrite through ElementTree:
  the XML comes back on stdout);
* the same three through the console-script shim (``exec .../spice-libvirt-hook``), the
  form the Ansible role still writes, for comparison.

The ratio is median(hook) / median(baseline) for each baseline; the goal is judged against
the *fastest* baseline. Wall time per call is taken around ``fork``/``exec``/``wait`` in
this process; CPU time is the children's user+system from ``getrusage``.

Run: ``.venv/bin/python benchmarks/bench_hook.py [--rounds N] [--json] [--no-save]``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from benchmarks.benchutil import Distribution, Machine, arg_parser, distribution, finish, machine
from spice_libvirt.hook import install as hook_install
from spice_libvirt.hook.journal import Journal, JournalEntry

GOAL_RATIO = 2.0
NEW_ADDRESS = "192.0.2.10"
FOREIGN = "198.51.100.7"
SYSTEM_PYTHON = Path("/usr/bin/python3")

DOMAIN_XML = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <uuid>6a1f0c3e-1b7e-4c55-9f3b-2f5e9f0b1a11</uuid>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <graphics type='spice' port='5901' autoport='yes' listen='{listen}'>
      <listen type='address' address='{listen}'/>
      <image compression='off'/>
    </graphics>
    <video><model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1'/></video>
    <memballoon model='virtio'/>
  </devices>
</domain>
"""


@dataclass(frozen=True)
class Command:
    name: str
    argv: tuple[str, ...]
    stdin: bytes = b""
    #: text the call must print on stdout (a rewrite), or None for "nothing"
    expect_stdout: str | None = None
    hook: bool = False
    #: a breakdown row: neither a baseline nor a hook call
    breakdown: bool = False


class Row(BaseModel):
    round: int
    command: str
    wall_ms: float
    cpu_ms: float
    load_1m: float


class CommandSummary(BaseModel):
    command: str
    hook: bool
    wall_ms: Distribution
    cpu_ms_median: float | None


class HookSummary(BaseModel):
    benchmark: str = "hook"
    machine: Machine
    commit: str
    rounds: int
    shim: str
    commands: list[CommandSummary]
    #: hook command -> baseline -> median ratio
    ratios: dict[str, dict[str, float]]
    #: hook command -> median CPU ms / the goal baseline's median CPU ms (less load-sensitive
    #: than wall time on a shared machine)
    cpu_ratios: dict[str, float] = {}
    #: 1-minute load average when the rounds started (the machine's at the end is in machine)
    load_avg_1m_start: float | None = None
    goal_ratio: float = GOAL_RATIO
    goal_baseline: str
    worst_ratio: float
    goal_met: bool
    #: the same over every call but the rewrite (the call that loads ElementTree)
    worst_ratio_without_rewrite: float
    goal_met_without_rewrite: bool
    journal_rows: int
    #: one in-process Journal.record, warm (connection + transaction + commit), ms
    journal_record_ms: Distribution
    #: the same with another connection holding the database open (no checkpoint on close)
    journal_record_held_ms: Distribution | None = None


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


_IMPORTS_ONLY = (
    "import os, sys\n"
    f"root = {str(Path(hook_install.default_launcher()).parents[2])!r}\n"
    "sys.path.append(root)\n"
    "p = type(sys)('spice_libvirt'); p.__path__ = [os.path.join(root, 'spice_libvirt')]\n"
    "sys.modules['spice_libvirt'] = p\n"
    "import spice_libvirt.hook.qemu_hook\n"
)


def _write_shim(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def commands(work: Path) -> list[Command]:
    """The baselines and the hook calls, with a configuration and journal under ``work``."""
    cfg = work / "config.toml"
    cfg.write_text(
        f'spice_address = "{NEW_ADDRESS}"\njournal_path = "{work / "journal.sqlite3"}"\n'
    )
    venv_python = Path(sys.executable)
    fast = _write_shim(work / "shim-fast", hook_install.render_default_shim(cfg))
    script = hook_install.default_hook_executable()
    legacy = _write_shim(work / "shim-console-script", hook_install.render_shim(script, cfg))
    local = DOMAIN_XML.format(listen=NEW_ADDRESS).encode()
    foreign = DOMAIN_XML.format(listen=FOREIGN).encode()
    wildcard = DOMAIN_XML.format(listen="0.0.0.0").encode()
    out: list[Command] = []
    if SYSTEM_PYTHON.exists():
        out.append(Command("python3 -I -c pass", (str(SYSTEM_PYTHON), "-I", "-c", "pass")))
    out += [
        Command("venv python -I -c pass", (str(venv_python), "-I", "-c", "pass")),
        Command("venv python -I -S -c pass", (str(venv_python), "-I", "-S", "-c", "pass")),
        # where a call's time goes: the launcher's imports alone, nothing run
        Command("hook's imports only (-I -S)", (str(venv_python), "-I", "-S", "-c", _IMPORTS_ONLY),
                breakdown=True),
    ]  # fmt: skip
    for label, shim in (("hook", fast), ("console-script hook", legacy)):
        out += [
            Command(f"{label}: started begin", (str(shim), "vm1", "started", "begin", "-"), local,
                    hook=True),
            Command(f"{label}: release end", (str(shim), "vm1", "release", "end", "-"), local,
                    hook=True),
            Command(f"{label}: migrate begin (local, no rewrite)",
                    (str(shim), "vm1", "migrate", "begin", "-"), wildcard, hook=True),
            Command(f"{label}: migrate begin (rewrite)",
                    (str(shim), "vm1", "migrate", "begin", "-"), foreign,
                    expect_stdout=f'address="{NEW_ADDRESS}"', hook=True),
        ]  # fmt: skip
    return out


def _env() -> dict[str, str]:
    # libvirtd's hook environment: almost empty, LC_ALL=C (the shim switches to C.UTF-8).
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def run_once(cmd: Command) -> tuple[float, float]:
    """One call: (wall ms, children's CPU ms); raises when the call misbehaves."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd.argv, input=cmd.stdin, capture_output=True, env=_env(), check=False)
    wall = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    if proc.returncode != 0 or proc.stderr:
        raise RuntimeError(f"{cmd.name}: exit {proc.returncode}: {proc.stderr.decode()!r}")
    text = proc.stdout.decode()
    if cmd.expect_stdout is None and text:
        raise RuntimeError(f"{cmd.name}: unexpected output {text[:80]!r}")
    if cmd.expect_stdout is not None and cmd.expect_stdout not in text:
        raise RuntimeError(f"{cmd.name}: no rewrite in {text[:200]!r}")
    return wall, cpu


def journal_record_ms(work: Path, n: int = 200, *, held: bool = False) -> Distribution:
    """One ``Journal.record`` in process, warm. ``held``: with another connection keeping
    the database open, so that closing the writer's is not the last close (no checkpoint,
    no fsync): the difference is what SQLite's checkpoint-on-close costs."""
    import sqlite3

    path = work / ("inproc-held.sqlite3" if held else "inproc.sqlite3")
    journal = Journal(path, max_rows=10_000, timeout_s=0.25)
    journal.record(JournalEntry(ts=time.time(), object="vm1", operation="create"))
    reader = sqlite3.connect(path) if held else None
    if reader is not None:
        reader.execute("SELECT count(*) FROM invocations").fetchone()
    samples = []
    try:
        for i in range(n):
            entry = JournalEntry(ts=time.time(), object="vm1", operation="started", detail=f"{i}")
            start = time.perf_counter()
            journal.record(entry)
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        if reader is not None:
            reader.close()
    return distribution(samples)


def run(rounds: int, seed: int) -> tuple[HookSummary, list[dict[str, object]]]:
    rng = random.Random(seed)
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-hook-") as tmp:
        work = Path(tmp)
        cmds = commands(work)
        for cmd in cmds:  # warm-up: .pyc files, page cache, the journal's schema
            run_once(cmd)
        rows: list[Row] = []
        for r in range(rounds):
            order = list(cmds)
            rng.shuffle(order)
            for cmd in order:
                wall, cpu = run_once(cmd)
                rows.append(Row(round=r, command=cmd.name, wall_ms=round(wall, 3),
                                cpu_ms=round(cpu, 3), load_1m=round(os.getloadavg()[0], 2)))  # fmt: skip
        journal_rows = Journal(work / "journal.sqlite3").count()
        record_ms = journal_record_ms(work)
        record_held_ms = journal_record_ms(work, held=True)
    per: dict[str, list[Row]] = {c.name: [] for c in cmds}
    for row in rows:
        per[row.command].append(row)
    summaries = [
        CommandSummary(
            command=c.name,
            hook=c.hook,
            wall_ms=distribution([x.wall_ms for x in per[c.name]]),
            cpu_ms_median=round(statistics.median(x.cpu_ms for x in per[c.name]), 3),
        )
        for c in cmds
    ]
    medians = {s.command: s.wall_ms.median or 0.0 for s in summaries}
    baselines = [c.name for c in cmds if not c.hook and not c.breakdown]
    ratios = {
        c.name: {b: round(medians[c.name] / medians[b], 3) for b in baselines}
        for c in cmds
        if c.hook
    }
    strict = [b for b in baselines if "-S" not in b]
    goal_baseline = min(strict, key=lambda b: medians[b])
    ours = {name: r for name, r in ratios.items() if not name.startswith("console")}
    worst = max(r[goal_baseline] for r in ours.values())
    worst_plain = max(r[goal_baseline] for name, r in ours.items() if "(rewrite)" not in name)
    cpu_median = {s.command: s.cpu_ms_median or 0.0 for s in summaries}
    cpu_ratios = {
        c.name: round(cpu_median[c.name] / cpu_median[goal_baseline], 3) for c in cmds if c.hook
    }
    summary = HookSummary(
        machine=machine(),
        commit=_commit(),
        rounds=rounds,
        shim=hook_install.render_default_shim(Path("/etc/spice-libvirt/config.toml")),
        commands=summaries,
        ratios=ratios,
        cpu_ratios=cpu_ratios,
        load_avg_1m_start=load_start,
        goal_baseline=goal_baseline,
        worst_ratio=worst,
        worst_ratio_without_rewrite=worst_plain,
        goal_met=worst <= GOAL_RATIO,
        goal_met_without_rewrite=worst_plain <= GOAL_RATIO,
        journal_rows=journal_rows,
        journal_record_ms=record_ms,
        journal_record_held_ms=record_held_ms,
    )
    return summary, [r.model_dump() for r in rows]


def markdown(summary: HookSummary) -> str:
    m = summary.machine
    lines = [
        f"Commit {summary.commit}, Python {m.python}, {m.cpus} cores ({m.cpu_model}),"
        f" load {summary.load_avg_1m_start} at the start and {m.load_avg_1m} at the end;"
        f" {summary.rounds} alternating rounds.",
        "",
        "| command | median ms | p90 ms | min..max ms | CPU ms (median) "
        f"| ratio to {summary.goal_baseline} | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary.commands:
        d = s.wall_ms
        ratio = summary.ratios.get(s.command, {}).get(summary.goal_baseline)
        cpu_ratio = summary.cpu_ratios.get(s.command)
        lines.append(
            f"| {s.command} | {d.median:.1f} | {d.p90:.1f} | {d.min:.1f}..{d.max:.1f}"
            f" | {s.cpu_ms_median:.1f} | {'-' if ratio is None else f'{ratio:.2f}x'}"
            f" | {'-' if cpu_ratio is None else f'{cpu_ratio:.2f}x'} |"
        )
    j = summary.journal_record_ms
    held = summary.journal_record_held_ms
    verdict = "met" if summary.goal_met else "MISSED"
    lines += [
        "",
        f"Journal write in process (warm): median {j.median:.2f} ms, p90 {j.p90:.2f} ms"
        + (
            f"; with another connection holding the file open (no checkpoint on close):"
            f" median {held.median:.2f} ms, p90 {held.p90:.2f} ms"
            if held is not None and held.median is not None and held.p90 is not None
            else ""
        )
        + f"; {summary.journal_rows} rows written by the hook calls.",
        f"Goal <= {summary.goal_ratio:g}x {summary.goal_baseline}: {verdict}"
        f" (worst hook ratio {summary.worst_ratio:.2f}x; without the rewrite"
        f" {summary.worst_ratio_without_rewrite:.2f}x:"
        f" {'met' if summary.goal_met_without_rewrite else 'MISSED'}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=40, help="alternating rounds (>= 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the shuffled order")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds >= 1")
    summary, rows = run(args.rounds, args.seed)
    return finish("hook", summary, args, markdown, rows=("hook", rows))


if __name__ == "__main__":
    raise SystemExit(main())
