"""Migration progress: a model built from ``query-migrate`` and two ways to show it.

A terminal user wants a live bar and the phases as a checklist; a hook, a service or a CI
log wants one line per step that a machine can grep. So :func:`make_reporter` returns a
``rich`` checklist and bar only when stderr is a TTY, and a logging reporter everywhere
else. The percentage follows
VDSM's rule: it stays at 99 until QEMU says the migration completed, because "100 %
transferred" during precopy only means "this pass is done".
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pydantic import BaseModel

from spice_libvirt.migration.report import MigrationReport, PhaseTiming

log = logging.getLogger(__name__)


class MigrationProgress(BaseModel):
    """One sample of ``query-migrate`` in the units people read."""

    status: str
    elapsed_ms: int = 0
    percent: float = 0.0
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    mbps: float = 0.0
    dirty_pages_rate: int = 0
    passes: int = 0
    downtime_ms: int | None = None
    setup_time_ms: int | None = None

    @property
    def mb_per_s(self) -> float:
        """QEMU reports megabits per second; people read megabytes."""
        return self.mbps / 8.0

    @classmethod
    def from_query(cls, info: dict[str, Any]) -> MigrationProgress:
        ram: dict[str, Any] = info.get("ram") or {}
        status = str(info.get("status", "none"))
        total = int(ram.get("total", 0) or 0)
        remaining = int(ram.get("remaining", 0) or 0)
        if status == "completed":
            percent = 100.0
        elif total > 0:
            percent = min(99.0, 100.0 * (total - remaining) / total)
        else:
            percent = 0.0
        return cls(
            status=status,
            elapsed_ms=int(info.get("total-time", 0) or 0),
            percent=round(percent, 1),
            transferred_bytes=int(ram.get("transferred", 0) or 0),
            remaining_bytes=remaining,
            total_bytes=total,
            mbps=float(ram.get("mbps", 0.0) or 0.0),
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0) or 0),
            passes=int(ram.get("dirty-sync-count", 0) or 0),
            downtime_ms=info.get("downtime"),
            setup_time_ms=info.get("setup-time"),
        )

    def line(self) -> str:
        return (
            f"migration {self.status}: {self.percent:5.1f} % "
            f"{self.transferred_bytes / 2**20:8.1f} MiB sent, {self.mb_per_s:7.1f} MB/s, "
            f"dirty {self.dirty_pages_rate} pages/s, pass {self.passes}"
        )


class ProgressReporter(Protocol):
    """What the controller calls; implementations decide how (or whether) to show it."""

    def phase(self, name: str, detail: str = "") -> None: ...
    def update(self, progress: MigrationProgress) -> None: ...
    def close(self) -> None: ...


class LogReporter:
    """One log line per phase, and at most one progress line per ``interval`` seconds."""

    def __init__(self, logger: logging.Logger | None = None, interval: float = 1.0) -> None:
        self._log = logger or log
        self._interval = interval
        self._last = 0.0
        self._last_status: str | None = None

    def phase(self, name: str, detail: str = "") -> None:
        self._log.info("%s%s", name, f": {detail}" if detail else "")

    def update(self, progress: MigrationProgress) -> None:
        now = time.monotonic()
        if progress.status != self._last_status or now - self._last >= self._interval:
            self._log.info("%s", progress.line())
            self._last = now
            self._last_status = progress.status

    def close(self) -> None:
        return None


class NullReporter:
    """Shows nothing (for ``--json`` callers that only want the verdict)."""

    def phase(self, name: str, detail: str = "") -> None:
        return None

    def update(self, progress: MigrationProgress) -> None:
        return None

    def close(self) -> None:
        return None


class Checklist:
    """The phases of a run as a terminal shows them: one line each, a mark for its state
    (running, done, failed), its time and detail; rendered by ``rich`` (``__rich__``).

    Why not log records: a phase is a step an operator follows, not an event to grep; one
    line that turns from "running" to "done" reads as a checklist, where a log record per
    start and end (with a timestamp and the source file that logged it) reads as noise.
    """

    def __init__(self, *, unicode: bool = True) -> None:
        self.steps: dict[str, list[str]] = {}  # name -> [state, detail, time]
        self._marks = (
            {"running": "…", "ok": "✓", "failed": "✗"}
            if unicode
            else {"running": "..", "ok": "ok", "failed": "!!"}
        )

    def start(self, name: str, detail: str = "") -> None:
        step = self.steps.setdefault(name, ["running", "", ""])
        if detail:
            step[1] = detail

    def finish(self, name: str, ok: bool, duration_ms: float, detail: str = "") -> None:
        step = self.steps.setdefault(name, ["running", "", ""])
        step[0] = "ok" if ok else "failed"
        step[1] = detail or step[1]
        step[2] = f"{duration_ms:.0f} ms"

    def lines(self) -> list[tuple[str, str, str, str]]:
        """(mark, name, time, detail) per step, in the order they started."""
        return [(self._marks[st], name, t, d) for name, (st, d, t) in self.steps.items()]

    def __rich__(self) -> Any:
        from rich.table import Table

        styles = {"running": "yellow", "ok": "green", "failed": "bold red"}
        grid = Table.grid(padding=(0, 1))
        for (mark, name, took, detail), (state, _d, _t) in zip(
            self.lines(), self.steps.values(), strict=True
        ):
            grid.add_row(f"[{styles[state]}]{mark}[/]", name, f"[dim]{took}[/]", detail)
        return grid


class RichReporter:
    """On a terminal (stderr): the phases as a :class:`Checklist` above a live bar (percent,
    MB/s, dirty rate, passes). ``console`` is for tests (a recording console)."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._console = console if console is not None else Console(stderr=True)
        encoding = (self._console.encoding or "").lower().replace("-", "")
        self.checklist = Checklist(unicode=encoding.startswith("utf"))
        checklist = self.checklist

        class _WithChecklist(Progress):
            def get_renderables(self) -> Any:
                yield checklist
                if self.tasks:
                    yield self.make_tasks_table(self.tasks)

        self._progress = _WithChecklist(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=self._console,
            transient=False,
        )
        self._task: Any = None
        self._started = False

    def _show(self) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        self._progress.refresh()

    def phase(self, name: str, detail: str = "") -> None:
        self.checklist.start(name, detail)
        self._show()

    def phase_done(self, name: str, ok: bool, duration_ms: float, detail: str = "") -> None:
        self.checklist.finish(name, ok, duration_ms, detail)
        self._show()

    def update(self, progress: MigrationProgress) -> None:
        if self._task is None:
            self._task = self._progress.add_task("migration", total=100.0, rate="")
        self._progress.update(
            self._task,
            completed=progress.percent,
            description=f"migration {progress.status}",
            rate=(
                f"{progress.mb_per_s:.1f} MB/s dirty {progress.dirty_pages_rate}/s "
                f"pass {progress.passes}"
            ),
        )
        self._show()

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False


def make_reporter(*, quiet: bool = False) -> ProgressReporter:
    """A rich bar when stderr is a terminal, log lines otherwise, nothing when ``quiet``."""
    if quiet:
        return NullReporter()
    if sys.stderr.isatty():
        return RichReporter()
    return LogReporter()


class RunLog:
    """Phase timings and notes of one controller run, as the report carries them.

    Both controllers (QMP and libvirt) keep their account here, so timings mean the same
    thing in both reports: milliseconds since the run started. It does no I/O of its own:
    the finished report goes to ``sink`` (the controllers pass :func:`log_migration`).
    """

    def __init__(
        self,
        reporter: ProgressReporter,
        sink: Callable[[MigrationReport], object] | None = None,
    ) -> None:
        self.reporter = reporter
        self.sink = sink
        self.t0 = time.monotonic()
        self.phases: list[PhaseTiming] = []
        self.notes: list[str] = []

    def ms(self, t: float) -> float:
        """``t`` (a ``time.monotonic()`` value) in milliseconds since the run started."""
        return round((t - self.t0) * 1000.0, 3)

    def note(self, text: str) -> None:
        log.info("%s", text)
        self.notes.append(text)

    def record(self, name: str, start: float, ok: bool = True, detail: str | None = None) -> None:
        """A phase that began at ``start`` and ends now."""
        self.phases.append(
            PhaseTiming(
                name=name,
                start_ms=self.ms(start),
                duration_ms=round((time.monotonic() - start) * 1000.0, 3),
                ok=ok,
                detail=detail,
            )
        )
        self.reporter.phase(name, detail or "")
        self._done(self.phases[-1])

    def _done(self, timing: PhaseTiming) -> None:
        """Tell a reporter that shows steps (a :class:`Checklist`) that one ended."""
        done = getattr(self.reporter, "phase_done", None)
        if done is not None:
            done(timing.name, timing.ok, timing.duration_ms, timing.detail or "")

    @contextlib.asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[PhaseTiming]:
        """Time the block as phase ``name``; a failure marks it not ok and propagates."""
        start = time.monotonic()
        timing = PhaseTiming(name=name, start_ms=self.ms(start), duration_ms=0.0)
        self.reporter.phase(name)
        try:
            yield timing
        except BaseException as exc:
            timing.ok = False
            timing.detail = timing.detail or str(exc) or type(exc).__name__
            raise
        finally:
            timing.duration_ms = round((time.monotonic() - start) * 1000.0, 3)
            self.phases.append(timing)
            self._done(timing)

    def fill(self, report: MigrationReport) -> None:
        """Copy phases, notes and the total duration into ``report``; hand it to the sink.

        Both controllers call this once per migration, with the verdict in ``report``.
        """
        report.phases = list(self.phases)
        report.notes = list(self.notes)
        report.duration_ms = self.ms(time.monotonic())
        if self.sink is not None:
            self.sink(report)


def migration_line(report: MigrationReport) -> str:
    """One migration in one line: what moved where, the outcome and its exit code."""
    from spice_libvirt.exitcodes import for_report

    what = getattr(report, "domain", None) or report.source.qmp
    line = (
        f"migration {what} {report.source.qmp} -> {report.destination.qmp}: {report.outcome}"
        f" (exit {int(for_report(report))}), {report.duration_ms:.0f} ms"
    )
    if report.error:
        line += f", error: {report.error}"
    return line


def log_migration(report: MigrationReport) -> bool:
    """Send :func:`migration_line` to the configured syslog socket (``syslog_socket``,
    default ``/dev/log``); never fatal, never blocking. True if it went out."""
    from spice_libvirt import syslog_line
    from spice_libvirt.config import DEFAULT_SYSLOG_SOCKET, load_config
    from spice_libvirt.errors import SpiceLibvirtError

    try:
        path = load_config().syslog_socket
    except SpiceLibvirtError:  # an invalid host configuration is the hook's and doctor's to report
        path = DEFAULT_SYSLOG_SOCKET
    seamless = report.outcome in ("seamless", "no-client") and not report.tls_downgraded
    severity = syslog_line.INFO if seamless else syslog_line.WARNING
    return syslog_line.send("spice-libvirt", migration_line(report), path=path, severity=severity)
