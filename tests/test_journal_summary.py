"""``spice-libvirt journal --summary`` (journal_summary.py, cli/journal.py): which rows are
migrations and which writer tells each, the shares, medians, worst outcomes and last
failures, ``--since`` -- table-tested on made-up rows; then the command on a journal file.

The summary of a real journal (hook, agent and controller rows from real migrations) is
checked in ``tests/test_metrics_lab.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt.hook.journal import Journal, JournalEntry
from spice_libvirt.journal_summary import (
    THIS_HOST,
    Group,
    Summary,
    migrations,
    parse_duration,
    summarize,
)

B = "qemu+tcp://hv-b/system"
C = "qemu+tcp://hv-c/system"


def agent(ts: float, domain: str, outcome: str, dest: str | None = B, **kw: Any) -> JournalEntry:
    verdict = {"domain": domain, "outcome": outcome, "destination": dest, **kw}
    return JournalEntry(
        ts=ts, object=domain, operation="agent", suboperation=outcome, domain=domain,
        source="agent", detail=json.dumps(verdict), outcome="error" if outcome == "error" else "ok",
    )  # fmt: skip


def controller(ts: float, domain: str, outcome: str, dest: str = B, **kw: Any) -> JournalEntry:
    detail = {"command": "migrate", "destination": dest, "outcome": outcome, **kw}
    return JournalEntry(
        ts=ts, object=domain, operation="migrate", suboperation=outcome, domain=domain,
        source="controller", detail=json.dumps(detail),
    )  # fmt: skip


def hook(ts: float, domain: str, operation: str = "migrate", **kw: Any) -> JournalEntry:
    return JournalEntry(
        ts=ts, object=domain, operation=operation, suboperation="begin", domain=domain, **kw
    )


def by_key(groups: list[Group]) -> dict[str, Group]:
    return {g.key: g for g in groups}


def test_shares_medians_worst_and_the_last_failure_per_destination_and_domain() -> None:
    rows = [
        agent(1, "vm1", "seamless", held_ms=1000.0),
        agent(2, "vm1", "seamless", held_ms=3000.0),
        agent(
            3, "vm2", "switch-host", held_ms=2000.0, released_why="linked", notes=["reconnected"]
        ),
        agent(4, "vm2", "seamless", dest=C, held_ms=500.0),
        agent(5, "vm3", "no-client"),
    ]
    s = summarize(rows)
    assert s.migrations == 5
    dest = by_key(s.by_destination)
    assert sorted(dest) == [B, C]
    b = dest[B]
    assert (b.migrations, b.judged, b.seamless, b.seamless_share) == (4, 3, 2, 0.6667)
    assert b.median_held_ms == 2000.0
    assert b.worst_outcome == "switch-host"
    assert b.last_failure is not None
    assert (b.last_failure.domain, b.last_failure.reason) == ("vm2", "reconnected")
    assert dest[C].worst_outcome == "seamless"
    assert dest[C].last_failure is None
    dom = by_key(s.by_domain)
    assert dom["vm1"].seamless_share == 1.0
    assert dom["vm2"].worst_outcome == "switch-host"
    assert dom["vm3"].seamless_share is None  # nothing judged: no client
    assert dom["vm3"].worst_outcome == "no-client"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # the agent stepped aside for our controller: the controller's row tells it
        (
            [agent(1, "vm", "skipped", held_by="controller"), controller(2, "vm", "seamless")],
            [("vm", B, "seamless", "controller")],
        ),
        # an agent that skipped for another holder still saw a migration
        ([agent(1, "vm", "skipped", held_by="none")], [("vm", B, "skipped", "agent")]),
        # a migration coming in, as the hook saw it: no verdict here
        ([hook(1, "vm")], [("vm", THIS_HOST, "incoming", "hook")]),
        (
            [hook(1, "vm", source="vdsm", operation="after_vm_migrate_destination")],
            [("vm", THIS_HOST, "incoming", "hook")],
        ),
        # the hook failed on an incoming migration
        ([hook(1, "vm", outcome="error", detail="bad XML")], [("vm", THIS_HOST, "error", "hook")]),
        # other hook calls are not migrations
        ([hook(1, "vm", operation="prepare"), hook(2, "vm", operation="started")], []),
        ([hook(1, "vm", source="vdsm", operation="before_vm_migrate_source")], []),
        # a controller that failed before any verdict
        ([controller(1, "vm", "error", reason="unreachable")], [("vm", B, "error", "controller")]),
        # an unreadable detail: still a migration, destination unknown
        (
            [JournalEntry(1, "vm", "agent", "failed", source="agent", detail="{not json")],
            [("vm", "?", "failed", "agent")],
        ),
    ],
)
def test_which_rows_are_migrations(
    rows: list[JournalEntry], expected: list[tuple[str, str, str, str]]
) -> None:
    assert [(m.domain, m.destination, m.outcome, m.writer) for m in migrations(rows)] == expected


def test_reasons_come_from_notes_then_the_release_then_the_hook_detail() -> None:
    found = migrations(
        [
            agent(1, "a", "not-linked", notes=["too little memory"], released_why="bound"),
            agent(2, "b", "not-linked", released_why="client not linked within the bound"),
            hook(3, "c", outcome="error", detail="journal locked"),
            controller(4, "d", "switch-host", reason="a new connection id"),
        ]
    )
    assert [m.reason for m in found] == [
        "too little memory",
        "client not linked within the bound",
        "hook: journal locked",
        "a new connection id",
    ]


def test_worst_outcome_orders_failures_before_fallbacks_before_unjudged() -> None:
    order = [
        "error",
        "failed",
        "client-lost",
        "cancelled",
        "not-linked",
        "switch-host",
        "semi-seamless",
    ]
    for i, worst in enumerate(order):
        rows = [agent(1, "vm", "seamless"), hook(2, "vm")]
        rows += [agent(3 + j, "vm", o) for j, o in enumerate(order[i:])]
        assert by_key(summarize(rows).by_domain)["vm"].worst_outcome == worst
    unjudged = summarize([hook(1, "vm"), agent(2, "vm", "no-client")]).by_domain[0]
    assert unjudged.worst_outcome == "incoming"
    # a word this version does not know is never hidden behind a better one
    odd = summarize([agent(1, "vm", "exploded"), agent(2, "vm", "error")]).by_domain[0]
    assert odd.worst_outcome == "exploded"


def test_the_last_failure_is_the_newest_one_whatever_the_row_order() -> None:
    rows = [agent(9, "vm", "switch-host", notes=["late"]), agent(5, "vm", "failed", notes=["x"])]
    g = summarize(rows).by_domain[0]
    assert g.last_failure is not None
    assert (g.last_failure.at, g.last_failure.reason) == (9, "late")


def test_since_keeps_only_recent_migrations() -> None:
    s = summarize([agent(10, "old", "failed"), agent(100, "new", "seamless")], since=50)
    assert [g.key for g in s.by_domain] == ["new"]
    assert s.migrations == 1


def test_an_empty_journal_summarizes_to_nothing() -> None:
    assert summarize([]) == Summary(migrations=0, by_destination=[], by_domain=[])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h30m", 5400), ("7d", 604800), ("2w", 1209600), ("500ms", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "15", "m", "1h 30m", "-5m", "0s", "1y", "1.5.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


# ------------------------------------------------------------------ the command, on a file


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "journal", *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_command_prints_both_tables_and_the_json(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    now = time.time()
    for entry in (
        agent(now - 7200, "vm1", "failed", notes=["two hours ago"]),
        agent(now - 60, "vm1", "seamless", held_ms=1500.0),
        agent(now - 50, "vm2", "switch-host", held_ms=900.0, notes=["reconnected"]),
        controller(now - 40, "vm2", "seamless", held_ms=700.0),
        hook(now - 30, "vm3"),
    ):
        journal.record(entry)
    done = run("--summary", "--since", "1h", "--path", str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"4 migration(s) in {path} since ")
    assert lines[2].split() == ["DESTINATION", "MIGRATIONS", "SEAMLESS", "MEDIAN", "HELD",
                                "WORST", "LAST", "FAILURE"]  # fmt: skip
    b_line = next(line for line in lines if line.startswith(B))
    assert b_line.split()[1:5] == ["3", "2/3", "67%", "0.90"]
    assert "switch-host (vm2): reconnected" in b_line
    assert any(line.startswith(THIS_HOST) and "incoming" in line for line in lines)
    assert "two hours ago" not in done.stdout  # older than --since
    doc = json.loads(run("--summary", "--json", "--path", str(path)).stdout)
    assert doc["migrations"] == 5
    vm1 = next(g for g in doc["by_domain"] if g["key"] == "vm1")
    assert vm1["last_failure"]["reason"] == "two hours ago"
    assert vm1["seamless_share"] == 0.5


def test_a_bad_since_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = run("--summary", "--since", "soon", "--path", str(tmp_path / "j.sqlite3"))
    assert done.returncode == 2
    assert "not a duration" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_journal_that_does_not_exist_yet_summarizes_to_nothing(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    done = run("--summary", "--path", str(path))
    assert done.returncode == 0
    assert done.stdout.strip() == f"0 migration(s) in {path}"
    assert not path.exists()
