"""TLS kept end to end, through the lab's own command line: ``lab up --tls``.

* ``secure`` (the default of ``--tls``): both QEMUs run ``tls-channel=default``; remote-viewer
  (spice-gtk 0.42) with the lab CA, the host subject and ``--spice-secure-channels=all``
  follows three ``lab migrate --no-watch`` seamlessly (exit 0, and its own log says
  seamless), and ``query-spice`` where the VM runs shows every channel on TLS each time;
* ``--tls-mode mixed``: plain links accepted, so a client told the plain port on purpose
  (``test_offer_plain_port``) goes plain -- reported ``tls_downgraded`` with exit code 11.

The oracle is QEMU's ``query-spice`` on the side where the VM runs, not the verdict. Xvfb,
remote-viewer and both QEMUs are stopped by PID, also when an assertion fails.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.evidence import Sessions, sessions_from_query_spice
from spice_libvirt.qemu.qmp import QMPConnection
from spice_libvirt_lab.qemu_lab import QemuLab
from spice_libvirt_lab.qemu_lab_state import LabTls
from tests.rigs.viewer import (
    VIEWER_CHANNELS,
    RemoteViewer,
    XServer,
    full_session,
    migration_messages,
)
from tests.test_tls_migration import _start_secure_viewer

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.usefixtures("require_kvm")]


def cli(lab: Path, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "lab", "--dir", str(lab), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def lab_path(lab_dir: Path) -> Iterator[Path]:
    """A lab directory whose QEMUs are stopped (by PID, through ``lab down``) afterwards."""
    path = lab_dir / "lab"
    try:
        yield path
    finally:
        done = cli(path, "down", "--json")
        assert done.returncode == 0, done.stderr


def _viewer(tls: LabTls, uri: str, display: str, workdir: Path, name: str) -> RemoteViewer:
    """remote-viewer verifying the lab CA and subject, every channel required on TLS."""
    return _start_secure_viewer(uri, tls, display, workdir, name)


async def _where_it_runs(lab: QemuLab) -> Sessions:
    """``query-spice`` on the side where the VM runs now (checked running)."""
    state = lab.load()
    assert state is not None
    side = state.sides[state.source]
    async with QMPConnection.open(side.qmp_path, name="tls-lab-test", timeout=10) as qmp:
        assert (await qmp.execute("query-status"))["status"] == "running"
        return sessions_from_query_spice(await qmp.execute("query-spice"))


async def _full_session(lab: QemuLab, viewer: RemoteViewer, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        sessions = await _where_it_runs(lab)
        cid = full_session(sessions)
        if cid is not None:
            return cid
        assert viewer.alive(), viewer.log_text()[-2000:]
        assert time.monotonic() < deadline, f"no full remote-viewer session: {sessions}"
        await asyncio.sleep(0.1)


def _spice_option(lab: QemuLab) -> list[str]:
    state = lab.load()
    assert state is not None
    argvs = [side.argv for side in state.sides.values()]
    return [argv[argv.index("-spice") + 1] for argv in argvs]


async def test_secure_lab_remote_viewer_three_seamless_migrations_all_on_tls(
    lab_path: Path, x_server: XServer, lab_dir: Path
) -> None:
    up = cli(lab_path, "up", "--tls", "--json")
    assert up.returncode == 0, up.stderr
    summary = json.loads(up.stdout)
    assert summary["tls"]["mode"] == "secure"
    lab = QemuLab(lab_path)
    for option in _spice_option(lab):  # both QEMUs refuse plain text on every channel
        assert "tls-channel=default" in option.split(","), option
    state = lab.load()
    assert state is not None
    assert state.tls is not None
    viewer = _viewer(
        state.tls, summary["source"]["spice_uri"], x_server.display, lab_dir, "rv-secure"
    )
    try:
        cid = await _full_session(lab, viewer)
        assert (await _where_it_runs(lab))[cid].all_tls is True
        for n in range(1, 4):
            mark = len(viewer.log_text())
            done = cli(lab_path, "migrate", "--no-watch", "--json")
            assert done.returncode == ExitCode.OK, (done.returncode, done.stdout, done.stderr)
            report = json.loads(done.stdout)
            assert report["outcome"] == "seamless", report["notes"]
            assert report["tls_downgraded"] is False
            [client] = report["clients"]
            assert client["connection_id_before"] == cid
            assert (client["tls_before"], client["tls_after"]) == (True, True)
            # both ports offered: the destination refuses plain text (NEED_SECURED)
            assert ":-/tls:" not in report["client_target"], report["client_target"]
            # the oracle: QEMU where the VM runs now, every channel of the same session
            sessions = await _where_it_runs(lab)
            assert list(sessions) == [cid], sessions
            assert set(sessions[cid].names) >= VIEWER_CHANNELS
            assert sessions[cid].tls_names(False) == [], sessions[cid].channels
            assert sessions[cid].all_tls is True
            # and remote-viewer's own log: a seamless migration, no switch-host
            messages = migration_messages(viewer.log_text()[mark:])
            assert "migrate-begin-seamless" in messages, (n, messages)
            assert "migrate-switch-host" not in messages, (n, messages)
        assert viewer.alive(), viewer.log_text()[-2000:]
    finally:
        viewer.stop()
    status = cli(lab_path, "status", "--json")
    assert json.loads(status.stdout)["migrations"] == 3


async def test_mixed_lab_forced_downgrade_is_reported_with_exit_11(
    lab_path: Path, x_server: XServer, lab_dir: Path
) -> None:
    up = cli(lab_path, "up", "--tls", "--tls-mode", "mixed", "--json")
    assert up.returncode == 0, up.stderr
    lab = QemuLab(lab_path)
    for option in _spice_option(lab):
        assert "tls-channel" not in option, option
    state = lab.load()
    assert state is not None
    assert state.tls is not None
    assert state.tls.mode == "mixed"
    uri = state.sides[state.source].spice_uri
    viewer = _viewer(state.tls, uri, x_server.display, lab_dir, "rv-mixed")
    try:
        cid = await _full_session(lab, viewer)
        report = await lab.migrate(watch=False, request_overrides={"test_offer_plain_port": True})
        assert report.migration.status == "completed", report.notes
        assert report.tls_downgraded is True, report.model_dump_json(indent=1)
        assert set(report.tls_downgraded_channels) >= {"main:0", "display:0"}
        assert report.seamless is False
        assert for_report(report) is ExitCode.TLS_DOWNGRADED
        assert int(ExitCode.TLS_DOWNGRADED) == 11
        [client] = report.clients
        assert client.connection_id_before == cid
        assert (client.tls_before, client.tls_after) == (True, False)
        sessions = await _where_it_runs(lab)
        plain = {name for s in sessions.values() for name in s.tls_names(False)}
        assert plain >= set(report.tls_downgraded_channels)
    finally:
        viewer.stop()
