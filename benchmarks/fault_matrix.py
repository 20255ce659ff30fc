"""The fault matrix: real migrations broken on purpose, and whether nothing was left behind.

Each scenario is one test of ``tests/test_fault_matrix_qemu.py``,
``tests/test_fault_matrix_libvirt.py`` (two real QEMUs; two libvirtds in namespaces with the
client 300 ms away) or ``tests/test_fault_matrix_hook.py`` (the installed hook shim run as
libvirtd runs it): the CLI interrupted by SIGINT/SIGTERM in each phase, the destination
QEMU killed, the source QMP dropped, a libvirtd restarted mid-job, the client blocked with
``--require-seamless``, the client's link lossy and jittery, the hook with a broken
configuration, a full or read-only journal, 100 MiB on stdin, 16 calls at once. A scenario
*holds* when its test passes: the VM runs on exactly one host (asked of both ends), no
migration job is left, the source's bandwidth is what it was, the client is attached where
the VM runs (or its loss is reported), a seamless outcome has an unbroken stream, and the
exit code or the report's placement is the documented one; for the hook: libvirt is not
blocked past the hook's deadline, the XML comes back unchanged or rewritten correctly, the
exit code is the documented one, nothing keeps running. This script runs the tests ``--rounds`` times with
``SPICE_LIBVIRT_FAULT_ROWS`` set (plus the cancelled evacuation of ``tests/test_evacuate.py``), so every test writes what it observed as one raw row,
joins those rows with pytest's own pass/fail (JUnit XML), and summarises per scenario.

    .venv/bin/python -m benchmarks.fault_matrix --rounds 1
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from benchmarks.benchutil import (
    REPOSITORY,
    Distribution,
    Machine,
    arg_parser,
    distribution,
    finish,
    machine,
)

FILES = (
    "tests/test_fault_matrix_qemu.py",
    "tests/test_fault_matrix_libvirt.py",
    "tests/test_fault_matrix_hook.py",
    "tests/test_evacuate.py::test_cancelled_evacuation_leaves_every_domain_on_the_source_unthrottled",
)


class Scenario(BaseModel):
    path: str
    scenario: str
    runs: int
    held: int
    exit_codes: list[int] = Field(default_factory=list)
    placements: list[str] = Field(default_factory=list)
    outcomes: list[str] = Field(default_factory=list)
    signal_to_exit_s: Distribution | None = None
    #: hook scenarios: the longest libvirt waited for one call (s)
    blocked_s: Distribution | None = None
    #: scenario-specific observations, one value per run (see :data:`DETAILS`)
    details: dict[str, list[Any]] = Field(default_factory=dict)


#: row fields worth a line under the table (what a scenario observed beyond the invariants)
DETAILS = (
    "client_path",
    "link_wait_ms",
    "stream_records",
    "stream_gaps",
    "stream_max_stall_ms",
    "frames_lost_on_purpose",
    "past_deadline",
    "journal_skipped",
    "mib_accepted",
    "load_1m",
)


class Summary(BaseModel):
    commit: str
    dirty: bool
    machine: Machine
    rounds: int
    wall_s: float
    tests_passed: int
    tests_failed: int
    scenarios: list[Scenario]


def _git(*argv: str) -> str:
    out = subprocess.run(
        ["git", *argv], cwd=REPOSITORY, capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def _outcomes(junit: Path) -> dict[str, bool]:
    """``file::name[param]`` -> passed, from pytest's JUnit XML."""
    result: dict[str, bool] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = str(case.get("classname", "")).replace(".", "/") + ".py"
        failed = any(c.tag in ("failure", "error", "skipped") for c in case)
        result[f"{module}::{case.get('name')}"] = not failed
    return result


def _one_round(round_no: int, work: Path, keyword: str | None) -> list[dict[str, Any]]:
    rows_file, junit = work / f"rows-{round_no}.jsonl", work / f"junit-{round_no}.xml"
    env = dict(os.environ, SPICE_LIBVIRT_FAULT_ROWS=str(rows_file))
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES]
    argv += [f"--junitxml={junit}"] + (["-k", keyword] if keyword else [])
    subprocess.run(argv, cwd=REPOSITORY, env=env, check=False)
    outcomes = _outcomes(junit) if junit.exists() else {}
    rows = []
    if rows_file.exists():
        for line in rows_file.read_text().splitlines():
            row = json.loads(line)
            row["round"] = round_no
            row["held"] = outcomes.get(str(row.get("test")), False)
            rows.append(row)
    recorded = {r["test"] for r in rows}
    for test, passed in outcomes.items():  # a test that failed before it could record
        if test not in recorded:
            rows.append({"round": round_no, "test": test, "held": passed, "scenario": test})
    return rows


def _summarise(rows: list[dict[str, Any]]) -> list[Scenario]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row.get("path", "?")), str(row["scenario"])), []).append(row)
    out = []
    for (path, name), group in sorted(groups.items()):
        times = [float(r["signal_to_exit_s"]) for r in group if r.get("signal_to_exit_s")]
        blocked = [float(r["blocked_s"]) for r in group if r.get("blocked_s") is not None]
        codes = {int(r["exit_code"]) for r in group if r.get("exit_code") is not None}
        codes |= {int(c) for r in group for c in r.get("exit_codes", [])}
        out.append(
            Scenario(
                path=path,
                scenario=name,
                runs=len(group),
                held=sum(1 for r in group if r["held"]),
                exit_codes=sorted(codes),
                placements=sorted({str(r["placement"]) for r in group if r.get("placement")}),
                outcomes=sorted({str(r["outcome"]) for r in group if r.get("outcome")}),
                signal_to_exit_s=distribution(times) if times else None,
                blocked_s=distribution(blocked) if blocked else None,
                details={
                    key: [r[key] for r in group if key in r]
                    for key in DETAILS
                    if any(key in r for r in group)
                },
            )
        )
    return out


def markdown(summary: Summary) -> str:
    lines = [
        f"Fault matrix at {summary.commit[:10]}{' (dirty)' if summary.dirty else ''}, "
        f"{summary.rounds} round(s), {summary.machine.cpus} CPUs "
        f"({summary.machine.cpu_model}), load {summary.machine.load_avg_1m} at start, "
        f"{summary.wall_s:.0f} s",
        "",
        "| path | scenario | runs | invariants held | exit code(s) | placement | outcome | "
        "signal -> exit (median s) | hook blocked libvirt (max s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary.scenarios:
        median = s.signal_to_exit_s.median if s.signal_to_exit_s else None
        blocked = s.blocked_s.max if s.blocked_s else None
        lines.append(
            f"| {s.path} | {s.scenario} | {s.runs} | {s.held}/{s.runs} | "
            f"{', '.join(map(str, s.exit_codes)) or '-'} | {', '.join(s.placements) or '-'} | "
            f"{', '.join(s.outcomes) or '-'} | {'-' if median is None else f'{median:.2f}'} | "
            f"{'-' if blocked is None else f'{blocked:.2f}'} |"
        )
    details = [s for s in summary.scenarios if s.details]
    if details:
        lines += ["", "Observed beyond the invariants (one value per run):", ""]
    for s in details:
        seen = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in s.details.items())
        lines.append(f"- {s.path}, {s.scenario}: {seen}")
    return "\n".join(lines)


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every scenario (1)")
    parser.add_argument("-k", dest="keyword", default=None, help="only tests matching (pytest -k)")
    args = parser.parse_args()
    info = machine(tools=["qemu"])
    t0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
        for round_no in range(1, args.rounds + 1):
            rows += _one_round(round_no, Path(tmp), args.keyword)
    summary = Summary(
        commit=_git("rev-parse", "HEAD"),
        dirty=bool(_git("status", "--porcelain", "--", "spice_libvirt", "tests")),
        machine=info,
        rounds=args.rounds,
        wall_s=round(time.monotonic() - t0, 1),
        tests_passed=sum(1 for r in rows if r["held"]),
        tests_failed=sum(1 for r in rows if not r["held"]),
        scenarios=_summarise(rows),
    )
    if args.save:
        md = Path(__file__).resolve().with_name("results") / "fault-matrix.md"
        md.write_text(markdown(summary) + "\n")
    return finish("fault-matrix", summary, args, markdown, rows=("fault-matrix", rows))


if __name__ == "__main__":
    raise SystemExit(main())
