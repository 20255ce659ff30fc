"""``spice-libvirt watch``: stay connected like a user and report every migration.

Useful on its own (point it at a VM and migrate it with any tool: virsh, VDSM, Proxmox) and
as the witness the controller uses. One verdict per migration: a JSON object per line with
``--json``, a short paragraph otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import TextIO

from pydantic import SecretStr

from spice_libvirt.errors import SpiceLibvirtError
from spice_libvirt.exitcodes import ExitCode, exit_codes_epilog, for_client_record, worst
from spice_libvirt.secrets import TICKET_ENV, read_ticket
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.record import ClientMigrationRecord
from spice_libvirt.spice.uri import parse_spice_uri


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "watch",
        help="stay connected to a SPICE server and report every migration the session goes through",
        description=f"The ticket comes from --ticket-file or ${TICKET_ENV}, never from argv. "
        "Exit status: 0 when every migration seen was seamless, 8 when one was not; "
        "when the session is lost, the code of its first error (3 unreachable or closed, "
        "5 protocol violation, 6 TLS).",
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("uri", help="spice://HOST:PORT[?tls-port=N]")
    p.add_argument("--ticket-file", type=Path, help="file whose first line is the SPICE ticket")
    p.add_argument("--ca-file", type=Path, help="CA certificate(s) to verify the TLS port")
    p.add_argument(
        "--host-subject", help="expected server certificate subject, e.g. 'C=XX,O=Org,CN=host'"
    )
    p.add_argument(
        "--stream-port",
        default="org.spice-libvirt.stream",
        help="port channel whose record stream is checked for gaps ('' to disable)",
    )
    p.add_argument(
        "--count", type=int, default=0, help="stop after N migrations (0: run until interrupted)"
    )
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (0: no limit)")
    p.add_argument(
        "--old-client",
        choices=["no-seamless", "no-semi-seamless"],
        help="announce fewer capabilities, like an old client",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per migration, one per line"
    )
    p.set_defaults(handler=run)


def describe(record: ClientMigrationRecord) -> str:
    kept = "kept" if record.connection_id_kept else "NOT kept"
    lines = [
        f"migration to {record.destination}: {record.path}",
        f"  connection id {record.connection_id_before} -> {record.connection_id_after} ({kept})",
        f"  channels {len(record.channels_before)} -> {len(record.channels_after)}",
        f"  path: {record.path_summary()}",
    ]
    if record.blackout_ms:
        worst = max(record.blackout_ms, key=lambda k: record.blackout_ms[k])
        lines.append(f"  longest blackout: {worst} {record.blackout_ms[worst]:.1f} ms")
    if record.error:
        lines.append(f"  error: {record.error}")
    return "\n".join(lines)


def _print_verdict(client: SpiceClient, record: ClientMigrationRecord, as_json: bool) -> None:
    stream = client.stream_stats() if client.options.stream_port_name else None
    if as_json:
        payload = record.model_dump(mode="json")
        payload["stream"] = stream.model_dump() if stream else None
        print(json.dumps(payload), flush=True)
        return
    print(describe(record), flush=True)
    if stream is not None:
        print(
            f"  stream: {stream.records} records, {stream.gaps} gaps, "
            f"{stream.duplicates} duplicates",
            flush=True,
        )


async def _announce_links(client: SpiceClient, out: TextIO) -> None:
    """Say when the client has answered a migration's source: linked to the destination.

    That is the moment a migration may switch over seamlessly; a person (or a test)
    driving the migration by hand waits for this line instead of guessing a delay.
    """
    after = client.migration_count
    while True:
        try:
            at = await client.wait_migration_connected(timeout=3600.0, after=after)
        except TimeoutError:
            continue
        except SpiceLibvirtError:
            return  # the session failed: the main loop reports its first error
        after += 1
        state = "linked to the destination" if at is not None else "could NOT link to it"
        print(f"migration {after}: {state}", file=out, flush=True)


async def watch(options: ClientOptions, count: int, duration: float, as_json: bool) -> int:
    client = SpiceClient(options)
    await client.connect()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    deadline = loop.time() + duration if duration > 0 else None
    seen, codes = 0, [ExitCode.OK]
    # with --json stdout carries only verdicts; the human lines go to stderr
    human = sys.stderr if as_json else sys.stdout
    print(
        f"watching session {client.session_id} ({', '.join(client.channels)})",
        file=human,
        flush=True,
    )
    announcer = asyncio.create_task(_announce_links(client, human))
    stopped = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set() and (count == 0 or seen < count):
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                break
            # wake on a verdict, on the session's failure (raised: the first error, with
            # its exit code) or on a signal
            step = 60.0 if left is None else left
            nxt = asyncio.create_task(client.next_migration(timeout=step))
            await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await nxt
                continue
            with contextlib.suppress(TimeoutError):
                record = nxt.result()
                seen += 1
                codes.append(for_client_record(record))
                _print_verdict(client, record, as_json)
    finally:
        for task in (announcer, stopped):
            task.cancel()
        await asyncio.gather(announcer, stopped, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await client.close()
    return int(worst(codes))


def run(args: argparse.Namespace) -> int:
    uri = parse_spice_uri(args.uri)
    ticket = read_ticket(args.ticket_file)
    options = ClientOptions(
        host=uri.host,
        port=uri.port,
        tls_port=uri.tls_port,
        ticket=SecretStr(ticket) if ticket is not None else None,
        ca_file=args.ca_file,
        host_subject=args.host_subject or uri.tls_subject,
        stream_port_name=args.stream_port or None,
        seamless=args.old_client is None,
        semi_seamless=args.old_client != "no-semi-seamless",
    )
    return asyncio.run(watch(options, args.count, args.duration, args.json))
