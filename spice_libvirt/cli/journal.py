"""``spice-libvirt journal``: show what the libvirt hook (and the VDSM adapters), the host
agent and the controller recorded.

Reads the journal named by the host configuration (``journal_path``) or ``--path``; never
creates it. Newest entries first; ``--summary`` instead: per destination and per domain,
the migrations, the seamless share, the median hold, the worst outcome and the last
failure (:mod:`spice_libvirt.journal_summary`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from spice_libvirt.config import load_config
from spice_libvirt.errors import ConfigError
from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.hook.journal import Journal, JournalEntry
from spice_libvirt.journal_summary import Group, Summary, parse_duration, summarize


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "journal",
        help="show the journal (hook, agent, controller), or a summary of its migrations",
        description=(
            "Show what the libvirt hook, the host agent and the controller recorded, newest "
            "first; or, with --summary, the migrations per destination and per domain."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--summary",
        action="store_true",
        help="per destination and per domain: migrations, seamless share, median hold, "
        "worst outcome, last failure",
    )
    parser.add_argument(
        "--since",
        type=_duration,
        metavar="DURATION",
        help="only the last DURATION (90s, 15m, 1h30m, 7d)",
    )
    parser.add_argument(
        "--limit", type=_positive, default=50, metavar="N", help="at most N entries (50)"
    )
    parser.add_argument("--domain", metavar="NAME", help="only entries of this domain")
    parser.add_argument(
        "--path", type=Path, default=None, help="journal file (default: from the configuration)"
    )
    parser.set_defaults(handler=_show)


def format_entry(e: JournalEntry) -> str:
    """One human line per entry."""
    when = dt.datetime.fromtimestamp(e.ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    dur = f"{e.duration_ms:.0f}ms" if e.duration_ms is not None else "-"
    what = f"{e.operation} {e.suboperation}" + (f" {e.extra}" if e.extra != "-" else "")
    line = (
        f"{when}Z {e.source:<7} {e.object:<20} {what:<22} {e.outcome:<9} {dur:>6} "
        f"uuid={e.uuid or '-'}"
    )
    if e.detail:
        line += f"  {e.detail}"
    return line


def _show(args: argparse.Namespace) -> int:
    path: Path | None = args.path
    if path is None:
        path = load_config().journal_path
    elif not path.is_absolute():
        raise ConfigError(f"--path must be absolute: {path}")
    since = time.time() - args.since if args.since is not None else None
    if args.summary:
        rows = Journal(path).entries(limit=None, domain=args.domain, since=since)
        summary = summarize(rows, since)
        if args.json:
            print(summary.model_dump_json(indent=2))
        else:
            print("\n".join(format_summary(summary, path)))
        return int(ExitCode.OK)
    entries = Journal(path).entries(limit=args.limit, domain=args.domain, since=since)
    if args.json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return int(ExitCode.OK)
    if not entries:
        print(f"no entries in {path}")
        return int(ExitCode.OK)
    for e in entries:
        print(format_entry(e))
    return int(ExitCode.OK)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _group_line(g: Group, width: int, by_destination: bool) -> str:
    share = f"{g.seamless}/{g.judged}" + (
        f" {g.seamless_share * 100:.0f}%" if g.seamless_share is not None else ""
    )
    held = f"{g.median_held_ms / 1000:.2f} s" if g.median_held_ms is not None else "-"
    line = f"{g.key:<{width}} {g.migrations:>10} {share:>12} {held:>11}  {g.worst_outcome:<13}"
    if g.last_failure is not None:
        f = g.last_failure
        other = f.domain if by_destination else f.destination
        line += f" {_when(f.at)} {f.outcome} ({other}): {f.reason or 'no reason recorded'}"
    else:
        line += " -"
    return line.rstrip()


def format_summary(summary: Summary, path: Path) -> list[str]:
    """The summary as two tables, per destination and per domain."""
    since = f" since {_when(summary.since)}" if summary.since is not None else ""
    lines = [f"{summary.migrations} migration(s) in {path}{since}"]
    for title, groups in (
        ("DESTINATION", summary.by_destination),
        ("DOMAIN", summary.by_domain),
    ):
        by_destination = title == "DESTINATION"
        if not groups:
            continue
        width = max(len(title), *(len(g.key) for g in groups))
        lines += [
            "",
            f"{title:<{width}} {'MIGRATIONS':>10} {'SEAMLESS':>12} {'MEDIAN HELD':>11}  "
            f"{'WORST':<13} LAST FAILURE",
        ]
        lines += [_group_line(g, width, by_destination) for g in groups]
    return lines
