"""A client on TLS stays on TLS through every migration of the QEMU lab, for real.

The oracle is not the verdict: after each migration ``query-spice`` on the side where the
VM now runs must show every channel of the client with ``"tls": true``. Two real clients:

* our embedded client, TLS only (the lab CA and the certificate subject), migrated back and
  forth three times; then once more with the plain port offered on purpose -- our client
  never takes it, and the verdict must not cry wolf;
* remote-viewer (spice-gtk 0.42) with ``--spice-secure-channels=all``, three times; then
  the downgrade to plain text forced on purpose (``test_offer_plain_port``): spice-gtk links
  the destination in plain text, and the report must say ``tls_downgraded`` with the
  channels, not a success, exit code 11 -- checked against ``query-spice`` too.

Every QEMU, Xvfb and remote-viewer is stopped by PID, also when an assertion fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from spice_libvirt.errors import MigrationError
from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.evidence import Sessions, sessions_from_query_spice
from spice_libvirt.migration.report import MigrationReport
from spice_libvirt.qemu.controller import migrate_qemu
from spice_libvirt.qemu.qmp import QMPConnection
from spice_libvirt.qemu.request import MigrationRequest
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_lab import QemuLab, embedded_client
from spice_libvirt_lab.qemu_lab_state import LabTls
from spice_libvirt_lab.qemu_process import QemuGroup, QemuInstance
from spice_libvirt_lab.tls import TlsMaterial
from tests.rigs.viewer import (
    VIEWER_CHANNELS,
    RemoteViewer,
    ViewerTls,
    XServer,
    full_session,
    start_viewer,
)

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("require_kvm")]


@pytest.fixture
async def tls_lab(lab_dir: Path) -> AsyncIterator[QemuLab]:
    """The built-in QEMU lab with TLS, in ``mixed`` mode: both QEMUs on a plain and a TLS
    port *and accepting plain text* -- the case where a TLS client could be downgraded
    (the all-secure default answers a plain link with NEED_SECURED); down after."""
    lab = QemuLab(lab_dir / "lab")
    await lab.up(tls=True, tls_mode="mixed")
    try:
        yield lab
    finally:
        await lab.down()


async def _running_side_sessions(lab: QemuLab) -> Sessions:
    """``query-spice`` on the side where the VM runs now (the lab's current source)."""
    state = lab.load()
    assert state is not None
    side = state.sides[state.source]
    async with QMPConnection.open(side.qmp_path, name="tls-test", timeout=10) as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"
        return sessions_from_query_spice(await qmp.execute("query-spice"))


def _assert_kept_on_tls(report: MigrationReport, cid: int, *, both_ports: bool = False) -> None:
    assert report.migration.status == "completed", report.model_dump_json(indent=1)
    assert report.outcome == "seamless", (report.outcome, report.notes)
    assert report.seamless
    assert report.tls_downgraded is False
    assert report.tls_downgraded_channels == []
    assert for_report(report) is ExitCode.OK
    # the TLS port only ("host:-/tls:N"), unless the destination refuses
    # plain text (then NEED_SECURED keeps the client on TLS)
    assert (":-/tls:" not in report.client_target) is both_ports, report.client_target
    [client] = report.clients
    assert client.connection_id_before == cid
    assert client.tls_before is True
    assert client.tls_after is True


async def test_embedded_client_on_tls_stays_on_tls_back_and_forth(tls_lab: QemuLab) -> None:
    state = tls_lab.load()
    assert state is not None
    assert state.tls is not None
    async with embedded_client(state.sides[state.source], state.tls) as client:
        assert client is not None
        cid = client.session_id
        for _ in range(3):
            report = await tls_lab.migrate(witness=client)
            _assert_kept_on_tls(report, cid)
            assert report.clients[0].kind == "embedded"
            # the oracle: QEMU where the VM runs now, channel by channel
            sessions = await _running_side_sessions(tls_lab)
            assert list(sessions) == [cid]
            assert sessions[cid].channels, sessions
            assert sessions[cid].tls_names(False) == [], sessions[cid].channels
            assert sessions[cid].all_tls is True
        # offered the plain port on purpose, our client still refuses to leave TLS, and
        # the verdict does not report a downgrade that did not happen
        report = await tls_lab.migrate(witness=client, request_overrides=_OFFER_PLAIN)
        assert report.outcome == "seamless", report.notes
        assert report.tls_downgraded is False
        assert (await _running_side_sessions(tls_lab))[cid].all_tls is True


_OFFER_PLAIN = {"test_offer_plain_port": True}


# --------------------------------------------------------------------------- remote-viewer


def _start_secure_viewer(
    uri: str, tls: TlsMaterial | LabTls, display: str, workdir: Path, name: str = "rv-tls"
) -> RemoteViewer:
    """remote-viewer on the TLS port, every channel secure, verifying the lab CA."""
    secure = ViewerTls(tls.ca_cert, tls.subject)
    return start_viewer(uri, display, workdir, name=name, tls=secure)


async def _wait_viewer(
    query: Callable[[], Awaitable[Sessions]], viewer: RemoteViewer, timeout: float = 30.0
) -> int:
    """The connection id of remote-viewer's full session, all of it on TLS from the start."""
    deadline = time.monotonic() + timeout
    while True:
        sessions = await query()
        cid = full_session(sessions)
        if cid is not None:
            assert sessions[cid].all_tls is True, sessions[cid].channels
            return cid
        if not viewer.alive():
            pytest.fail(f"remote-viewer exited:\n{viewer.log_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no full remote-viewer session: {sessions}")
        await asyncio.sleep(0.1)


def _request(src: QemuInstance, dst: QemuInstance, port: int, tls: TlsMaterial) -> MigrationRequest:
    return MigrationRequest(
        source_qmp=str(src.qmp_path),
        destination_qmp=str(dst.qmp_path),
        migrate_uri=f"tcp:127.0.0.1:{port}",
        client_host="127.0.0.1",
        client_port=dst.spice_port,
        client_tls_port=dst.spice_tls_port,
        client_cert_subject=tls.subject,
        source_pid=src.pid,
        settle=0.5,
    )


async def _sessions_of(vm: QemuInstance) -> Sessions:
    async with QMPConnection.open(vm.qmp_path, name="tls-test", timeout=10) as qmp:
        return sessions_from_query_spice(await qmp.execute("query-spice"))


@pytest.mark.slow
async def test_remote_viewer_all_secure_seamless_and_on_tls_when_the_destination_insists(
    qemu_factory: QemuGroup, tls_material: TlsMaterial, x_server: XServer, lab_dir: Path
) -> None:
    """Destinations that refuse plain text (``tls-channel=default``): both ports offered,
    spice-gtk's plain attempt gets NEED_SECURED and it links on TLS -- seamless, 3 times."""
    tls_dir, strict = tls_material.directory, ["-spice", "tls-channel=default"]
    vm = await qemu_factory("tls0", tls_dir=tls_dir, extra_args=strict)
    viewer = _start_secure_viewer(
        f"spice://127.0.0.1:{vm.spice_port}?tls-port={vm.spice_tls_port}",
        tls_material,
        x_server.display,
        lab_dir,
    )
    try:
        cid = await _wait_viewer(lambda: _sessions_of(vm), viewer)
        for n in range(1, 4):
            port = free_tcp_port()
            nxt = await qemu_factory(
                f"tls{n}", incoming=f"tcp:127.0.0.1:{port}", tls_dir=tls_dir, extra_args=strict
            )
            report = await migrate_qemu(_request(vm, nxt, port, tls_material))
            _assert_kept_on_tls(report, cid, both_ports=True)
            sessions = await _sessions_of(nxt)  # where the VM runs now
            assert list(sessions) == [cid]
            assert set(sessions[cid].names) >= VIEWER_CHANNELS
            assert sessions[cid].tls_names(False) == [], sessions[cid].channels
            await vm.stop()
            vm = nxt
        assert viewer.alive(), viewer.log_text()[-2000:]
    finally:
        viewer.stop()
    assert not viewer.alive()


@pytest.mark.slow
async def test_remote_viewer_all_secure_never_goes_plain_in_the_tls_lab(
    tls_lab: QemuLab, x_server: XServer, lab_dir: Path
) -> None:
    """The lab's destination accepts plain text. Forced to see the plain port (the bug of
    the downgrade), spice-gtk 0.42 goes plain, and the report says so with exit code 11. Told
    the TLS port only (plain port 0), it pre-links on TLS and stays seamless."""
    state = tls_lab.load()
    assert state is not None
    assert state.tls is not None
    tls = state.tls
    uri = state.sides[state.source].spice_uri
    viewer = _start_secure_viewer(uri, tls, x_server.display, lab_dir, name="rv-forced")
    try:
        cid = await _wait_viewer(lambda: _running_side_sessions(tls_lab), viewer)
        report = await tls_lab.migrate(watch=False, request_overrides=_OFFER_PLAIN)
        assert report.migration.status == "completed", report.notes
        assert report.tls_downgraded is True, report.model_dump_json(indent=1)
        assert set(report.tls_downgraded_channels) >= {"main:0", "display:0"}
        assert report.seamless is False
        assert for_report(report) is ExitCode.TLS_DOWNGRADED
        assert any("TLS downgraded" in n for n in report.notes)
        [client] = report.clients
        assert client.connection_id_before == cid
        assert (client.tls_before, client.tls_after) == (True, False)
        # the oracle agrees: QEMU shows the client's channels in plain text now
        sessions = await _running_side_sessions(tls_lab)
        plain = {name for s in sessions.values() for name in s.tls_names(False)}
        assert plain >= set(report.tls_downgraded_channels)
    finally:
        viewer.stop()
    # a fresh viewer (the downgraded one is on plain text now)
    uri = tls_lab.load().sides[tls_lab.load().source].spice_uri  # type: ignore[union-attr]
    viewer = _start_secure_viewer(uri, tls, x_server.display, lab_dir, name="rv-tls-only")
    try:
        cid = await _wait_viewer(lambda: _running_side_sessions(tls_lab), viewer)
        report = await tls_lab.migrate(watch=False)
        assert report.migration.status == "completed", report.notes
        assert ":-/tls:" in report.client_target  # the TLS port only
        assert any("plain port goes out as 0" in n for n in report.notes)
        assert report.tls_downgraded is False, report.tls_downgraded_channels
        assert report.outcome == "seamless", (report.outcome, report.notes)
        assert for_report(report) is ExitCode.OK
        [client] = report.clients
        assert client.connection_id_kept is True
        sessions = await _running_side_sessions(tls_lab)
        assert sessions[cid].all_tls is True, sessions[cid].channels
    finally:
        viewer.stop()
    assert not viewer.alive()


async def test_a_tls_client_is_never_sent_to_a_plain_only_target(
    qemu_factory: QemuGroup, tls_material: TlsMaterial
) -> None:
    """No TLS port for the client on the destination: refused before anything changed
    (``tls_downgrade_policy`` defaults to ``refuse``); ``warn`` migrates and says so."""
    src = await qemu_factory("tsrc", tls_dir=tls_material.directory)
    port = free_tcp_port()
    dst = await qemu_factory(
        "tdst", incoming=f"tcp:127.0.0.1:{port}", tls_dir=tls_material.directory
    )
    options = ClientOptions(
        host="127.0.0.1",
        tls_port=src.spice_tls_port,
        ca_file=tls_material.ca_cert,
        host_subject=tls_material.subject,
    )
    async with SpiceClient(options) as client:
        plain_only = _request(src, dst, port, tls_material).model_copy(
            update={"client_tls_port": None}
        )
        with pytest.raises(MigrationError, match="TLS downgrade risk") as info:
            await migrate_qemu(plain_only, client)
        assert info.value.phase == "preflight"
        assert list(await _sessions_of(src)) == [client.session_id]  # untouched, still there
        async with QMPConnection.open(dst.qmp_path, timeout=5) as qmp:
            assert (await qmp.execute("query-status"))["status"] == "inmigrate"
        # warn: migrates; our client refuses the plain port, so the hand-over fails rather
        # than going plain -- and nothing is reported as a downgrade or a success
        warn = plain_only.model_copy(update={"tls_downgrade_policy": "warn", "link_timeout": 2.0})
        report = await migrate_qemu(warn, client)
        assert any("tls_downgrade_policy=warn" in n for n in report.notes)
        assert report.tls_downgraded is False
        assert report.outcome != "seamless"
        # the oracle: wherever the VM runs now, no link of any client is in plain text
        assert all(not s.tls_names(False) for s in (await _sessions_of(dst)).values())
