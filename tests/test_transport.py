"""What travels encrypted, for real: the guest's memory over TLS (``VIR_MIGRATE_TLS``), and
the agent's destination connections read-only.

One TLS libvirt lab for the module (``lab up --libvirt --tls``: SPICE TLS
and migration TLS on both hosts, as a manager sets them up). The oracle for "encrypted" is
the wire itself: the migration stream captured by ``tshark`` inside the destination's
network namespace starts with a TLS handshake and never shows the guest's memory (the
firmware guest's RAM holds SeaBIOS's banner), while a migration with ``--no-migrate-tls``
on the same capture does show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt.agent.watch import Destination
from spice_libvirt.errors import LibvirtError
from spice_libvirt.host import procnet
from spice_libvirt_lab import libvirt_agent, netns
from spice_libvirt_lab.libvirt_lab import LabState
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from spice_libvirt_lab.libvirt_status import where
from tests.rigs.libvirt_lab import lab_marks

TSHARK = shutil.which("tshark") or "/usr/bin/tshark"
#: libvirt's default range for incoming migration streams (qemu.conf migration_port_min/max)
MIGRATION_PORTS = "49152-49215"
#: in the firmware guest's RAM (SeaBIOS's banner): what a clear-text stream shows
MEMORY_MARK = b"SeaBIOS"

pytestmark = lab_marks(tls=True, client_rtt_ms=50)


@pytest.fixture(scope="module")
def lab(shared_lab: LabState) -> LabState:
    return shared_lab


@contextlib.contextmanager
def capture(lab: LabState, host: str, out: Path) -> Iterator[None]:
    """``tshark`` on ``host``'s lab interface, migration ports only, while the block runs."""
    argv = ["ip", "netns", "exec", lab.hosts[host].config.netns, TSHARK, "-q", "-i", "eth0",
            "-f", f"tcp portrange {MIGRATION_PORTS}", "-w", str(out)]  # fmt: skip
    log = out.with_suffix(".log")
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while b"Capturing on" not in log.read_bytes() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert b"Capturing on" in log.read_bytes(), log.read_text()
        yield
    finally:
        time.sleep(0.5)  # the last segments
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # our own session: tshark and its dumpcap
        proc.wait(timeout=20)


def stream_to_destination(pcap: Path) -> bytes:
    """The payload the source sent to the destination's migration port, in order."""
    done = subprocess.run(
        [TSHARK, "-r", str(pcap), "-T", "fields", "-e", "tcp.dstport", "-e", "tcp.payload",
         "-Y", "tcp.dstport >= 49152 and tcp.dstport <= 49215 and tcp.len > 0"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    data = b""
    for line in done.stdout.splitlines():
        _port, _, payload = line.partition("\t")
        data += bytes.fromhex(payload.replace(":", ""))
    return data


def test_the_guests_memory_moves_over_tls_and_in_clear_text_only_when_declined(
    lab: LabState, tmp_path: Path
) -> None:
    src = where(lab)
    dst = "B" if src == "A" else "A"
    with capture(lab, dst, tmp_path / "tls.pcap"):
        report = lab_migrate(lab.lab_dir)
    assert report.migration.status == "completed", report.notes
    assert report.migration_tls is True
    assert any("guest memory encrypted: VIR_MIGRATE_TLS" in n for n in report.notes)
    assert report.outcome == "seamless", report.notes  # SPICE on TLS, seamless as before
    encrypted = stream_to_destination(tmp_path / "tls.pcap")
    assert len(encrypted) > 100_000  # the firmware guest's ~1 MB of non-zero RAM, and more
    assert encrypted[:3] in (b"\x16\x03\x01", b"\x16\x03\x03"), encrypted[:16]  # ClientHello
    assert MEMORY_MARK not in encrypted

    with capture(lab, src, tmp_path / "clear.pcap"):
        back = lab_migrate(lab.lab_dir, options={"migrate_tls": False})
    assert back.migration.status == "completed", back.notes
    assert back.migration_tls is False
    assert any("clear text" in n and "--no-migrate-tls" in n for n in back.notes)
    assert MEMORY_MARK in stream_to_destination(tmp_path / "clear.pcap")


def test_the_agents_destination_connection_is_read_only(lab: LabState) -> None:
    """It gets the graphics events, and libvirtd refuses it any change."""
    host = where(lab)

    async def attempt() -> None:
        dest = await Destination.open(lab.hosts[host].uri_unix, 10.0)
        try:
            dom = await dest.conn.lookup(lab.domain)
            with pytest.raises(LibvirtError, match="read only access"):
                await dest.conn.call(lambda: dom.migrateSetMaxSpeed(5, 0), "set speed")
            assert dest.alive
        finally:
            await dest.close()

    asyncio.run(attempt())
    assert netns.list_names()  # the lab is still up


def test_the_agent_listens_on_nothing_but_its_metrics(lab: LabState) -> None:
    """The agent runs as root on every hypervisor: it connects out (its libvirtd, its
    peers), and opens no listening socket, TCP or UDP, besides its metrics endpoint
    (``tests/test_agent_metrics.py`` places and stops that one)."""
    host = where(lab)
    agent = libvirt_agent.start_agent(lab, host)
    try:
        sockets = procnet.snapshot(agent.pid)
        assert sockets.sockets, "the agent holds no TCP socket at all (its peer connection?)"
        metrics = libvirt_agent.metrics_address(lab, host)
        assert metrics is not None
        assert sockets.listening_ports == {int(metrics.rsplit(":", 1)[1])}
        udp = [Path(f"/proc/{agent.pid}/net/{t}") for t in ("udp", "udp6")]
        inodes = {
            int(fd.readlink().name[8:-1])
            for fd in Path(f"/proc/{agent.pid}/fd").iterdir()
            if fd.readlink().name.startswith("socket:[")
        }
        bound = [
            row for path in udp for row in path.read_text().splitlines()[1:]
            if int(row.split()[9]) in inodes
        ]  # fmt: skip
        assert bound == []
    finally:
        netns.terminate([agent], timeout=15.0)
