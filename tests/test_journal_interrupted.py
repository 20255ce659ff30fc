"""A journal write cut off by the hook's deadline reports that, not a failed ROLLBACK.

The deadline can fire at any point of a write, also right after COMMIT went through; the
undo then finds no transaction open, and the error to report is the deadline's.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt.hook.deadline import HookDeadlineError
from spice_libvirt.hook.journal import Journal, JournalEntry


def _entry(i: int) -> JournalEntry:
    return JournalEntry(
        ts=1_700_000_000.0 + i, object="vm", operation="prepare", suboperation="begin"
    )


class _DeadlineAfterCommit:
    """A connection whose COMMIT goes through and is then interrupted (the deadline)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        cursor = self._conn.execute(sql, *args)
        if sql == "COMMIT":
            raise HookDeadlineError("deadline exceeded")  # what the SIGALRM handler raises
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_deadline_after_commit_is_the_error_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    journal.record(_entry(0))  # the schema made
    connect = Journal._connect
    monkeypatch.setattr(
        Journal, "_connect", lambda self, **kw: _DeadlineAfterCommit(connect(self, **kw))
    )
    with pytest.raises(HookDeadlineError, match="deadline exceeded"):
        journal.record(_entry(1))
    monkeypatch.undo()
    assert journal.count() == 2  # the row was committed before the deadline fired
