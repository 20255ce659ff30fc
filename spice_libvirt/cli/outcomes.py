"""After ``migrate`` and ``evacuate``: each migration's outcome where operators look.

* the node_exporter textfile named by ``metrics_textfile`` in the host configuration
  (:mod:`spice_libvirt.cli.textfile`), when one is named;
* the host's journal (``journal_path``), one ``controller`` row per migration beside the
  hook's and the agent's rows (``spice-libvirt journal --summary`` reads them together),
  when the journal's directory exists: a management machine without spice-libvirt's
  state directory keeps no journal, a hypervisor does.

Bookkeeping, not the command's result: a configuration or a file that cannot be used is
one warning line on stderr, and the exit code stays the migration's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spice_libvirt.errors import SpiceLibvirtError

if TYPE_CHECKING:
    from spice_libvirt.migration.report import MigrationReport

log = logging.getLogger("spice_libvirt.cli")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One migration the command ran, as the journal and the textfile keep it."""

    domain: str
    destination: str
    #: the verdict (``seamless``...), or ``error`` when the command failed without one
    outcome: str
    uuid: str | None = None
    held_ms: float | None = None
    duration_ms: float | None = None
    #: why it was not seamless, in words ("" when it was)
    reason: str = ""


def of_report(report: MigrationReport, domain: str, destination: str) -> Outcome:
    """The outcome of a finished command's report (a libvirt one says how long it held)."""
    hold = getattr(report, "hold", None)
    reason = ""
    if report.outcome != "seamless":
        reason = report.error or report.verdict_basis or "; ".join(report.notes[:1])
    return Outcome(
        domain=domain,
        destination=destination,
        outcome=report.outcome,
        held_ms=getattr(hold, "held_ms", None),
        duration_ms=report.duration_ms,
        reason=reason,
    )


def failed(domain: str, destination: str, exc: BaseException) -> Outcome:
    """A command that ended in an error before it had a verdict."""
    return Outcome(domain=domain, destination=destination, outcome="error", reason=str(exc))


def record(command: str, outcomes: Sequence[Outcome]) -> None:
    """The textfile and the journal rows of ``outcomes``; warnings, never an exception."""
    from spice_libvirt.config import load_config

    try:
        settings = load_config()
    except SpiceLibvirtError as exc:
        log.warning("outcomes not recorded: %s", exc)
        return
    now = time.time()
    if settings.metrics_textfile:
        from pathlib import Path

        from spice_libvirt.cli.textfile import add_outcomes

        try:
            add_outcomes(
                Path(settings.metrics_textfile), command, [o.outcome for o in outcomes], now
            )
        except SpiceLibvirtError as exc:
            log.warning("metrics textfile not written: %s", exc)
    if os.path.isdir(os.path.dirname(settings.journal_file)):
        _journal(settings.journal_file, settings.journal_max_rows, command, outcomes, now)


def _journal(
    path: str, max_rows: int, command: str, outcomes: Sequence[Outcome], now: float
) -> None:
    from spice_libvirt.hook.journal import Journal, JournalEntry

    journal = Journal(path, max_rows=max_rows)
    for o in outcomes:
        detail = {
            "command": command,
            "destination": o.destination,
            "outcome": o.outcome,
            "held_ms": o.held_ms,
            "reason": o.reason,
        }
        entry = JournalEntry(
            ts=now,
            source="controller",
            object=o.domain,
            operation=command,
            suboperation=o.outcome,
            domain=o.domain,
            uuid=o.uuid,
            outcome="error" if o.outcome == "error" else "ok",
            detail=json.dumps(detail),
            duration_ms=o.duration_ms,
            pid=os.getpid(),
        )
        try:
            journal.record(entry)
        except SpiceLibvirtError as exc:
            log.warning("journal not written: %s", exc)
            return
