"""The hook journal: WAL, bounded size, short lock waits, concurrent writers, read-only reads."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from spice_libvirt.errors import HookError
from spice_libvirt.hook.journal import Journal, JournalEntry


def _entry(i: int, domain: str = "vm") -> JournalEntry:
    return JournalEntry(
        ts=1_700_000_000.0 + i,
        object=domain,
        operation="prepare",
        suboperation="begin",
        domain=domain,
        uuid=f"00000000-0000-4000-8000-{i:012d}",
        detail=f"row {i}",
    )


def test_record_and_read_back_newest_first(tmp_path: Path) -> None:
    j = Journal(tmp_path / "sub" / "j.sqlite3")
    ids = [j.record(_entry(i, "a" if i % 2 else "b")) for i in range(6)]
    assert ids == sorted(ids)
    got = j.entries(limit=None)
    assert [e.detail for e in got] == [f"row {i}" for i in reversed(range(6))]
    assert got[0].id == ids[-1]
    assert [e.detail for e in j.entries(limit=2)] == ["row 5", "row 4"]
    assert [e.detail for e in j.entries(limit=None, domain="a")] == ["row 5", "row 3", "row 1"]
    assert j.entries(limit=None, domain="nobody") == []
    assert got[0].model_dump(exclude={"id"}) == _entry(5, "a").model_dump(exclude={"id"})


def test_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    Journal(path).record(_entry(1))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_keeps_only_the_newest_rows(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3", max_rows=10)
    for i in range(25):
        j.record(_entry(i))
    assert j.count() == 10
    assert [e.detail for e in j.entries(limit=None)] == [f"row {i}" for i in range(24, 14, -1)]


def test_reading_a_missing_journal_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "none" / "j.sqlite3"
    j = Journal(path)
    assert j.entries() == []
    assert j.count() == 0
    assert not path.parent.exists()


def test_a_held_lock_makes_record_fail_quickly(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path, timeout_s=0.2)
    j.record(_entry(0))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        with pytest.raises(HookError, match="cannot record"):
            j.record(_entry(1))
        assert time.monotonic() - t0 < 1.0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    j.record(_entry(2))
    assert j.count() == 2


def _writer(path: str, worker: int, rows: int) -> None:
    j = Journal(Path(path), timeout_s=5.0)
    for i in range(rows):
        j.record(_entry(worker * 1000 + i, f"w{worker}"))


def test_concurrent_writer_processes_all_land(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    j = Journal(path)
    assert j.count() == 60
    for w in range(4):
        assert len(j.entries(limit=None, domain=f"w{w}")) == 15


def test_unwritable_location_is_a_hook_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(HookError, match="cannot"):
        Journal(blocker / "j.sqlite3").record(_entry(0))


def test_foreign_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(HookError, match="schema version 99"):
        Journal(path).record(_entry(0))


def test_max_rows_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_rows"):
        Journal(tmp_path / "j.sqlite3", max_rows=0)


def test_file_size_stays_bounded(tmp_path: Path) -> None:
    """Deleted rows' pages are reused and the WAL is capped: bytes stay bounded too."""
    path = tmp_path / "j.sqlite3"
    j = Journal(path, max_rows=50)
    sizes = []
    for round_ in range(4):
        for i in range(150):  # three times the cap each round
            j.record(_entry(round_ * 1000 + i))
        wal = path.with_name(path.name + "-wal")
        sizes.append(path.stat().st_size + (wal.stat().st_size if wal.exists() else 0))
    assert j.count() == 50
    assert sizes[-1] <= sizes[0] * 1.5
    assert path.stat().st_size < 256 * 1024
