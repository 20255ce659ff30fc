"""The built-in QEMU lab through the real CLI: up returns, QEMUs outlive it, ping-pong, down.

Each command runs as its own ``spice-libvirt`` process, exactly as a user runs it, so the
test proves that the QEMUs survive the CLI that started them and that ``down`` finds them
again by the PIDs recorded in the state file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt_lab.procs import proc_start_time, wait_exit
from spice_libvirt_lab.qemu_lab import QemuLab

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("require_kvm")]

#: the console script of the venv running the tests (the package is installed editable)
SPICE_LIBVIRT = Path(sys.executable).with_name("spice-libvirt")


def cli(lab: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SPICE_LIBVIRT), "lab", "--dir", str(lab), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_json(lab: Path, *args: str, expect: ExitCode = ExitCode.OK) -> Any:
    done = cli(lab, *args, "--json")
    assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout)


def ended(pid: int, timeout: float = 60.0) -> bool:
    """Wait (on a pidfd: an event, not a poll) until ``pid`` has ended; generous bound."""
    return wait_exit(pid, proc_start_time(pid), timeout)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def lab(lab_dir: Path) -> Iterator[Path]:
    """A lab directory that is always torn down (by the lab's own recorded PIDs)."""
    try:
        yield lab_dir
    finally:
        cli(lab_dir, "down", timeout=60)


def test_up_returns_and_the_qemus_outlive_the_cli(lab: Path) -> None:
    up = cli_json(lab, "up")  # returns (the subprocess has a bound) while the QEMUs run on
    src, dst = up["source"], up["destination"]
    assert src["spice_uri"].startswith("spice://127.0.0.1:")
    assert dst["migrate_uri"].startswith("tcp:127.0.0.1:")
    assert src["qmp"].endswith(".qmp")
    assert alive(src["pid"])
    assert alive(dst["pid"])  # the CLI process has exited; the QEMUs have not
    # each QEMU leads its own session: a ^C in the user's terminal does not reach it
    assert os.getsid(src["pid"]) == src["pid"]

    again = cli(lab, "up")
    assert again.returncode == ExitCode.LAB
    assert "already up" in again.stderr

    status = cli_json(lab, "status")
    assert status["up"] is True
    assert status["source"]["qemu_status"] == "running"
    assert status["destination"]["qemu_status"] == "inmigrate"

    down = cli_json(lab, "down")
    assert sorted(down["stopped_pids"]) == sorted([src["pid"], dst["pid"]])
    for pid in (src["pid"], dst["pid"]):
        assert ended(pid)
        assert not alive(pid)
    assert not (lab / "lab.json").exists()
    assert cli(lab, "status").returncode == ExitCode.LAB


def test_migrate_ping_pongs_with_the_embedded_client(lab: Path) -> None:
    up = cli_json(lab, "up")
    first_src = up["source"]["pid"]
    sides = []
    for _ in range(3):
        report = cli_json(lab, "migrate")
        assert report["outcome"] == "seamless", json.dumps(report, indent=1)
        [client] = report["clients"]
        assert client["kind"] == "embedded"
        assert client["connection_id_kept"]
        assert report["stream"]["gaps"] == 0
        assert report["link_wait"]["result"] == "linked"
        status = cli_json(lab, "status")
        assert status["up"] is True
        assert status["source"]["qemu_status"] == "running"
        assert status["destination"]["qemu_status"] == "inmigrate"
        sides.append(status["source"]["side"])
    assert sides == ["b", "a", "b"]
    assert not alive(first_src)  # the old source was replaced, not left in postmigrate
    assert cli_json(lab, "status")["migrations"] == 3


def test_migrate_without_any_client(lab: Path) -> None:
    cli_json(lab, "up")
    report = cli_json(lab, "migrate", "--no-watch")
    assert report["outcome"] == "no-client"
    assert report["migration"]["status"] == "completed"
    assert report["clients"] == []


def test_migrate_refuses_a_broken_lab(lab: Path) -> None:
    up = cli_json(lab, "up")
    os.kill(up["destination"]["pid"], signal.SIGKILL)
    assert ended(up["destination"]["pid"])
    done = cli(lab, "migrate")
    assert done.returncode == ExitCode.LAB, done.stderr
    assert "not running" in done.stderr
    status = cli(lab, "status", "--json")
    assert status.returncode == ExitCode.LAB
    assert json.loads(status.stdout)["destination"]["alive"] is False


async def test_python_api_state_file(lab: Path) -> None:
    qemu_lab = QemuLab(lab)
    state = await qemu_lab.up("firmware")
    try:
        loaded = qemu_lab.load()
        assert loaded is not None
        assert loaded.sides["a"].pid == state.sides["a"].pid
        report = await qemu_lab.migrate(watch=False)
        assert report.outcome == "no-client"
        loaded = qemu_lab.load()
        assert loaded is not None
        assert loaded.source == "b"
        assert loaded.last_outcome == "no-client"
    finally:
        assert len(await qemu_lab.down()) == 2


@pytest.mark.slow
def test_linux_guest_stream_survives_ping_pong(lab: Path) -> None:
    """The TCG Linux guest streams records on the spiceport: none lost, none repeated."""
    cli_json(lab, "up", "--guest", "linux")
    for _ in range(2):
        report = cli_json(lab, "migrate")
        assert report["outcome"] == "seamless", json.dumps(report, indent=1)
        stream = report["stream"]
        assert stream["records"] > 100
        assert stream["gaps"] == 0
        assert stream["duplicates"] == 0
        assert report["migration"]["passes"] >= 1


async def test_tls_lab_sends_the_client_to_the_tls_port_with_the_subject(lab: Path) -> None:
    qemu_lab = QemuLab(lab)
    state = await qemu_lab.up("firmware", tls=True)
    try:
        assert state.tls is not None
        assert state.sides["b"].spice_tls_port is not None
        report = await qemu_lab.migrate()
        assert report.outcome == "seamless", report.model_dump_json(indent=1)
        assert report.client_target.endswith(f"/tls:{state.sides['b'].spice_tls_port}")
        [client] = report.clients
        # every channel was linked to the destination over TLS, and the session kept
        assert client.tls_before is True
        assert client.tls_after is True
        assert client.connection_id_kept
    finally:
        await qemu_lab.down()


async def test_a_connected_viewer_is_not_kicked_out_by_our_client(lab: Path) -> None:
    """spice-server keeps one client per VM: with one connected, ours must stay away."""
    qemu_lab = QemuLab(lab)
    state = await qemu_lab.up("firmware")
    try:
        src = state.sides[state.source]
        async with SpiceClient(ClientOptions(host="127.0.0.1", port=src.spice_port)) as viewer:
            report = await qemu_lab.migrate()  # watch by default
            assert report.outcome == "seamless", report.model_dump_json(indent=1)
            [client] = report.clients
            assert client.kind == "external"
            assert client.connection_id_before == viewer.session_id
            assert any("already connected" in n for n in report.notes)
            record = await viewer.next_migration(5)
            assert record.path == "seamless"  # the viewer itself followed, undisturbed
    finally:
        await qemu_lab.down()
