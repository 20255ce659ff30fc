"""A small local journal of every hook invocation, in SQLite.

Why a journal at all: libvirt logs a hook only when it fails, so without one nobody can
tell afterwards whether the hook ran for a migration, what it saw, or what it changed. The
journal answers that (``spice-libvirt journal``) without the hook ever talking to libvirt.

Why SQLite in WAL mode: several hooks may run at once (libvirt runs them per domain, VDSM
per VM), readers must not block the writer, and a crash halfway through must not corrupt
anything. Each writer holds the lock for one short transaction, and the busy timeout is
short so that a stuck reader can delay a hook by at most that much, never past its
deadline.

Why private: the rows name guests, their UUIDs and SPICE addresses. The file, its ``-wal``
and ``-shm`` are 0600 in a directory only root can write (:mod:`spice_libvirt.files`),
whatever the umask of whoever wrote first.

Why bounded: a host runs for years. Every insert deletes rows older than the newest
``max_rows`` in the same transaction, and ``journal_size_limit`` caps the WAL file, so
the database stays at a few megabytes however long it lives.
"""

from __future__ import annotations

import builtins
import os

from spice_libvirt.errors import HookError
from spice_libvirt.files import (
    PRIVATE_DIR,
    PRIVATE_FILE,
    UnsafePathError,
    ensure_directory,
    ensure_file,
)

# The C module ``sqlite3`` is built on (``sqlite3.connect``, ``sqlite3.Error`` and
# ``sqlite3.Connection`` are its objects): the package adds only the deprecated default
# date/time adapters, and their ``datetime`` and ``collections.abc`` imports, which the
# hook would pay for on every guest event (``benchmarks/bench_hook.py``).
from spice_libvirt.hook.sqlite_light import sqlite3

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection
    from pathlib import Path
    from typing import Any, Literal

    #: What produced an entry: libvirt's qemu hook or one of the VDSM hook adapters.
    EntrySource = Literal["libvirt", "vdsm", "agent", "controller"]
    #: How the invocation ended, from the hook's point of view.
    Outcome = Literal["ok", "rewritten", "error"]

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    source TEXT NOT NULL,
    object TEXT NOT NULL,
    operation TEXT NOT NULL,
    suboperation TEXT NOT NULL,
    extra TEXT NOT NULL,
    domain TEXT,
    uuid TEXT,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    duration_ms REAL,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS invocations_domain ON invocations(domain, id);
"""
_COLUMNS = (
    "id, ts, source, object, operation, suboperation, extra, domain, uuid, outcome, detail, "
    "duration_ms, pid"
)
_COLUMN_NAMES = tuple(c.strip() for c in _COLUMNS.split(","))
#: Cap on the WAL file after a checkpoint, in bytes.
_WAL_SIZE_LIMIT = 4 * 1024 * 1024


class JournalEntry:
    """One hook invocation as recorded: what libvirt (or VDSM) asked and what we did.

    A plain frozen class, neither a pydantic model nor a dataclass: the hook builds one on
    every guest operation under a 2 s deadline that counts interpreter start-up, and
    ``dataclasses`` alone (it imports ``inspect``) is a measurable share of that start-up
    (``benchmarks/bench_hook.py``). Rows come back from our own table, so there is nothing
    to validate on the way out either. Fields, in the table's column order:

    * ``ts``: UNIX time of the invocation, seconds; ``object``: libvirt's $1 (the guest
      name, or '-'); ``operation``: $2 ('migrate', 'prepare'...); ``suboperation``: $3
      ('begin'...); ``extra``: $4 (a shutoff reason, or '-');
    * ``domain``, ``uuid``: ``<name>`` and ``<uuid>`` of the domain XML;
    * ``outcome``: 'ok', 'rewritten' or 'error'; ``detail``: what changed, or why it failed;
    * ``duration_ms``: time from hook start to the journal write; ``pid``;
    * ``source``: 'libvirt', 'vdsm', 'agent' (the host agent's verdicts) or 'controller'
      (the CLI's ``migrate`` and ``evacuate``); ``id``: the row id (None before it is
      recorded).
    """

    __slots__ = _COLUMN_NAMES

    id: int | None
    ts: float
    source: EntrySource
    object: str
    operation: str
    suboperation: str
    extra: str
    domain: str | None
    uuid: str | None
    outcome: Outcome
    detail: str
    duration_ms: float | None
    pid: int | None

    def __init__(
        self,
        ts: float,
        object: str,
        operation: str,
        suboperation: str = "-",
        extra: str = "-",
        domain: str | None = None,
        uuid: str | None = None,
        outcome: Outcome = "ok",
        detail: str = "",
        duration_ms: float | None = None,
        pid: int | None = None,
        source: EntrySource = "libvirt",
        id: int | None = None,
    ) -> None:
        values = (id, ts, source, object, operation, suboperation, extra, domain, uuid,
                  outcome, detail, duration_ms, pid)  # fmt: skip
        for name, value in zip(_COLUMN_NAMES, values, strict=True):
            object_setattr(self, name, value)

    def _values(self) -> tuple[builtins.object, ...]:
        return tuple(getattr(self, name) for name in _COLUMN_NAMES)

    def __setattr__(self, name: str, value: builtins.object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: journal entries are frozen")

    def __eq__(self, other: builtins.object) -> bool:
        if not isinstance(other, JournalEntry):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in _COLUMN_NAMES)
        return f"JournalEntry({shown})"

    def model_dump(self, *, mode: str = "python", exclude: Collection[str] = ()) -> dict[str, Any]:
        """The entry as a dict of JSON-ready values (the shape ``journal --json`` prints).

        Keys in the table's column order (``id`` first), as the pydantic model had them.
        """
        del mode  # every value is already JSON-ready
        return {k: getattr(self, k) for k in _COLUMN_NAMES if k not in exclude}


object_setattr = object.__setattr__


def _rollback(conn: sqlite3.Connection) -> None:
    """Undo the open transaction, if one is still open: what interrupted it (the hook's
    deadline may fire after COMMIT went through) is the error to report, never a failed
    ROLLBACK ("cannot rollback - no transaction is active")."""
    if conn.in_transaction:
        try:  # noqa: SIM105 - contextlib is not among the hook's imports
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class Journal:
    """The journal file: one connection and one transaction per write.

    Not kept open across calls on purpose: the hook is a short-lived process, and the CLI
    reads once. ``timeout_s`` bounds how long any call waits for another writer's lock.
    What one write costs (connect, a few pragmas, ``BEGIN IMMEDIATE``, insert, trim,
    commit; no fsync with WAL and ``synchronous = NORMAL`` except at checkpoints) is in
    ``benchmarks/bench_hook.py``: well under a millisecond warm.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, max_rows: int = 10_000, timeout_s: float = 0.5
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        #: the file as a string: the hook never needs pathlib (see :attr:`path`)
        self.file = os.fspath(path)
        self.max_rows = max_rows
        self.timeout_s = timeout_s

    @property
    def path(self) -> Path:
        from pathlib import Path

        return Path(self.file)

    def _connect(self, *, create: bool) -> sqlite3.Connection:
        """An open connection (the caller closes it); with ``create``, WAL and the schema.

        The busy timeout is sqlite3's ``timeout``; WAL mode is persistent in the file, so
        the ``journal_mode`` pragma only reads it back after the first call.
        """
        if create:
            # 0600 before SQLite sees it: SQLite gives its -wal and -shm the database's mode
            try:
                ensure_directory(os.path.dirname(self.file) or ".", PRIVATE_DIR)
                ensure_file(self.file, PRIVATE_FILE, siblings=("-wal", "-shm"))
            except UnsafePathError as exc:
                raise HookError(f"journal {self.file}: {exc}") from exc
            uri = f"file:{self.file}?mode=rwc"
        else:
            uri = f"file:{self.file}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=self.timeout_s, isolation_level=None)
        try:
            if create:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise HookError(f"journal {self.file}: cannot switch to WAL (got {mode})")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
                self._ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _ensure_schema(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == _SCHEMA_VERSION:
            return
        if version not in (0, _SCHEMA_VERSION):
            raise HookError(f"journal has schema version {version}, expected {_SCHEMA_VERSION}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def record(self, entry: JournalEntry) -> int:
        """Append ``entry``, drop rows beyond the newest ``max_rows``; return the new id.

        Raises :class:`HookError` when the file cannot be written (disk full, permissions,
        a lock held longer than ``timeout_s``).
        """
        try:
            conn = self._connect(create=True)
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    cur = conn.execute(
                        "INSERT INTO invocations (ts, source, object, operation, suboperation,"
                        " extra, domain, uuid, outcome, detail, duration_ms, pid)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            entry.ts,
                            entry.source,
                            entry.object,
                            entry.operation,
                            entry.suboperation,
                            entry.extra,
                            entry.domain,
                            entry.uuid,
                            entry.outcome,
                            entry.detail,
                            entry.duration_ms,
                            entry.pid,
                        ),
                    )
                    new_id = int(cur.lastrowid or 0)
                    # ids only grow (AUTOINCREMENT), so "older than the newest N" is a range.
                    conn.execute("DELETE FROM invocations WHERE id <= ?", (new_id - self.max_rows,))
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
                return new_id
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise HookError(f"journal {self.file}: cannot record: {exc}") from exc
        except OSError as exc:
            raise HookError(f"journal {self.file}: cannot create: {exc.strerror or exc}") from exc

    def entries(
        self, *, limit: int | None = 50, domain: str | None = None, since: float | None = None
    ) -> list[JournalEntry]:
        """Return the newest entries first (at most ``limit``; None for all; ``since``: only
        rows at or after that UNIX time).

        A journal that does not exist yet is empty, not an error: the hook creates it on
        its first invocation, and reading must not create files as a side effect.
        """
        if not os.path.exists(self.file):
            return []
        query = f"SELECT {_COLUMNS} FROM invocations"
        params: list[object] = []
        where: list[str] = []
        if domain is not None:
            where.append("(domain = ? OR object = ?)")
            params += [domain, domain]
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY id DESC"
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        try:
            conn = self._connect(create=False)
            try:
                rows = conn.execute(query, params).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise HookError(f"journal {self.file}: cannot read: {exc}") from exc
        return [JournalEntry(**dict(zip(_COLUMN_NAMES, row, strict=True))) for row in rows]

    def count(self) -> int:
        """Number of rows currently kept."""
        if not os.path.exists(self.file):
            return 0
        try:
            conn = self._connect(create=False)
            try:
                return int(conn.execute("SELECT count(*) FROM invocations").fetchone()[0])
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise HookError(f"journal {self.file}: cannot read: {exc}") from exc
