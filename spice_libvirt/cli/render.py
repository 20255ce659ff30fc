"""How a migration verdict is printed: ``--json`` (the contract) or a short human summary.

Shared by every command that migrates (``migrate`` in both forms, ``lab migrate``), so the
same verdict reads the same everywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from spice_libvirt.errors import UnsafePathError
from spice_libvirt.files import check_target
from spice_libvirt.migration.report import MigrationReport


def print_report(report: MigrationReport, as_json: bool) -> None:
    """``--json``: the verdict as one JSON object on stdout; else a short human summary."""
    if as_json:
        print(report.model_dump_json(indent=1))
        return
    fig = report.migration
    print(f"outcome: {report.outcome}")
    link = report.link_wait
    if link.duration_ms is not None:
        print(
            f"client link wait: {link.result} in {link.duration_ms:.0f} ms "
            f"(+{link.grace_ms:.0f} ms grace, signal {link.signal})"
        )
    if fig.status:
        print(
            f"migration: {fig.status}, total {fig.total_time_ms} ms, downtime "
            f"{fig.downtime_ms} ms, setup {fig.setup_time_ms} ms, "
            f"{(fig.transferred_bytes or 0) / 2**20:.1f} MiB, {fig.passes} passes"
        )
    for client in report.clients:
        print(
            f"client {client.kind}: {client.path}, {client.identity} "
            f"({'kept' if client.connection_id_kept else 'not kept'}), "
            f"channels {len(client.channels_before)} -> {len(client.channels_after)}"
        )
        if client.record is not None and client.record.steps:
            print(f"  path: {client.record.path_summary()}")
        if client.stream is not None and (client.stream.records or client.stream.gaps):
            s = client.stream
            print(f"  stream: {s.records} records, {s.gaps} gaps, {s.duplicates} duplicates")
        if client.blackout_ms:
            worst = max(client.blackout_ms.items(), key=lambda kv: kv[1])
            print(f"  longest blackout: {worst[0]} {worst[1]:.1f} ms")
    if getattr(report, "tls_downgraded", False):
        channels = ", ".join(getattr(report, "tls_downgraded_channels", []) or []) or "?"
        print(f"TLS DOWNGRADED: channels moved from TLS to plain text: {channels}")
    if report.error:
        print(f"error ({report.error_phase}): {report.error}")
    for note in report.notes:
        print(f"note: {note}")


def print_hold(report: Any) -> None:
    """The libvirt path's hold: how the switchover was held until the client had linked."""
    hold = report.hold
    mode = f", {hold.mode} mode, at the floor {hold.floor_ms} ms" if hold.mode else ""
    print(
        f"hold: {hold.applied} ({hold.reason}{mode}); released after {hold.released_after_ms} "
        f"ms: {hold.release_reason}; migrateToURI3 {report.wall_ms} ms"
    )


def timeline_path(text: str) -> Path:
    """``--timeline``'s value, refused at once (a usage error, before anything moves) when
    writing it later would be: a symlink, or a directory others can write."""
    try:
        check_target(text)
    except UnsafePathError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return Path(text)


def add_timeline_argument(parser: argparse.ArgumentParser) -> None:
    """``--timeline FILE.svg``, for every command that prints a migration verdict."""
    parser.add_argument(
        "--timeline",
        type=timeline_path,
        default=None,
        metavar="FILE.svg",
        help="also draw the migration as an SVG timeline (lanes: controller, hold, source, "
        "destination, each client channel; the switchover and every blackout)",
    )


def save_timeline(report: MigrationReport, path: Path | None) -> None:
    """Write the timeline of ``report`` to ``path`` (when given), saying so on stderr.

    A file that cannot be written is one line on stderr, never a changed exit code: the
    migration has happened, and its exit code says how it went.
    """
    if path is None:
        return
    from spice_libvirt.migration.timeline import write_timeline

    try:
        write_timeline(report, path)
    except UnsafePathError as exc:
        print(f"spice-libvirt: timeline not written: {exc}", file=sys.stderr)
        return
    print(f"timeline: {path}", file=sys.stderr)
