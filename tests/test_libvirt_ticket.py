"""On real libvirtds: a SPICE ticket with an expiry, as a manager sets it.

``lab up --libvirt --ticket-file F --ticket-valid-s N`` defines the guest with VDSM's
placeholder (ticketing on, a ticket expired in 1970) and sets the real ticket through
``virDomainUpdateDeviceFlags`` (``passwd``, ``passwdValidTo``, ``connected='keep'``). Then:

* a long-valid ticket: our client authenticates on both hosts, seamless there and back;
* a ticket that would expire before the client can link to the destination (or has
  expired): the preflight refuses with a clear error, the VM untouched -- or, with
  ``extend_ticket_s``, extends it (as VDSM does) and says so;
* the ticket never appears in the lab's state file or in any log the lab keeps.
"""

from __future__ import annotations

import datetime as dt
import secrets
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.libvirt.controller import migrate_libvirt
from spice_libvirt.libvirt.errors import PreflightError
from spice_libvirt_lab import libvirt_lab, libvirt_ticket, libvirt_tls
from spice_libvirt_lab.libvirt_lab import LabState
from spice_libvirt_lab.libvirt_migrate import lab_migrate, lab_request
from spice_libvirt_lab.witness_thread import netns_witness
from tests.rigs.libvirt_lab import LIBVIRT_LAB

pytest.importorskip("libvirt")

pytestmark = LIBVIRT_LAB


def _state(lab: Path) -> LabState:
    state = libvirt_lab.load_state(lab)
    assert state is not None
    return state


def _valid_to(state: LabState, host: str) -> dt.datetime | None:
    done = subprocess.run(
        ["virsh", "-c", state.hosts[host].uri_unix, "dumpxml", state.domain],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    node = ET.fromstring(done.stdout).find("./devices/graphics[@type='spice']")
    assert node is not None
    value = node.get("passwdValidTo")
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC) if value else None


def _no_secret_anywhere(state: LabState, ticket: str) -> None:
    files = [state.lab_dir / "state.json", *state.run_dir.rglob("*.log")]
    for path in files:
        if path.is_file():
            assert ticket not in path.read_text(errors="replace"), path


def test_ticket_with_expiry_checked_refused_and_extended(
    libvirt_lab_dir: Path, lab_dir: Path
) -> None:
    ticket = secrets.token_urlsafe(12)
    ticket_file = lab_dir / "ticket"
    ticket_file.write_text(ticket + "\n")
    ticket_file.chmod(0o600)
    state = libvirt_lab.up(libvirt_lab_dir, tls=True, ticket_file=ticket_file, ticket_valid_s=3600)
    valid_to = _valid_to(state, "A")
    assert valid_to is not None
    assert valid_to > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=50)

    # a long-valid ticket: our client authenticates on both hosts, seamless there and back
    for expected in ("B", "A"):
        report = lab_migrate(libvirt_lab_dir)
        assert report.outcome == "seamless", (report.outcome, report.notes)
        assert any(n.startswith("SPICE ticket valid until") for n in report.notes)
        assert libvirt_lab.status(libvirt_lab_dir).active_host == expected
    # the destination got the same expiry with the guest
    assert _valid_to(_state(libvirt_lab_dir), "A") == valid_to

    # expiring before the client could link to the destination (no client RTT known: the
    # link-wait bound of 15 s counts): refused, nothing changed
    libvirt_ticket.set_ticket(_state(libvirt_lab_dir), "A", 8)
    with pytest.raises(PreflightError, match="the SPICE ticket expires in") as info:
        lab_migrate(libvirt_lab_dir, watch=False)
    assert "--extend-ticket" in str(info.value)
    assert "Nothing was changed" in str(info.value)
    assert libvirt_lab.status(libvirt_lab_dir).active_host == "A"
    # already expired: the same, saying so
    libvirt_ticket.set_ticket(_state(libvirt_lab_dir), "A", -60)
    with pytest.raises(PreflightError, match="the SPICE ticket expired"):
        lab_migrate(libvirt_lab_dir, watch=False)
    assert libvirt_lab.status(libvirt_lab_dir).active_host == "A"

    # asked to extend (as VDSM does, 120 s): extended on the source, migrated, said so
    before = dt.datetime.now(dt.UTC)
    report = lab_migrate(libvirt_lab_dir, watch=False, options={"extend_ticket_s": 120.0})
    assert report.migration.status == "completed", report.notes
    assert for_report(report) is ExitCode.OK
    assert any("extended to" in n and "+120 s" in n for n in report.notes), report.notes
    moved = _valid_to(_state(libvirt_lab_dir), "B")
    assert moved is not None
    assert moved >= before.replace(microsecond=0) + dt.timedelta(seconds=119)
    _no_secret_anywhere(_state(libvirt_lab_dir), ticket)


async def test_expired_ticket_plain_libvirt_loses_the_client_ours_refuses(
    libvirt_lab_dir: Path, lab_dir: Path
) -> None:
    """What an expired ticket does (the client linked while it was valid and kept with
    ``connected='keep'``): ours refuses in the preflight, the VM and the client untouched;
    libvirt's own migration goes ahead, the destination refuses the client's ticket, the
    client cannot follow -- the report says so, it is not a success."""
    ticket_file = lab_dir / "ticket"
    ticket_file.write_text(secrets.token_urlsafe(12) + "\n")
    state = libvirt_lab.up(libvirt_lab_dir, tls=True, ticket_file=ticket_file, ticket_valid_s=3600)
    endpoint = libvirt_lab.spice_endpoint(state, "A")
    assert endpoint is not None
    options = libvirt_tls.client_options(
        state, "A", endpoint.address, endpoint.port, endpoint.tls_port
    )
    async with netns_witness(options, state.client.netns) as witness:
        cid = witness.session_id
        libvirt_ticket.set_ticket(state, "A", -60)  # expired; the linked client is kept
        ours = lab_request(state, "A", "B", witness_one_way_ms=witness.one_way_ms)
        with pytest.raises(PreflightError, match="the SPICE ticket expired"):
            await migrate_libvirt(ours, witness)
        assert libvirt_lab.status(libvirt_lab_dir).active_host == "A"
        assert witness.session_id == cid
        plain = lab_request(state, "A", "B", plain=True, witness_one_way_ms=witness.one_way_ms)
        report = await migrate_libvirt(plain, witness)
    assert report.migration.status == "completed", report.notes
    assert report.outcome != "seamless", report.notes
    assert for_report(report) is not ExitCode.OK
    [client] = report.clients
    assert client.record is not None
    assert client.record.error is not None
    assert "denied" in client.record.error.lower(), client.record.error
