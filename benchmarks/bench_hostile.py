"""The embedded client against hostile servers: how each case ends, how fast, how much memory.

Every case of :mod:`spice_libvirt_lab.hostile_matrix` (a loopback stand-in server that
misbehaves in one phase on one channel: oversized, truncated, unknown and out-of-phase
messages, floods, destinations that never answer, refuse or speak garbage, an oversized
MIGRATE_DATA) against ``spice-libvirt watch``, ``--rounds`` times. Per case: the exit code
and the one line the client printed (or the session kept, and for a destination that
cannot be linked when the source got MIGRATE_CONNECT_ERROR), the time from the hostile act
to that outcome, and the client process's peak RSS (its own VmHWM). The goals: settled
within 10 s of the act, at most 100 MB, one line, the documented exit code.

    .venv/bin/python benchmarks/bench_hostile.py --rounds 3
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import asyncio
import os
import subprocess
import time

from pydantic import BaseModel

from benchmarks.benchutil import REPOSITORY, Machine, arg_parser, finish, machine


class CaseSummary(BaseModel):
    case: str
    phase: str
    channel: str
    what: str
    expected: str
    runs: int
    passed: int
    exit_codes: list[int | None]
    line: str | None
    settle_s_max: float | None
    answer_after_s_max: float | None
    peak_rss_mb_max: float


class Summary(BaseModel):
    machine: Machine
    commit: str | None
    dirty: bool
    rounds: int
    parallel: int
    seconds: float
    load_1m_start: float
    load_1m_end: float
    cases: list[CaseSummary]

    @property
    def all_passed(self) -> bool:
        return all(c.passed == c.runs for c in self.cases)


def source_state() -> tuple[str | None, bool]:
    """The commit measured and whether the tree differed from it."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=REPOSITORY, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    return git("rev-parse", "--short", "HEAD") or None, bool(git("status", "--porcelain"))


def run(rounds: int, parallel: int, only: list[str]) -> tuple[Summary, list[dict[str, object]]]:
    from spice_libvirt_lab import hostile_matrix

    cases = [c for c in hostile_matrix.cases() if not only or c.name in only]
    commit, dirty = source_state()
    load_start = round(os.getloadavg()[0], 2)
    started = time.monotonic()
    rows: list[dict[str, object]] = []
    by_case: dict[str, list[hostile_matrix.Row]] = {c.name: [] for c in cases}
    for round_no in range(rounds):
        for row in asyncio.run(hostile_matrix.run_all(cases, parallel=parallel)):
            by_case[row.case].append(row)
            load = round(os.getloadavg()[0], 2)
            extra = {"round": round_no, "commit": commit, "dirty": dirty, "load_1m": load}
            rows.append(row.model_dump() | extra)
    summaries = []
    for c in cases:
        measured = by_case[c.name]
        settles = [r.settle_s for r in measured if r.settle_s is not None]
        answers = [r.answer_after_s for r in measured if r.answer_after_s is not None]
        lines = [r.stderr_lines[0] for r in measured if r.stderr_lines]
        summaries.append(
            CaseSummary(
                case=c.name,
                phase=c.phase,
                channel=c.channel,
                what=c.what,
                expected=measured[0].expected,
                runs=len(measured),
                passed=sum(r.passed for r in measured),
                exit_codes=sorted({r.exit_code for r in measured}, key=lambda x: x or 0),
                line=lines[0] if lines else None,
                settle_s_max=max(settles) if settles else None,
                answer_after_s_max=max(answers) if answers else None,
                peak_rss_mb_max=max(r.peak_rss_mb for r in measured),
            )
        )
    summary = Summary(
        machine=machine(),
        commit=commit,
        dirty=dirty,
        rounds=rounds,
        parallel=parallel,
        seconds=round(time.monotonic() - started, 1),
        load_1m_start=load_start,
        load_1m_end=round(os.getloadavg()[0], 2),
        cases=summaries,
    )
    return summary, rows


def _outcome(c: CaseSummary) -> str:
    if c.expected == "kept":
        return "kept" + (
            f" (CONNECT_ERROR {c.answer_after_s_max:.1f} s)" if c.answer_after_s_max else ""
        )
    codes = "/".join(str(x) for x in c.exit_codes)
    reason = (c.line or "").removeprefix("spice-libvirt: error: ")
    if len(reason) > 70:
        reason = reason[:67] + "..."
    return f"exit {codes}: {reason}"


def markdown(s: Summary) -> str:
    m = s.machine
    lines = [
        f"{len(s.cases)} cases x {s.rounds} rounds ({s.parallel} at a time) in {s.seconds:.0f} s "
        f"at {s.commit}{' (dirty)' if s.dirty else ''}; load {s.load_1m_start} -> "
        f"{s.load_1m_end}; {m.cpus} CPUs, Python {m.python}",
        "",
        "| phase | case | channel | hostile act | outcome | settled (max s) | peak RSS (max MB) | ok |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    for c in s.cases:
        settle = "-" if c.settle_s_max is None else f"{c.settle_s_max:.2f}"
        lines.append(
            f"| {c.phase} | {c.case} | {c.channel} | {c.what} | {_outcome(c)} | {settle} | "
            f"{c.peak_rss_mb_max:.1f} | {c.passed}/{c.runs} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=3, help="client processes at a time")
    parser.add_argument("--case", action="append", default=[], help="only this case (repeat)")
    args = parser.parse_args()
    summary, rows = run(args.rounds, args.parallel, args.case)
    finish("hostile", summary, args, markdown, rows=("hostile", rows))
    return 0 if summary.all_passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
