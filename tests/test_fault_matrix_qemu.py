"""The fault matrix on the QEMU path: two real QEMUs, the embedded client, faults injected.

Each test breaks a migration at an observed moment -- the CLI interrupted by SIGINT or
SIGTERM in each phase, the destination QEMU killed, the source QMP socket dropped -- and
then asks both QEMUs: the guest runs on exactly one, no migration job is left on the
source, its max-bandwidth is what it was before, the client is attached where the guest
runs, and the exit code or the report's placement says the same.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.evidence import MAIN, sessions_from_query_spice
from spice_libvirt.migration.progress import MigrationProgress
from spice_libvirt.migration.report import MigrationReport
from spice_libvirt.qemu.controller import migrate_qemu
from spice_libvirt.qemu.qmp import QMPConnection
from spice_libvirt.qemu.request import MigrationRequest
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_process import QemuGroup, QemuInstance
from tests import faults
from tests.qmp_proxy import QmpRelay

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("require_kvm")]

#: slow enough that the transfer of the firmware guest is still running when we strike
SLOW_BYTES_PER_S = 50_000
BUSY = ("setup", "active", "pre-switchover", "device", "cancelling")


async def _facts(inst: QemuInstance) -> tuple[str, str, int] | None:
    """(status, migration status, max-bandwidth) of a QEMU; None if it is gone."""
    if not inst.is_running():
        return None
    async with QMPConnection.open(inst.qmp_path, timeout=5) as qmp:
        status = str((await qmp.execute("query-status"))["status"])
        migration = str((await qmp.execute("query-migrate")).get("status", "none"))
        bandwidth = int((await qmp.execute("query-migrate-parameters"))["max-bandwidth"])
    return status, migration, bandwidth


async def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    return await asyncio.to_thread(faults.wait_for, condition, timeout)


async def _left_clean(src: QemuInstance, dst: QemuInstance, bandwidth: int) -> str:
    """The invariants after a fault; which end runs the guest."""
    # a cut-off destination exits on its own: wait for the ends to settle
    for _ in range(2):
        s, d = await _facts(src), await _facts(dst)
        running = [n for n, f in (("source", s), ("destination", d)) if f and f[0] == "running"]
        if len(running) == 1 and (d is None or d[0] != "inmigrate" or running == ["source"]):
            break
        await _wait(lambda: not dst.is_running(), 15)
    assert len(running) == 1, (s, d)
    assert s is None or s[1] not in BUSY, s
    if running == ["source"]:
        assert s is not None
        assert s[2] == bandwidth, s
    return running[0]


def _migration_stream_open(port: int) -> bool:
    """An established TCP connection to the incoming migration port (the transfer runs)."""
    hexport = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and (fields[1].endswith(hexport) or fields[2].endswith(hexport)):
                return True
    return False


def _stream_came_and_went(port: int) -> Callable[[], bool]:
    seen = [False]

    def check() -> bool:
        open_now = _migration_stream_open(port)
        seen[0] = seen[0] or open_now
        return seen[0] and not open_now

    return check


async def _attached(inst: QemuInstance, session_id: int) -> bool:
    """The QEMU that runs the guest shows our client's session with its main channel."""
    async with QMPConnection.open(inst.qmp_path, timeout=5) as qmp:
        sessions = sessions_from_query_spice(await qmp.execute("query-spice"))
    return session_id in sessions and MAIN in sessions[session_id].channels


async def _pair(qemu_factory: QemuGroup) -> tuple[QemuInstance, QemuInstance, int]:
    port = free_tcp_port()
    src = await qemu_factory("src")
    dst = await qemu_factory("dst", incoming=f"tcp:127.0.0.1:{port}")
    return src, dst, port


def _cli(src: QemuInstance, dst: QemuInstance, port: int, *extra: str) -> list[str]:
    return [
        "migrate",
        "--qmp-src",
        str(src.qmp_path),
        "--qmp-dst",
        str(dst.qmp_path),
        "--migrate-uri",
        f"tcp:127.0.0.1:{port}",
        "--client-host",
        "127.0.0.1",
        "--json",
        *extra,
    ]


PHASES = ["preflight", "link-wait", "migrating", "verdict"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_cli_interrupted_in_each_phase(qemu_factory: QemuGroup, phase: str, sig: int) -> None:
    src, dst, port = await _pair(qemu_factory)
    before = await _facts(src)
    assert before is not None
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect(timeout=10)
    try:
        migrations = client.migration_count
        extra: list[str] = ["--client-port", str(dst.spice_port)]
        when: Callable[[], bool] | None = None
        if phase == "link-wait":  # sent to a port nobody listens on: it never links
            extra = ["--client-port", str(free_tcp_port()), "--link-timeout", "60"]
            when = lambda: client.migration_count > migrations  # noqa: E731
        elif phase == "migrating":
            extra += ["--max-bandwidth", str(SLOW_BYTES_PER_S)]
            when = lambda: _migration_stream_open(port)  # noqa: E731
        elif phase == "verdict":  # the stream came and went: the transfer is over
            when = _stream_came_and_went(port)
        run = await asyncio.to_thread(
            faults.run_cli_interrupted, _cli(src, dst, port, *extra), when, sig
        )
        s_after, d_after = await _facts(src), await _facts(dst)
        faults.record_row(
            path="qemu",
            scenario=f"{signal.Signals(sig).name} in {phase}",
            exit_code=run.returncode,
            signal_to_exit_s=run.exit_after_signal_s,
            source=s_after,
            destination=d_after,
            bandwidth_before=before[2],
        )
        interrupted = ExitCode.INTERRUPTED if sig == signal.SIGINT else ExitCode.TERMINATED
        if phase == "verdict" and run.returncode == ExitCode.OK:
            pass  # the run ended before the signal could land: fine, and checked below
        else:
            assert run.returncode == interrupted, run.stderr
        if phase in ("link-wait", "migrating"):
            assert run.signalled_after_s is not None
            assert "the guest runs on: source" in run.stderr, run.stderr
        where = await _left_clean(src, dst, before[2])
        assert where == ("destination" if phase == "verdict" else "source")
        assert await _attached(dst if where == "destination" else src, client.session_id)
    finally:
        await client.close()


class _Active:
    """A progress reporter that says when the transfer is under way."""

    def __init__(self) -> None:
        self.active = asyncio.Event()

    def phase(self, name: str, detail: str = "") -> None:
        return None

    def update(self, progress: MigrationProgress) -> None:
        if progress.status == "active":
            self.active.set()

    def close(self) -> None:
        return None


async def _transferring(
    request: MigrationRequest, client: SpiceClient
) -> asyncio.Task[MigrationReport]:
    """The migration of ``request`` running in a task, returned once the transfer is under way."""
    active = _Active()
    task = asyncio.create_task(migrate_qemu(request, client, active))
    async with asyncio.timeout(30):
        await active.active.wait()
    return task


def _request(src: Path, dst: QemuInstance, port: int, **fields: object) -> MigrationRequest:
    values: dict[str, object] = {
        "source_qmp": str(src),
        "destination_qmp": str(dst.qmp_path),
        "migrate_uri": f"tcp:127.0.0.1:{port}",
        "client_host": "127.0.0.1",
        "client_port": dst.spice_port,
        "settle": 0.5,
    }
    values.update(fields)
    return MigrationRequest.model_validate(values)


async def test_destination_killed_mid_migration_is_placed_on_the_source(
    qemu_factory: QemuGroup,
) -> None:
    src, dst, port = await _pair(qemu_factory)
    before = await _facts(src)
    assert before is not None
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect(timeout=10)
    try:
        request = _request(
            src.qmp_path, dst, port, source_pid=src.pid, max_bandwidth=SLOW_BYTES_PER_S
        )
        task = await _transferring(request, client)
        os.kill(dst.pid, signal.SIGKILL)
        async with asyncio.timeout(90):
            report = await task
        faults.record_row(
            path="qemu",
            scenario="destination QEMU killed mid-transfer",
            placement=report.placement,
            evidence=report.placement_evidence,
            exit_code=int(for_report(report)),
            source=await _facts(src),
            bandwidth_before=before[2],
        )
        assert report.placement == "source", report.placement_evidence
        assert report.placement_evidence is not None
        assert "destination absent" in report.placement_evidence
        assert for_report(report) is ExitCode.MIGRATION_FAILED
        assert await _left_clean(src, dst, before[2]) == "source"
        assert await _attached(src, client.session_id)
    finally:
        await client.close()


@pytest.mark.parametrize("relay_survives", [True, False], ids=["reconnect", "no-reconnect"])
async def test_source_qmp_dropped_mid_migration(
    qemu_factory: QemuGroup, lab_dir: Path, relay_survives: bool
) -> None:
    """QEMU migrates on without its QMP client: never reported "still on the source"
    without asking. With the socket back, the controller reconnects and follows the
    migration to its end; without, the destination's word decides, or the placement is
    reported unknown (exit code 12)."""
    src, dst, port = await _pair(qemu_factory)
    relay = QmpRelay(lab_dir / "relay.qmp", src.qmp_path)
    await relay.start()
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect(timeout=10)
    try:
        # slow, yet short enough to finish within the controller's placement bound
        request = _request(relay.path, dst, port, source_pid=src.pid, max_bandwidth=2_000_000)
        task = await _transferring(request, client)
        if relay_survives:
            relay.cut()
        else:
            await relay.close()
        async with asyncio.timeout(120):
            report = await task
        notes = "\n".join(report.notes)
        faults.record_row(
            path="qemu",
            scenario="source QMP dropped mid-transfer"
            + (" (reconnected)" if relay_survives else " (socket gone)"),
            placement=report.placement,
            evidence=report.placement_evidence,
            outcome=report.outcome,
            exit_code=int(for_report(report)),
            destination=await _facts(dst),
        )
        if relay_survives:
            assert "reconnected" in notes, notes
            assert relay.accepted >= 2
        assert report.placement in ("destination", "unknown"), report.placement_evidence
        if report.placement == "destination":
            assert report.migration.status == "completed"
            assert for_report(report) in (ExitCode.OK, ExitCode.NOT_SEAMLESS)
        else:
            assert for_report(report) is ExitCode.PLACEMENT_UNKNOWN
        # whatever the controller saw, the truth: the guest runs on the destination
        d = await _facts(dst)
        assert d is not None
        assert d[0] == "running"
        s = await _facts(src)
        assert s is None or s[0] != "running"
    finally:
        await relay.close()
        await client.close()


@pytest.mark.parametrize("require_seamless", [False, True], ids=["default", "require-seamless"])
async def test_client_cannot_reach_the_destination(
    qemu_factory: QemuGroup, require_seamless: bool
) -> None:
    """The client's path to the destination is blocked (told a port nobody listens on):
    by default the migration proceeds and the verdict says the client did not follow
    seamlessly; with ``--require-seamless`` nothing moves and nothing is left changed."""
    src, dst, port = await _pair(qemu_factory)
    before = await _facts(src)
    assert before is not None
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect(timeout=10)
    try:
        request = _request(
            src.qmp_path,
            dst,
            port,
            source_pid=src.pid,
            client_port=free_tcp_port(),
            link_timeout=2.0,
            require_seamless=require_seamless,
            max_bandwidth=500_000_000,
        )
        report = await migrate_qemu(request, client)
        code = for_report(report)
        faults.record_row(
            path="qemu",
            scenario="client blocked, " + ("--require-seamless" if require_seamless else "default"),
            outcome=report.outcome,
            exit_code=int(code),
            placement=report.placement,
            source=await _facts(src),
            bandwidth_before=before[2],
        )
        assert not report.seamless
        if require_seamless:
            assert report.outcome == "cancelled"
            assert code is ExitCode.MIGRATION_FAILED
            assert await _left_clean(src, dst, before[2]) == "source"
            assert await _attached(src, client.session_id)
        else:
            assert report.migration.status == "completed"
            # sent where nothing listens, the client cannot follow: the session is lost
            assert report.outcome in ("switch-host", "client-lost"), report.notes
            assert code in (ExitCode.NOT_SEAMLESS, ExitCode.CLIENT_LOST)
            assert report.placement == "destination"
            assert await _left_clean(src, dst, before[2]) == "destination"
    finally:
        await client.close()


async def test_embedded_client_killed_mid_handover(qemu_factory: QemuGroup) -> None:
    """Our client dies right after the server told it to migrate: the VM still moves
    (nothing waits forever for a dead client) and the report says the client was lost.

    Seen once in a fresh-clone run on a loaded machine: the *destination* QEMU died as the
    client vanished mid pre-link (spice-server 0.15 is known to crash when a client leaves
    before its channel clients exist: README). Then the migration fails and the VM must be
    on the source, reported as such: that is the invariant, whichever way the server went."""
    src, dst, port = await _pair(qemu_factory)
    before = await _facts(src)
    assert before is not None
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect(timeout=10)
    migrations = client.migration_count
    session = client.session_id

    async def kill_on_begin() -> None:
        await _wait(lambda: client.migration_count > migrations, 30)
        await client.close()

    killer = asyncio.create_task(kill_on_begin())
    try:
        request = _request(src.qmp_path, dst, port, source_pid=src.pid, link_timeout=5.0)
        report = await migrate_qemu(request, client)
        await killer
        faults.record_row(
            path="qemu",
            scenario="embedded client killed mid-handover",
            outcome=report.outcome,
            exit_code=int(for_report(report)),
            placement=report.placement,
        )
        assert not report.seamless
        (verdict,) = report.clients
        if report.migration.status != "completed":
            assert not dst.is_running(), "failed although the destination lives"
            assert report.placement == "source", report.notes
            assert for_report(report) is ExitCode.MIGRATION_FAILED
            assert await _left_clean(src, dst, before[2]) == "source"
            return
        assert report.placement == "destination"
        assert verdict.path in ("failed", "none"), verdict
        assert for_report(report) is ExitCode.NOT_SEAMLESS
        assert not await _attached(dst, session)
    finally:
        killer.cancel()
        await client.close()


async def test_link_between_the_hosts_cut_mid_transfer(qemu_factory: QemuGroup) -> None:
    """The migration stream is reset mid-transfer (``ss -K``): the source runs on, the
    destination gives up, the report places the guest on the source."""
    if shutil.which("ss") is None:
        pytest.fail("ss (iproute2) is needed to cut the stream")
    src, dst, port = await _pair(qemu_factory)
    before = await _facts(src)
    assert before is not None
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port))
    await client.connect(timeout=10)
    try:
        request = _request(
            src.qmp_path, dst, port, source_pid=src.pid, max_bandwidth=SLOW_BYTES_PER_S
        )
        task = await _transferring(request, client)
        assert await _wait(lambda: _migration_stream_open(port), 30)
        cut = await asyncio.create_subprocess_exec(
            *["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"],
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await cut.wait() == 0
        async with asyncio.timeout(120):
            report = await task
        faults.record_row(
            path="qemu",
            scenario="link between the hosts cut mid-transfer",
            outcome=report.outcome,
            exit_code=int(for_report(report)),
            placement=report.placement,
            source=await _facts(src),
            bandwidth_before=before[2],
        )
        assert report.migration.status in ("failed", "cancelled"), report.notes
        assert report.placement == "source", report.placement_evidence
        assert for_report(report) is ExitCode.MIGRATION_FAILED
        assert await _left_clean(src, dst, before[2]) == "source"
        assert await _attached(src, client.session_id)
    finally:
        await client.close()
