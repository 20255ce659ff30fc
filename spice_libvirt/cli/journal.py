"""``spice-libvirt journal``: show what the libvirt hook (and the VDSM adapters) recorded.

Reads the journal named by the host configuration (``journal_path``) or ``--path``; never
creates it. Newest entries first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

from spice_libvirt.config import load_config
from spice_libvirt.errors import ConfigError
from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.hook.journal import Journal, JournalEntry


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "journal",
        help="show the hook journal",
        description="Show the invocations the libvirt hook recorded, newest first.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON array")
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
    entries = Journal(path).entries(limit=args.limit, domain=args.domain)
    if args.json:
        print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        return int(ExitCode.OK)
    if not entries:
        print(f"no entries in {path}")
        return int(ExitCode.OK)
    for e in entries:
        print(format_entry(e))
    return int(ExitCode.OK)
