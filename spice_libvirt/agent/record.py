"""What the agent says about each migration it saw, and where it says it.

Every outgoing migration the agent sees ends in one :class:`AgentVerdict`: in the SQLite
journal (``spice-libvirt journal`` shows it beside the hook's entries), in the status file
(``spice-libvirt agent status``) and as one log line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from spice_libvirt.agent.plan import ReleaseKind
from spice_libvirt.errors import UnsafePathError
from spice_libvirt.files import PRIVATE_FILE, write_file
from spice_libvirt.migration.verdict import AgentOutcome

log = logging.getLogger(__name__)

#: syslog severity of a verdict that went well
INFO = 6

#: the verdict's outcomes (:func:`spice_libvirt.migration.verdict.agent_outcome`), and the
#: agent's own: it stepped aside (``skipped``), or could not follow (``error``)
AgentRecordOutcome = AgentOutcome | Literal["skipped", "error"]
#: who held the migration: this agent, spice-libvirt's own controller (the agent stepped
#: aside), or nobody (no client, another holder, or an error before the hold)
HeldBy = Literal["agent", "controller", "none"]


class AgentVerdict(BaseModel):
    """One migration the agent saw.

    ``connection_id_kept`` is inferred, not read: asking QEMU for the session's connection
    id would taint the domain. A client whose every channel was initialized on the
    destination before the switchover, none of them dropped, and that did not reconnect
    after it left the source kept its session (spice-server's seamless path); one that
    reconnected did not (the controller's rule on the same evidence,
    :func:`spice_libvirt.migration.verdict.judge`).
    """

    domain: str
    uuid: str | None = None
    at: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    job: str = ""
    destination: str | None = None
    clients: list[str] = Field(default_factory=list)
    channels: int = 0
    hold: Literal["taint-free", "qmp-throttle", "none"] = "none"
    held_by: HeldBy = "none"
    #: ``switchover``: the bulk at the caller's speed, held near its end; ``bulk``: held
    #: at 1 MiB/s from the start (``agent.settings.hold_mode``)
    hold_mode: str | None = None
    #: from QEMU's ``setup`` to the release: the time the switchover was held back
    held_ms: float | None = None
    #: the part of it at the hold's speed, 1 MiB/s (0: the client linked during the bulk)
    throttled_ms: float | None = None
    #: from the hold to the destination initializing the client's last channel
    link_wait_ms: float | None = None
    #: the client's RTT as the kernel measured it on its SPICE connections
    client_rtt_ms: float | None = None
    #: from QEMU's ``setup`` event to the hold in force (ms): a guest with little to move
    #: is across in well under 100 ms
    reacted_ms: float | None = None
    #: progress samples the switchover plan took (one libvirt call each)
    samples: int = 0
    release: ReleaseKind | None = None
    released_why: str = ""
    caller_restored: dict[str, int] = Field(default_factory=dict)
    outcome: AgentRecordOutcome
    connection_id_kept: bool | None = None
    #: the client's new connections to the destination after it left the source
    relinks_after: int = 0
    #: why the evidence was taken as conclusive when the verdict was taken
    #: (:func:`spice_libvirt.migration.verdict.settled`)
    verdict_basis: str = ""
    tainted: bool = False
    #: held taint-free, the guest still switched over before its client linked (too
    #: little memory to move at 1 MiB/s: only ``allow_taint`` holds it)
    taint_free_failed: bool = False
    notes: list[str] = Field(default_factory=list)

    def line(self) -> str:
        """The one log line (syslog/journald) of this verdict."""
        held = f"held {self.held_ms:.0f} ms" if self.held_ms is not None else "not held"
        kept = {True: "kept", False: "new", None: "n/a"}[self.connection_id_kept]
        return (
            f"spice-libvirt agent: {self.domain} -> {self.destination or '?'}: {self.outcome}"
            f" ({held}; {self.channels} channel(s); connection id {kept}; {self.released_why})"
        )


def syslog_verdict(socket_path: str, verdict: AgentVerdict) -> None:
    """The verdict's one line to syslog/journald (dropped silently when there is none)."""
    from spice_libvirt.syslog_line import WARNING, send

    severity = WARNING if verdict.outcome in ("switch-host", "not-linked", "error") else INFO
    send("spice-libvirt-agent", verdict.line(), path=socket_path, severity=severity)


def journal_verdict(journal_path: Path | None, verdict: AgentVerdict) -> None:
    """Append ``verdict`` to the hook's journal; a journal that cannot be written is logged,
    never fatal (the migration is over; losing its record must not stop the agent)."""
    from spice_libvirt.hook.journal import Journal, JournalEntry

    try:
        if journal_path is None:
            from spice_libvirt.config import load_config

            journal_path = load_config().journal_path
        entry = JournalEntry(
            ts=time.time(),
            object=verdict.domain,
            operation="agent",
            suboperation=verdict.outcome,
            domain=verdict.domain,
            uuid=verdict.uuid,
            outcome="error" if verdict.outcome == "error" else "ok",
            detail=verdict.model_dump_json(),
            duration_ms=verdict.held_ms,
            pid=os.getpid(),
            source="agent",
        )
        Journal(journal_path).record(entry)
    except Exception as exc:  # disk, lock or config: logged, never fatal to the agent
        log.warning("agent: cannot journal the verdict of %s: %s", verdict.domain, exc)


class AgentStatus(BaseModel):
    """The agent's status file: what ``agent status`` shows."""

    pid: int
    started_at: str
    connect: str
    connected: bool = False
    #: where the Prometheus metrics are served (None: ``metrics = false``)
    metrics_address: str | None = None
    holding: list[str] = Field(default_factory=list)
    destinations: list[str] = Field(default_factory=list)
    seen: int = 0
    recent: list[AgentVerdict] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)


def status_path(state_dir: Path) -> Path:
    return state_dir / "status.json"


def write_status(state_dir: Path, status: AgentStatus) -> None:
    target = status_path(state_dir)
    try:
        write_file(target, status.model_dump_json(indent=1), PRIVATE_FILE)
    except UnsafePathError as exc:
        log.warning("agent: status not written: %s", exc)


def read_status(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(status_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
