"""``spice-libvirt probe``: connect, link every channel, report, disconnect."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from spice_libvirt.secrets import TICKET_ENV, read_ticket
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.constants import ChannelType, CommonCap, MainCap, MouseMode
from spice_libvirt.spice.uri import parse_spice_uri


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "probe",
        help="connect to a SPICE server, link every channel and report what it offers",
        description=f"The ticket comes from --ticket-file or ${TICKET_ENV}, never from argv.",
    )
    p.add_argument("uri", help="spice://HOST:PORT[?tls-port=N]")
    p.add_argument("--ticket-file", type=Path, help="file whose first line is the SPICE ticket")
    p.add_argument("--ca-file", type=Path, help="CA certificate(s) to verify the TLS port")
    p.add_argument(
        "--host-subject", help="expected server certificate subject, e.g. 'C=XX,O=Org,CN=host'"
    )
    p.add_argument(
        "--tls", action="store_true", help="use the TLS port even if a plain port is given"
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds for the whole probe (default 10)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def _names(enum: type[CommonCap] | type[MainCap], bits: frozenset[int]) -> list[str]:
    out = []
    for bit in sorted(bits):
        try:
            out.append(enum(bit).name)
        except ValueError:
            out.append(f"CAP_{bit}")
    return out


def _mouse_mode_name(mode: int | None) -> str | int | None:
    if mode in (MouseMode.SERVER, MouseMode.CLIENT):
        return "server" if mode == MouseMode.SERVER else "client"
    return mode


async def probe(options: ClientOptions, timeout: float) -> dict[str, Any]:
    """Connect, collect what the server tells a new client, disconnect."""
    client = SpiceClient(options)
    await client.connect(timeout=timeout)
    try:
        # NAME/UUID/agent state follow INIT closely; give them a moment to arrive
        await asyncio.sleep(0.05)
        channels = []
        for label in client.channels:
            kind, _, ident = label.partition(":")
            channels.append({"type": kind, "id": int(ident)})
        mode = client.mouse_mode
        return {
            "host": client.host,
            "port": client.port,
            "tls_port": client.tls_port,
            "tls": client.tls_in_use,
            "session_id": client.session_id,
            "name": client.name,
            "uuid": client.uuid,
            "mouse_mode": _mouse_mode_name(mode),
            "agent_connected": client.agent_connected,
            "server_caps": {
                "common": _names(CommonCap, client.server_common_caps),
                "main": _names(MainCap, client.server_main_caps),
            },
            "channels": channels,
            "listed_channels": [
                {
                    "type": ChannelType(t).label if t in ChannelType._value2member_map_ else t,
                    "id": i,
                }
                for t, i in client.listed_channels
            ],
        }
    finally:
        await client.close()


def run(args: argparse.Namespace) -> int:
    uri = parse_spice_uri(args.uri)
    ticket = read_ticket(args.ticket_file)
    options = ClientOptions(
        host=uri.host,
        port=None if args.tls and uri.tls_port else uri.port,
        tls_port=uri.tls_port,
        ticket=SecretStr(ticket) if ticket is not None else None,
        ca_file=args.ca_file,
        host_subject=args.host_subject or uri.tls_subject,
        stream_port_name=None,
        link_timeout=args.timeout,
    )
    report = asyncio.run(probe(options, args.timeout))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"SPICE server {uri}  (session {report['session_id']}{', TLS' if report['tls'] else ''})")
    print(f"  name: {report['name']}  uuid: {report['uuid']}")
    print(f"  mouse mode: {report['mouse_mode']}  agent connected: {report['agent_connected']}")
    caps = report["server_caps"]
    print(f"  server caps: common {', '.join(caps['common'])}; main {', '.join(caps['main'])}")
    print("  channels: " + ", ".join(f"{c['type']}:{c['id']}" for c in report["channels"]))
    return 0
