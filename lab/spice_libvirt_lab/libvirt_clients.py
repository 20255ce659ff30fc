"""``lab clients``: what every domain's own client said of each migration, in order.

Each domain of a fleet lab (``lab up --libvirt --domains N``) has its own ``spice-libvirt
watch --json`` client in the client namespace, which writes one verdict line per migration
its session went through (:mod:`spice_libvirt_lab.libvirt_fleet`). Those lines are the
oracle a benchmark or a test reads, whoever moved the guests -- our controller, plain
``virsh``, a VDSM-like caller, Ansible: the client's own record of its path (seamless,
semi-seamless, switch-host), whether its connection id was kept, and how long each channel
was dark. :func:`client_histories` reads them; ``lab clients --json`` prints them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from spice_libvirt.spice.record import ClientMigrationRecord
from spice_libvirt_lab.libvirt_state import LabState


class ClientVerdict(BaseModel):
    """One migration as the domain's client recorded it."""

    path: str | None = Field(description="seamless, semi-seamless, switch-host; None: unknown")
    connection_id_kept: bool | None = None
    destination: str | None = None
    #: the darkest channel's blackout (ms): last message from the source to the first
    #: with the destination
    blackout_ms: float | None = None
    error: str | None = None


class ClientHistory(BaseModel):
    """A domain's client: alive or not, and its verdicts in the order it gave them."""

    domain: str
    pid: int
    alive: bool
    verdicts: list[ClientVerdict] = Field(default_factory=list)
    #: lines that were not a verdict (a client killed mid-line), counted, not hidden
    unreadable: int = 0

    @property
    def seamless(self) -> int:
        return sum(v.path == "seamless" for v in self.verdicts)


def verdict_of(line: str) -> ClientVerdict | None:
    """One line of a client's ``--json`` output as a verdict; None if it is none."""
    try:
        record = ClientMigrationRecord.model_validate(json.loads(line))
    except (ValueError, ValidationError):
        return None
    blackouts = list(record.blackout_ms.values())
    return ClientVerdict(
        path=record.path,
        connection_id_kept=record.connection_id_kept,
        destination=record.destination,
        blackout_ms=round(max(blackouts), 1) if blackouts else None,
        error=record.error,
    )


def verdicts_path(state: LabState, domain: str) -> Path:
    """Where ``domain``'s client writes its verdict lines."""
    return state.run_dir / "clients" / f"{domain}.jsonl"


def client_histories(state: LabState) -> dict[str, ClientHistory]:
    """Every client of the lab, by domain, with its verdicts in order."""
    out: dict[str, ClientHistory] = {}
    for client in state.clients:
        if client.domain is None:
            continue
        history = ClientHistory(
            domain=client.domain, pid=client.proc.pid, alive=client.proc.alive()
        )
        try:
            lines = verdicts_path(state, client.domain).read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            if not line.strip():
                continue
            verdict = verdict_of(line)
            if verdict is None:
                history.unreadable += 1
            else:
                history.verdicts.append(verdict)
        out[client.domain] = history
    return out


class ClientsReport(BaseModel):
    """``lab clients --json``."""

    lab: str
    domains: dict[str, ClientHistory]


def report(state: LabState) -> ClientsReport:
    return ClientsReport(lab=state.id, domains=client_histories(state))


__all__ = ["ClientHistory", "ClientVerdict", "client_histories", "report", "verdict_of"]
