"""bench_libvirt_rtt's guest choice: memcheck options only with the memcheck guest, and a
summary that says which guest, which hold and whether the domain was tainted (from rows)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_libvirt_rtt import Run, summary_md

ROOT = Path(__file__).resolve().parents[1]


def _bench(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "benchmarks/bench_libvirt_rtt.py", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_memcheck_options_are_refused_for_the_firmware_guest() -> None:
    done = _bench("--dirty-mib-s", "8", "--runs", "0")
    assert done.returncode == 2
    assert "--memory, --dirty-mib-s: the memcheck guest only" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_working_set_out_of_range_is_one_line() -> None:
    done = _bench("--guest", "memcheck", "--memory", "0", "--runs", "0")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "memcheck guest: working_set_mib: Input should be greater than or equal to 1"
    )
    assert "Traceback" not in done.stderr


def test_the_summary_names_the_guest_the_hold_and_the_taint() -> None:
    common: dict[str, Any] = {
        "rtt_ms": 300.0,
        "client": "remote-viewer",
        "index": 0,
        "outcome": "seamless",
        "guest": "memcheck",
        "memory_mib": 256,
        "dirty_mib_s": 0,
        "commit": "abc1234",
        "dirty": False,
        "taint_log_lines": 0,
    }
    rows = [
        Run(method="plain", **common),
        Run(method="ours", hold_policy="auto", hold="libvirt-floor", allow_taint=False, **common),
    ]
    text = summary_md(rows, "bench", dt.datetime.now(dt.UTC), None)
    assert "at commit abc1234 (0 of 2 rows from a tree with uncommitted changes)" in text
    assert "memcheck guest, 256 MiB working set full of data, idle" in text
    assert "hold applied libvirt-floor 1; monitor passthrough allowed in 0/1" in text
    assert "`custom-monitor` line to the domain's log 0/2" in text
