"""The QMP migration controller, for real: two QEMUs, a real SPICE client, real migrations.

The firmware guest (SeaBIOS, KVM) migrates in tens of milliseconds, which is exactly the
race the controller exists for. Every verdict asserted here is checked against evidence
outside the controller too (the client's own session id, QEMU's state afterwards).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spice_libvirt import errors
from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.evidence import unsigned_connection_id
from spice_libvirt.migration.progress import MigrationProgress
from spice_libvirt.migration.witness import MigrationWitness
from spice_libvirt.qemu.controller import migrate_qemu
from spice_libvirt.qemu.qmp import QMPConnection
from spice_libvirt.qemu.request import MigrationRequest, parse_qmp_address
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.record import ClientMigrationRecord, StreamStats
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_process import QemuGroup, QemuInstance

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("require_kvm")]


@dataclass
class Pair:
    src: QemuInstance
    dst: QemuInstance
    migrate_port: int

    def request(self, **fields: object) -> MigrationRequest:
        values: dict[str, object] = {
            "source_qmp": str(self.src.qmp_path),
            "destination_qmp": str(self.dst.qmp_path),
            "migrate_uri": f"tcp:127.0.0.1:{self.migrate_port}",
            "client_host": "127.0.0.1",
            "client_port": self.dst.spice_port,
            "source_pid": self.src.pid,
            "settle": 0.5,
        }
        values.update(fields)
        return MigrationRequest.model_validate(values)


@pytest.fixture
async def pair(qemu_factory: QemuGroup) -> Pair:
    port = free_tcp_port()
    src = await qemu_factory("src")
    dst = await qemu_factory("dst", incoming=f"tcp:127.0.0.1:{port}")
    return Pair(src, dst, port)


@pytest.fixture
async def client(pair: Pair) -> AsyncIterator[SpiceClient]:
    c = SpiceClient(ClientOptions(host="127.0.0.1", port=pair.src.spice_port))
    await c.connect(timeout=10)
    try:
        yield c
    finally:
        await c.close()


async def qmp_status(inst: QemuInstance) -> tuple[str, str]:
    async with QMPConnection.open(inst.qmp_path, timeout=5) as qmp:
        status = (await qmp.execute("query-status"))["status"]
        migration = (await qmp.execute("query-migrate")).get("status", "none")
    return str(status), str(migration)


class ActiveSignal:
    """A progress reporter that lets a test act once the transfer is under way."""

    def __init__(self) -> None:
        self.active = asyncio.Event()
        self.samples: list[MigrationProgress] = []
        self.phases: list[str] = []

    def phase(self, name: str, detail: str = "") -> None:
        self.phases.append(name)

    def update(self, progress: MigrationProgress) -> None:
        self.samples.append(progress)
        if progress.status == "active":
            self.active.set()

    def close(self) -> None:
        return None


async def test_seamless_with_the_embedded_client(pair: Pair, client: SpiceClient) -> None:
    session = client.session_id
    report = await migrate_qemu(pair.request(), client)

    assert report.outcome == "seamless", report.model_dump_json(indent=1)
    assert report.seamless
    assert report.link_wait.result == "linked"
    assert report.link_wait.signal == "embedded-client"
    assert report.link_wait.duration_ms is not None
    assert report.link_wait.duration_ms > 0
    [verdict] = report.clients
    assert verdict.kind == "embedded"
    assert verdict.evidence == "client-record"
    assert verdict.connection_id_before == session
    assert verdict.connection_id_after == session
    assert verdict.connection_id_kept
    assert "main:0" in verdict.channels_after
    assert "display:0" in verdict.channels_after
    assert verdict.record is not None
    assert verdict.record.path == "seamless"
    messages = [s.message for s in verdict.record.steps]
    assert "MIGRATE_BEGIN_SEAMLESS" in messages
    assert "MIGRATE_DATA" in messages
    assert verdict.blackout_ms
    assert all(v >= 0 for v in verdict.blackout_ms.values())
    assert report.stream is not None
    assert report.stream.gaps == 0
    fig = report.migration
    assert fig.status == "completed"
    assert fig.total_time_ms
    assert fig.total_time_ms > 0
    assert fig.downtime_ms is not None
    assert fig.setup_time_ms is not None
    assert fig.transferred_bytes
    assert fig.passes
    assert fig.migrate_to_completed_ms
    assert report.spice_migrate_completed
    assert report.destination.status_after == "running"
    assert report.source.status_after == "postmigrate"
    # independent evidence: the client really is on the destination with its session
    assert client.session_id == session
    async with QMPConnection.open(pair.dst.qmp_path) as qmp:
        on_dst = (await qmp.execute("query-spice"))["channels"]
    assert {unsigned_connection_id(c["connection-id"]) for c in on_dst} == {session}
    assert for_report(report) is ExitCode.OK


async def test_seamless_from_qmp_alone_for_a_client_we_do_not_drive(
    pair: Pair, client: SpiceClient
) -> None:
    """The client is connected, but the controller only sees QMP (like remote-viewer)."""
    session = client.session_id
    report = await migrate_qemu(pair.request())
    assert report.outcome == "seamless", report.model_dump_json(indent=1)
    [verdict] = report.clients
    assert verdict.kind == "external"
    assert verdict.evidence == "qmp"
    assert verdict.connection_id_before == session == verdict.connection_id_after
    assert report.link_wait.signal == "qmp-destination"
    assert set(report.link_wait.channels_expected) <= set(report.link_wait.channels_linked)
    assert report.link_wait.grace_ms >= 250
    assert set(verdict.channels_before) == set(client.channels)
    # the verdict from events, ready within the settle bound (how soon: a benchmark figure)
    assert report.verdict_basis is not None
    assert "kept" in report.verdict_basis
    assert report.verdict_ready_ms is not None
    assert 0 <= report.verdict_ready_ms <= pair.request().settle * 1000 + 1000
    record = await client.next_migration(5)
    assert record.path == "seamless"


async def test_old_client_falls_back_to_switch_host_and_the_verdict_says_so(
    pair: Pair,
) -> None:
    """A client without the migration caps gets SWITCH_HOST: new session, new id."""
    options = ClientOptions(
        host="127.0.0.1", port=pair.src.spice_port, seamless=False, semi_seamless=False
    )
    async with SpiceClient(options) as old:
        before = old.session_id
        report = await migrate_qemu(pair.request(link_timeout=1.0), old)
        assert report.outcome == "switch-host", report.model_dump_json(indent=1)
        [verdict] = report.clients
        assert verdict.connection_id_before == before
        assert verdict.connection_id_after not in (None, before)
        assert not verdict.connection_id_kept
        assert report.link_wait.result == "timeout"
        assert for_report(report) is ExitCode.NOT_SEAMLESS
        assert old.session_id != before  # the client's own view agrees


async def test_old_client_switch_host_seen_from_qmp_alone(pair: Pair) -> None:
    options = ClientOptions(
        host="127.0.0.1", port=pair.src.spice_port, seamless=False, semi_seamless=False
    )
    async with SpiceClient(options) as old:
        before = old.session_id
        report = await migrate_qemu(pair.request(link_timeout=1.0))
        assert report.outcome == "switch-host", report.model_dump_json(indent=1)
        [verdict] = report.clients
        assert verdict.kind == "external"
        assert verdict.connection_id_after not in (None, before)
        assert report.verdict_basis == "a new connection id on the destination"
        # the old client reconnects on its own time (seconds on a loaded machine)
        for _ in range(400):
            if old.session_id == verdict.connection_id_after:
                break
            await asyncio.sleep(0.05)
        assert old.session_id == verdict.connection_id_after


async def test_require_seamless_aborts_before_migrate_when_the_client_cannot_link(
    pair: Pair, client: SpiceClient
) -> None:
    """The client is sent to a port nobody listens on: it never links; VM untouched."""
    session = client.session_id
    dead_port = free_tcp_port()
    request = pair.request(client_port=dead_port, require_seamless=True, link_timeout=3.0)
    report = await migrate_qemu(request, client)
    assert report.outcome == "cancelled", report.model_dump_json(indent=1)
    assert report.error_phase == "link-wait"
    assert report.link_wait.result in ("connect-error", "timeout")
    assert "migrate" not in [p.name for p in report.phases]
    assert for_report(report) is ExitCode.MIGRATION_FAILED
    assert report.placement == "source"
    assert await qmp_status(pair.src) == ("running", "none")
    assert (await qmp_status(pair.dst))[0] == "inmigrate"
    assert client.session_id == session
    assert client.port == pair.src.spice_port


async def test_require_seamless_timeout_from_qmp_alone(pair: Pair, client: SpiceClient) -> None:
    request = pair.request(client_port=free_tcp_port(), require_seamless=True, link_timeout=1.0)
    report = await migrate_qemu(request)
    assert report.outcome == "cancelled"
    assert report.link_wait.result == "timeout"
    assert report.link_wait.channels_linked == []
    assert await qmp_status(pair.src) == ("running", "none")


async def test_default_policy_proceeds_and_reports_when_the_client_is_late(
    pair: Pair, client: SpiceClient
) -> None:
    request = pair.request(client_port=free_tcp_port(), link_timeout=1.0)
    report = await migrate_qemu(request, client)
    assert report.migration.status == "completed"
    # sent where nothing listens, the client cannot follow: the VM moved, its session is gone
    assert report.outcome in ("switch-host", "client-lost"), report.model_dump_json(indent=1)
    assert any("link wait" in n for n in report.notes)


async def test_destination_killed_mid_migration(pair: Pair, client: SpiceClient) -> None:
    """Throttle the stream so it cannot finish, then kill the destination by PID."""
    session = client.session_id
    signal_ = ActiveSignal()
    task = asyncio.create_task(
        migrate_qemu(pair.request(max_bandwidth=50_000, completion_timeout=60), client, signal_)
    )
    await asyncio.wait_for(signal_.active.wait(), 20)
    os.kill(pair.dst.pid, signal.SIGKILL)
    report = await asyncio.wait_for(task, 60)
    assert report.outcome == "failed", report.model_dump_json(indent=1)
    assert report.migration.status == "failed"
    assert report.source.status_after == "running"
    assert report.source_resumed in (True, None)
    [verdict] = report.clients
    assert verdict.path == "failed"
    assert verdict.connection_id_kept
    assert verdict.connection_id_after == session
    assert for_report(report) is ExitCode.MIGRATION_FAILED
    # QMP still answers and the guest runs; the client stayed on the source
    assert (await qmp_status(pair.src))[0] == "running"
    assert client.session_id == session
    assert client.port == pair.src.spice_port
    assert "main:0" in client.channels


async def test_completion_timeout_cancels_and_resumes(pair: Pair, client: SpiceClient) -> None:
    signal_ = ActiveSignal()
    request = pair.request(max_bandwidth=20_000, completion_timeout=1.5)
    report = await migrate_qemu(request, client, signal_)
    assert report.outcome == "cancelled", report.model_dump_json(indent=1)
    assert report.migration.status == "cancelled"
    assert signal_.samples
    assert signal_.samples[-1].status in ("active", "cancelled", "cancelling")
    assert report.source.status_after == "running"
    assert await qmp_status(pair.src) == ("running", "cancelled")
    # QEMU ends an incoming migration that was cut off by exiting (load failed)
    for _ in range(100):
        if not pair.dst.is_running():
            break
        await asyncio.sleep(0.05)
    assert not pair.dst.is_running()
    assert "load of migration failed" in pair.dst.log_tail(20)
    record = report.clients[0].record
    assert record is not None, report.model_dump_json(indent=1)
    assert record.path == "cancelled", record


async def test_no_client_is_not_called_seamless(pair: Pair) -> None:
    report = await migrate_qemu(pair.request())
    assert report.outcome == "no-client"
    assert report.link_wait.result == "no-client"
    assert report.migration.status == "completed"
    assert for_report(report) is ExitCode.OK


async def test_preflight_refuses_a_destination_that_is_not_incoming(
    qemu_factory: QemuGroup,
) -> None:
    src = await qemu_factory("psrc")
    dst = await qemu_factory("pdst")  # running, not -incoming
    request = MigrationRequest(
        source_qmp=str(src.qmp_path),
        destination_qmp=str(dst.qmp_path),
        migrate_uri=f"tcp:127.0.0.1:{free_tcp_port()}",
        client_host="127.0.0.1",
        client_port=dst.spice_port,
    )
    with pytest.raises(errors.MigrationError) as info:
        await migrate_qemu(request)
    assert info.value.phase == "preflight"
    assert "inmigrate" in str(info.value)
    assert (await qmp_status(src)) == ("running", "none")


async def test_preflight_with_require_seamless_needs_the_seamless_option(
    qemu_factory: QemuGroup,
) -> None:
    port = free_tcp_port()
    src = await qemu_factory("nsrc", seamless_migration=False)
    dst = await qemu_factory("ndst", incoming=f"tcp:127.0.0.1:{port}")
    request = MigrationRequest(
        source_qmp=str(src.qmp_path),
        destination_qmp=str(dst.qmp_path),
        migrate_uri=f"tcp:127.0.0.1:{port}",
        client_host="127.0.0.1",
        client_port=dst.spice_port,
        require_seamless=True,
    )
    with pytest.raises(errors.MigrationError, match="seamless-migration=on"):
        await migrate_qemu(request)


async def test_semi_seamless_when_the_source_lacks_the_seamless_option(
    qemu_factory: QemuGroup,
) -> None:
    port = free_tcp_port()
    src = await qemu_factory("ssrc", seamless_migration=False)
    dst = await qemu_factory("sdst", incoming=f"tcp:127.0.0.1:{port}")
    async with SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port)) as c:
        request = MigrationRequest(
            source_qmp=str(src.qmp_path),
            destination_qmp=str(dst.qmp_path),
            migrate_uri=f"tcp:127.0.0.1:{port}",
            client_host="127.0.0.1",
            client_port=dst.spice_port,
            settle=0.5,
        )
        report = await migrate_qemu(request, c)
    assert report.outcome == "semi-seamless", report.model_dump_json(indent=1)
    assert for_report(report) is ExitCode.NOT_SEAMLESS


class SilentWitness:
    """The real client, except that it never hands over its migration record.

    Stands in for a client whose hand-over did not finish (seen for real once in ~15 runs:
    a source channel closed before its MIGRATE_DATA); the verdict must not call that
    seamless nor switch-host.
    """

    def __init__(self, inner: SpiceClient) -> None:
        self.inner = inner

    @property
    def session_id(self) -> int:
        return self.inner.session_id

    @property
    def channels(self) -> list[str]:
        return self.inner.channels

    @property
    def migration_count(self) -> int:
        return self.inner.migration_count

    async def wait_migration_connected(
        self, timeout: float, after: int | None = None
    ) -> float | None:
        return await self.inner.wait_migration_connected(timeout, after)

    async def next_migration(self, timeout: float) -> ClientMigrationRecord:
        await asyncio.sleep(timeout)
        raise TimeoutError

    def stream_stats(self) -> StreamStats:
        return self.inner.stream_stats()


async def test_a_client_that_never_finishes_is_not_called_seamless(
    pair: Pair, client: SpiceClient
) -> None:
    witness = SilentWitness(client)
    assert isinstance(witness, MigrationWitness)
    report = await migrate_qemu(pair.request(record_timeout=1.0), witness)
    assert report.migration.status == "completed"
    assert report.outcome == "failed"
    [verdict] = report.clients
    assert verdict.path == "failed"
    assert verdict.note is not None
    assert "did not finish" in verdict.note
    assert for_report(report) is ExitCode.NOT_SEAMLESS


def test_request_validation() -> None:
    with pytest.raises(ValueError, match="client_port or client_tls_port"):
        MigrationRequest(source_qmp="a", destination_qmp="b", migrate_uri="c", client_host="h")
    with pytest.raises(ValueError, match="out of range"):
        MigrationRequest(
            source_qmp="a", destination_qmp="b", migrate_uri="c", client_host="h", client_port=0
        )


def test_qmp_address_forms() -> None:
    assert parse_qmp_address("/run/x.qmp") == "/run/x.qmp"
    assert parse_qmp_address("unix:/run/x.qmp") == "/run/x.qmp"
    assert parse_qmp_address("127.0.0.1:4444") == ("127.0.0.1", 4444)
    assert parse_qmp_address("tcp:[::1]:4444") == ("::1", 4444)


async def test_cli_qmp_form_defaults_the_client_address_to_the_destination(
    pair: Pair, client: SpiceClient
) -> None:
    """``spice-libvirt migrate --qmp-src --qmp-dst --migrate-uri --json`` as a user runs it."""
    exe = Path(sys.executable).with_name("spice-libvirt")
    proc = await asyncio.create_subprocess_exec(
        str(exe),
        "migrate",
        "--qmp-src",
        str(pair.src.qmp_path),
        "--qmp-dst",
        str(pair.dst.qmp_path),
        "--migrate-uri",
        f"tcp:127.0.0.1:{pair.migrate_port}",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == ExitCode.OK, err.decode()
    report = json.loads(out)
    assert report["outcome"] == "seamless"
    assert report["client_target"] == f"127.0.0.1:{pair.dst.spice_port}"
    assert report["clients"][0]["connection_id_after"] == client.session_id


def test_cli_migrate_without_a_form_is_a_usage_error() -> None:
    exe = Path(sys.executable).with_name("spice-libvirt")
    done = subprocess.run(
        [str(exe), "migrate", "--json"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == ExitCode.USAGE
    assert "--qmp-src" in done.stderr
