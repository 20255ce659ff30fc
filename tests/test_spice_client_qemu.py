"""The embedded client and the probe CLI against real QEMU (KVM for the firmware guest).

Three server set-ups (no ticket, a ticket set through QMP ``set_password``, TLS with
certificates the suite generates) plus a ``spiceport`` chardev; then every migration path
the client must follow, with spice-server choosing the path for real.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from spice_libvirt.errors import AuthenticationError, LinkError, TLSVerificationError
from spice_libvirt.migration.evidence import unsigned_connection_id
from spice_libvirt.spice.actions import StartPrelinks
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.stream import parse_record
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_process import QemuGroup, QemuInstance
from spice_libvirt_lab.tls import TlsMaterial

pytestmark = pytest.mark.qemu

CHANNELS = ["main:0", "display:0", "inputs:0", "cursor:0", "port:0"]
CLI = [sys.executable, "-m", "spice_libvirt.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def test_probe_plain_lists_every_channel(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("plain")
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=vm.spice_port))
    await client.connect()
    try:
        assert client.channels == CHANNELS
        assert client.session_id != 0
        assert client.name == "plain"
        spice = await vm.execute("query-spice")
        ids = {unsigned_connection_id(c["connection-id"]) for c in spice["channels"]}
        assert ids == {client.session_id}
    finally:
        await client.close()
    result = run_cli("probe", "--json", f"spice://127.0.0.1:{vm.spice_port}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [c["type"] for c in report["channels"]] == [
        "main",
        "display",
        "inputs",
        "cursor",
        "port",
    ]
    assert report["server_caps"]["main"] == [
        "SEMI_SEAMLESS_MIGRATE",
        "NAME_AND_UUID",
        "AGENT_CONNECTED_TOKENS",
        "SEAMLESS_MIGRATE",
    ]


async def test_ticket_set_through_qmp(qemu_factory: QemuGroup, tmp_path: Path) -> None:
    vm = await qemu_factory("ticket", password="right-one")
    good = SpiceClient(
        ClientOptions(host="127.0.0.1", port=vm.spice_port, ticket=SecretStr("right-one"))
    )
    await good.connect()
    assert len(good.channels) == 5
    await good.close()
    bad = SpiceClient(
        ClientOptions(host="127.0.0.1", port=vm.spice_port, ticket=SecretStr("hunter2-bad"))
    )
    with pytest.raises(AuthenticationError, match="permission denied"):
        await bad.connect()
    # the CLI: ticket from a file and from the environment, never echoed
    ticket_file = tmp_path / "ticket"
    ticket_file.write_text("hunter2-bad\n")
    result = run_cli(
        "probe", f"spice://127.0.0.1:{vm.spice_port}", "--ticket-file", str(ticket_file)
    )
    assert result.returncode == 4
    assert "permission denied" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2-bad" not in result.stderr + result.stdout
    result = run_cli(
        "probe", f"spice://127.0.0.1:{vm.spice_port}", env={"SPICE_LIBVIRT_TICKET": "right-one"}
    )
    assert result.returncode == 0, result.stderr
    assert "right-one" not in result.stdout + result.stderr


async def test_tls_port_with_subject_and_hostname_checks(
    qemu_factory: QemuGroup, tls_material: TlsMaterial
) -> None:
    vm = await qemu_factory("tls", tls_dir=tls_material.directory, spice_tls_port=free_tcp_port())
    assert vm.spice_tls_port is not None
    uri = f"spice://127.0.0.1:{vm.spice_port}?tls-port={vm.spice_tls_port}"
    ok = run_cli("probe", "--json", "--tls", uri, "--ca-file", str(tls_material.ca_cert))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tls"] is True
    ok = run_cli(
        "probe",
        "--json",
        "--tls",
        uri,
        "--ca-file",
        str(tls_material.ca_cert),
        "--host-subject",
        tls_material.subject,
    )
    assert ok.returncode == 0, ok.stderr
    wrong = run_cli(
        "probe",
        "--tls",
        uri,
        "--ca-file",
        str(tls_material.ca_cert),
        "--host-subject",
        "C=XX,O=Nope,CN=other",
    )
    assert wrong.returncode == 6
    assert "TLS verification" in wrong.stderr
    # no CA given: the system store does not know our lab CA
    client = SpiceClient(ClientOptions(host="127.0.0.1", tls_port=vm.spice_tls_port))
    with pytest.raises(TLSVerificationError):
        await client.connect()


async def test_need_secured_retries_on_tls_port(
    qemu_factory: QemuGroup, tls_material: TlsMaterial
) -> None:
    # a second -spice merges into the first: every channel must use TLS, so the plain port
    # answers NEED_SECURED: a plain-only client is told to add a tls-port; a client given
    # one links over TLS from the start (the plain port is never tried first)
    vm = await qemu_factory(
        "secured",
        tls_dir=tls_material.directory,
        spice_tls_port=free_tcp_port(),
        extra_args=["-spice", "tls-channel=default"],
    )
    plain_only = SpiceClient(ClientOptions(host="127.0.0.1", port=vm.spice_port))
    with pytest.raises(LinkError, match="requires TLS"):
        await plain_only.connect()
    client = SpiceClient(
        ClientOptions(
            host="127.0.0.1",
            port=vm.spice_port,
            tls_port=vm.spice_tls_port,
            ca_file=tls_material.ca_cert,
        )
    )
    await client.connect()
    try:
        assert client.channels == CHANNELS
        assert client.tls_in_use
    finally:
        await client.close()


async def test_cli_errors_are_one_line(qemu_factory: QemuGroup) -> None:
    port = free_tcp_port()
    result = run_cli("probe", f"spice://127.0.0.1:{port}")
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1
    assert "cannot connect" in result.stderr
    vm = await qemu_factory("notspice")
    # QMP is not SPICE: point the probe at a non-SPICE TCP service (a tiny HTTP-ish server)
    server = await asyncio.start_server(_http_like, "127.0.0.1", 0)
    try:
        other = server.sockets[0].getsockname()[1]
        result = await asyncio.to_thread(run_cli, "probe", f"spice://127.0.0.1:{other}")
        assert result.returncode == 5
        assert "not a SPICE server" in result.stderr
    finally:
        server.close()
    assert vm.is_running()
    result = run_cli("probe", "vnc://127.0.0.1:5900")
    assert result.returncode == 2


async def _http_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(100)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


# ------------------------------------------------------------------------ migration paths


async def _pair(
    vms: QemuGroup, *, seamless_migration: bool = True
) -> tuple[QemuInstance, QemuInstance, str]:
    src = await vms("src", seamless_migration=seamless_migration)
    mig_port = free_tcp_port()
    dst = await vms("dst", incoming=f"tcp:127.0.0.1:{mig_port}")
    return src, dst, f"tcp:127.0.0.1:{mig_port}"


async def _migrate(
    src: QemuInstance, dst: QemuInstance, uri: str, client: SpiceClient, *, wait: bool
) -> None:
    mark = client.migration_count
    async with src.qmp() as q:
        await q.execute(
            "client_migrate_info",
            {"protocol": "spice", "hostname": "127.0.0.1", "port": dst.spice_port},
        )
        if wait:
            await client.wait_migration_connected(10, after=mark)
        await q.execute("migrate", {"uri": uri})


async def test_seamless_keeps_connection_id_and_forwards_migrate_data(
    qemu_factory: QemuGroup, require_kvm: None
) -> None:
    src, dst, uri = await _pair(qemu_factory)
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect()
    try:
        before = client.session_id
        await _migrate(src, dst, uri, client, wait=True)
        record = await client.next_migration(15)
        assert record.path == "seamless"
        assert record.connection_id_kept
        assert record.connection_id_after == before
        assert record.channels_after == record.channels_before
        names = [(s.side, s.direction, s.message) for s in record.steps]
        assert names[0] == ("src", "rx", "MIGRATE_BEGIN_SEAMLESS")
        assert ("dst", "tx", "MIGRATE_DST_DO_SEAMLESS") in names
        assert ("dst", "rx", "MIGRATE_DST_SEAMLESS_ACK") in names
        assert ("src", "tx", "MIGRATE_CONNECTED_SEAMLESS") in names
        forwarded = [s for s in record.steps if s.message == "MIGRATE_DATA" and s.side == "dst"]
        assert {s.channel for s in forwarded} == {"main:0", "display:0", "inputs:0", "port:0"}
        received = {
            s.channel: s.detail
            for s in record.steps
            if s.message == "MIGRATE_DATA" and s.side == "src"
        }
        assert received["main:0"].startswith("MNMD v1")
        assert received["display:0"].startswith("DCMD v1")
        assert set(record.blackout_ms) == set(CHANNELS)
        dst_spice = await dst.execute("query-spice")
        assert {unsigned_connection_id(c["connection-id"]) for c in dst_spice["channels"]} == {
            before
        }
        # the session is alive on the destination
        await asyncio.sleep(0.3)
        assert client.failure is None
    finally:
        await client.close()


class LateFollower(SpiceClient):
    """A client that starts its destination links late, like one far away from the hosts.

    The race is real (spice-server decides at the end of the migration), but who wins it on
    loopback varies from run to run; delaying the pre-link makes the client lose it every time.
    """

    async def _migration_connect(self, mig: Any, start: StartPrelinks) -> None:
        await asyncio.sleep(0.5)
        await super()._migration_connect(mig, start)


async def test_losing_the_race_falls_back_to_switch_host(
    qemu_factory: QemuGroup, require_kvm: None
) -> None:
    src, dst, uri = await _pair(qemu_factory)
    client = LateFollower(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect()
    try:
        before = client.session_id
        await _migrate(src, dst, uri, client, wait=False)
        record = await client.next_migration(15)
        assert record.path == "switch-host", record.steps
        assert not record.connection_id_kept
        assert record.connection_id_after not in (None, before)
        assert "MIGRATE_SWITCH_HOST" in [s.message for s in record.steps]
        assert len(client.channels) == 5
        # the destination really has a new session: QMP agrees with the client
        spice = await dst.execute("query-spice")
        assert {unsigned_connection_id(c["connection-id"]) for c in spice["channels"]} == {
            client.session_id
        }
    finally:
        await client.close()


async def test_semi_seamless_when_source_lacks_seamless_option(qemu_factory: QemuGroup) -> None:
    src, dst, uri = await _pair(qemu_factory, seamless_migration=False)
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect()
    try:
        await _migrate(src, dst, uri, client, wait=True)
        record = await client.next_migration(15)
        assert record.path == "semi-seamless"
        messages = [s.message for s in record.steps]
        assert messages[0] == "MIGRATE_BEGIN"
        assert "MIGRATE_END" in messages
        assert "INIT" in messages
        assert len(client.channels) == 5
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        ({"seamless": False}, "semi-seamless"),
        ({"seamless": False, "semi_seamless": False}, "switch-host"),
    ],
)
async def test_old_client_caps_are_reported_truthfully(
    qemu_factory: QemuGroup, caps: dict[str, bool], expected: str
) -> None:
    src, dst, uri = await _pair(qemu_factory)
    client = SpiceClient(
        ClientOptions(
            host="127.0.0.1",
            port=src.spice_port,
            seamless=caps.get("seamless", True),
            semi_seamless=caps.get("semi_seamless", True),
        )
    )
    await client.connect()
    try:
        await _migrate(src, dst, uri, client, wait=expected != "switch-host")
        record = await client.next_migration(15)
        assert record.path == expected
    finally:
        await client.close()


async def test_cancel_keeps_the_client_on_the_source(qemu_factory: QemuGroup) -> None:
    src, dst, uri = await _pair(qemu_factory)
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect()
    try:
        before = client.session_id
        mark = client.migration_count
        async with src.qmp() as q:
            await q.execute(
                "client_migrate_info",
                {"protocol": "spice", "hostname": "127.0.0.1", "port": dst.spice_port},
            )
            await client.wait_migration_connected(10, after=mark)
            await q.execute("migrate-set-parameters", {"max-bandwidth": 4096})
            await q.execute("migrate", {"uri": uri})
            await asyncio.sleep(0.3)
            await q.execute("migrate_cancel")
        record = await client.next_migration(15)
        assert record.path == "cancelled"
        assert client.session_id == before
        assert len(client.channels) == 5
        assert (await src.execute("query-status"))["status"] == "running"
    finally:
        await client.close()


async def test_port_stream_and_events_from_the_linux_guest(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("linux", guest="linux", memory_mib=256)
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=vm.spice_port))
    events: list[str] = []

    async def collect() -> None:
        async for event in client.events():
            events.append(event.kind)

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0)  # subscribe before connecting
    await client.connect()
    try:
        stream = await client.port_stream("org.spice-libvirt.stream")
        data = b""
        async with asyncio.timeout(60):  # the guest boots under TCG first
            while len(data) < 64:
                data += await stream.read()
        assert parse_record(data[:32]) is not None
        assert stream.opened.is_set()
        stats = client.stream_stats()
        assert stats.records >= 1
        assert stats.gaps == 0
        assert stats.duplicates == 0
    finally:
        await client.close()
        collector.cancel()
    assert "linked" in events
    assert "session-up" in events
    assert "port-init" in events


EXTRA_CHANNELS = [
    # usbredir: a USB redirection channel (spicevmc) on an xHCI controller
    "-device", "qemu-xhci,id=xhci0",
    "-chardev", "spicevmc,name=usbredir,id=usbredir0",
    "-device", "usb-redir,chardev=usbredir0,id=usbredir0dev,bus=xhci0.0",
    # webdav: a spiceport with the webdav name becomes a WEBDAV channel
    "-chardev", "spiceport,name=org.spice-space.webdav.0,id=webdav0",
    "-device", "virtserialport,bus=vser0.0,chardev=webdav0,name=org.spice-space.webdav.0",
    # playback and record: SPICE audio on an HDA codec
    "-audiodev", "spice,id=snd0",
    "-device", "ich9-intel-hda",
    "-device", "hda-duplex,audiodev=snd0",
]  # fmt: skip


async def test_usbredir_webdav_and_audio_channels_link_and_migrate_seamlessly(
    qemu_factory: QemuGroup, require_kvm: None
) -> None:
    src = await qemu_factory("src", extra_args=EXTRA_CHANNELS)
    port = free_tcp_port()
    dst = await qemu_factory("dst", incoming=f"tcp:127.0.0.1:{port}", extra_args=EXTRA_CHANNELS)
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect()
    try:
        assert {"usbredir:0", "webdav:0", "playback:0", "record:0"} <= set(client.channels)
        await _migrate(src, dst, f"tcp:127.0.0.1:{port}", client, wait=True)
        record = await client.next_migration(15)
        assert record.path == "seamless"
        assert record.channels_after == record.channels_before
        received = {
            s.channel: s.detail
            for s in record.steps
            if s.message == "MIGRATE_DATA" and s.side == "src"
        }
        assert received["usbredir:0"].startswith("SVMD v1")
        assert received["webdav:0"].startswith("SVMD v1")
        flags = {s.channel: s.detail for s in record.steps if s.message == "MIGRATE"}
        assert flags["playback:0"] == flags["record:0"] == "flags 0"  # no state to hand over
    finally:
        await client.close()
