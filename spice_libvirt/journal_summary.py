"""``spice-libvirt journal --summary``: a host's migrations at a glance, from its journal.

Without I/O: rows in, a :class:`Summary` out. Three writers leave migration rows in a
host's journal, and each tells one migration once:

* the **agent** (``source = agent``): every outgoing migration it judged -- its verdict,
  the destination libvirtd, how long it held, why it released. A migration it stepped
  aside from (``held_by = controller``) is not counted here: the controller's own row
  tells that migration;
* the **controller** (``source = controller``): what ``migrate`` and ``evacuate`` ran,
  with their verdict (or ``error``), destination and hold;
* the **hook** (``source = libvirt`` or ``vdsm``): a migration coming *in* (libvirt's
  ``migrate begin``, VDSM's ``after_vm_migrate_destination``). The destination is this
  host and no verdict is known here (the source's journal has it): ``incoming``, or
  ``error`` when the hook failed on it.

Per destination and per domain: the migrations, how many were judged and seamless (the
share counts judged migrations only: ``no-client``, ``skipped`` and ``incoming`` have no
client verdict), the median hold, the worst outcome and the last failure (judged, not
seamless) with its reason.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydantic import BaseModel

from spice_libvirt.hook.journal import JournalEntry

#: outcomes that judge a client's hand-over, worst first
JUDGED = (
    "error",
    "failed",
    "client-lost",
    "cancelled",
    "not-linked",
    "switch-host",
    "semi-seamless",
    "seamless",
)
#: outcomes without a client verdict, after every judged one
UNJUDGED = ("incoming", "skipped", "no-client")
#: how the destination of an incoming migration is named (this host's own journal)
THIS_HOST = "(this host)"
#: hook rows that mark a migration coming in
_INCOMING = {("libvirt", "migrate"), ("vdsm", "after_vm_migrate_destination")}

Writer = Literal["agent", "controller", "hook"]


class Migration(BaseModel):
    """One migration as one journal row tells it."""

    at: float
    domain: str
    destination: str
    outcome: str
    writer: Writer
    held_ms: float | None = None
    reason: str = ""


class Failure(BaseModel):
    at: float
    domain: str
    destination: str
    outcome: str
    reason: str


class Group(BaseModel):
    """The migrations of one destination, or of one domain."""

    key: str
    migrations: int
    judged: int
    seamless: int
    #: seamless / judged (None: nothing judged)
    seamless_share: float | None
    median_held_ms: float | None
    worst_outcome: str
    last_failure: Failure | None = None


class Summary(BaseModel):
    since: float | None = None
    migrations: int
    by_destination: list[Group]
    by_domain: list[Group]


def _rank(outcome: str) -> int:
    order = (*JUDGED, *UNJUDGED)
    return order.index(outcome) if outcome in order else 0  # unknown words count as worst


def _detail(entry: JournalEntry) -> dict[str, Any]:
    try:
        data = json.loads(entry.detail)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _judged_by(
    entry: JournalEntry, writer: Writer, detail: dict[str, Any], reason: str
) -> Migration:
    """A migration an agent's verdict or a controller's row tells (the same keys)."""
    return Migration(
        at=entry.ts,
        domain=entry.domain or entry.object,
        destination=str(detail.get("destination") or "?"),
        outcome=str(detail.get("outcome") or entry.suboperation),
        writer=writer,
        held_ms=_number(detail.get("held_ms")),
        reason=reason,
    )


def _from_agent(entry: JournalEntry) -> Migration | None:
    verdict = _detail(entry)
    if verdict.get("held_by") == "controller":
        return None
    notes = [str(n) for n in verdict.get("notes") or []]
    reason = "; ".join(notes) or str(verdict.get("released_why") or "")
    return _judged_by(entry, "agent", verdict, reason)


def _from_controller(entry: JournalEntry) -> Migration:
    detail = _detail(entry)
    return _judged_by(entry, "controller", detail, str(detail.get("reason") or ""))


def _from_hook(entry: JournalEntry) -> Migration | None:
    if (entry.source, entry.operation) not in _INCOMING:
        return None
    failed = entry.outcome == "error"
    return Migration(
        at=entry.ts,
        domain=entry.domain or entry.object,
        destination=THIS_HOST,
        outcome="error" if failed else "incoming",
        writer="hook",
        reason=f"hook: {entry.detail}" if failed else "",
    )


def migrations(entries: Iterable[JournalEntry]) -> list[Migration]:
    """The migrations the rows tell, oldest first (other rows are not migrations)."""
    found: list[Migration] = []
    for entry in entries:
        if entry.source == "agent":
            m = _from_agent(entry)
        elif entry.source == "controller":
            m = _from_controller(entry)
        else:
            m = _from_hook(entry)
        if m is not None:
            found.append(m)
    return sorted(found, key=lambda m: m.at)


def group(key: str, items: list[Migration]) -> Group:
    """One line of the summary (``items`` oldest first)."""
    judged = [m for m in items if m.outcome not in UNJUDGED]
    seamless = sum(m.outcome == "seamless" for m in judged)
    held = [m.held_ms for m in items if m.held_ms is not None]
    failures = [m for m in judged if m.outcome != "seamless"]
    last = failures[-1] if failures else None
    return Group(
        key=key,
        migrations=len(items),
        judged=len(judged),
        seamless=seamless,
        seamless_share=round(seamless / len(judged), 4) if judged else None,
        median_held_ms=round(statistics.median(held), 1) if held else None,
        worst_outcome=min((m.outcome for m in items), key=_rank),
        last_failure=(
            Failure(
                at=last.at,
                domain=last.domain,
                destination=last.destination,
                outcome=last.outcome,
                reason=last.reason,
            )
            if last is not None
            else None
        ),
    )


def _groups(items: list[Migration], key: Callable[[Migration], str]) -> list[Group]:
    keyed: dict[str, list[Migration]] = {}
    for m in items:
        keyed.setdefault(key(m), []).append(m)
    return [group(k, keyed[k]) for k in sorted(keyed)]


def summarize(entries: Iterable[JournalEntry], since: float | None = None) -> Summary:
    found = [m for m in migrations(entries) if since is None or m.at >= since]
    return Summary(
        since=since,
        migrations=len(found),
        by_destination=_groups(found, lambda m: m.destination),
        by_domain=_groups(found, lambda m: m.domain),
    )


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Prometheus-style ``90s``, ``15m``, ``1h30m``, ``7d``, ``2w`` -> seconds (> 0)."""
    pos = 0
    total = 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text or total <= 0:
        raise ValueError(f"not a duration (e.g. 90s, 15m, 1h30m, 7d): {text!r}")
    return total
