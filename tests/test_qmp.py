"""The QMP wrapper against real QEMU processes: retries, typed errors, bounded waits, events."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from spice_libvirt import errors
from spice_libvirt.exitcodes import ExitCode, for_error
from spice_libvirt.qemu.qmp import (
    QMPCommandError,
    QMPConnectError,
    QMPConnection,
    QMPDisconnectedError,
    QMPTimeoutError,
)
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_process import QemuGroup, QemuSpec, qemu_argv

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("require_kvm")]


async def test_connect_retries_until_the_socket_appears(lab_dir: Path) -> None:
    """A freshly spawned QEMU creates its socket a moment later: connect must wait for it."""
    spec = QemuSpec(name="late", workdir=lab_dir)
    argv = qemu_argv(spec, spice_port=free_tcp_port())
    conn = QMPConnection("late")
    connecting = asyncio.create_task(conn.connect(spec.qmp_path, timeout=15))
    await asyncio.sleep(0.3)  # the socket does not exist yet
    assert not connecting.done()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(connecting, 15)
        assert conn.connected
        status = await conn.execute("query-status")
        assert status["status"] == "running"
    finally:
        await conn.close()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_connect_gives_up_with_a_typed_error(lab_dir: Path) -> None:
    conn = QMPConnection("nobody")
    started = time.monotonic()
    with pytest.raises(QMPConnectError) as info:
        await conn.connect(lab_dir / "missing.qmp", timeout=0.5)
    assert time.monotonic() - started < 3
    assert isinstance(info.value, errors.QMPError)
    assert isinstance(info.value, errors.ConnectError)
    assert for_error(info.value) is ExitCode.UNREACHABLE
    assert "missing.qmp" in str(info.value)


async def test_command_errors_are_typed(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("cmderr")
    async with QMPConnection.open(vm.qmp_path) as qmp:
        with pytest.raises(QMPCommandError) as info:
            await qmp.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.command == "no-such-command"
        with pytest.raises(QMPCommandError) as bad:
            await qmp.execute("migrate-set-parameters", {"downtime-limit": -1})
        assert bad.value.error_class == "GenericError"
        # the session is still usable after errors
        assert (await qmp.execute("query-status"))["status"] == "running"


async def test_a_stuck_qemu_gives_a_timeout_not_a_hang(qemu_factory: QemuGroup) -> None:
    """SIGSTOP freezes the real QEMU: the reply never comes, the wait is bounded."""
    vm = await qemu_factory("stuck")
    async with QMPConnection.open(vm.qmp_path, command_timeout=0.5) as qmp:
        os.kill(vm.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(QMPTimeoutError):
                await qmp.execute("query-status")
            assert time.monotonic() - started < 2
            with pytest.raises(QMPTimeoutError):
                await qmp.execute_retrying("query-status", attempts=2, timeout=0.2)
        finally:
            os.kill(vm.pid, signal.SIGCONT)


async def test_events_as_async_iterators_with_filters(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("events")
    async with (
        QMPConnection.open(vm.qmp_path) as qmp,
        qmp.events(["STOP", "RESUME"]) as both,
        qmp.events("RESUME", where=lambda e: e.name == "RESUME") as resumes,
    ):
        await qmp.execute("stop")
        await qmp.execute("cont")
        first = await both.get(timeout=5)
        second = await anext(aiter(both))
        assert [first.name, second.name] == ["STOP", "RESUME"]
        assert first.timestamp > 1e9  # QEMU's wall-clock timestamp
        only = await resumes.get(timeout=5)
        assert only.name == "RESUME"
        with pytest.raises(QMPTimeoutError):
            await resumes.get(timeout=0.2)
        assert [e.name for e in both.history] == ["STOP", "RESUME"]


async def test_wait_event_skips_until_the_predicate_holds(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("waitev")
    async with QMPConnection.open(vm.qmp_path) as qmp, qmp.events(["STOP", "RESUME"]) as stream:
        await qmp.execute("stop")
        await qmp.execute("cont")
        event = await qmp.wait_event(stream, lambda e: e.name == "RESUME", timeout=5)
        assert event.name == "RESUME"
        with pytest.raises(QMPTimeoutError):
            await qmp.wait_event(stream, lambda e: e.name == "STOP", timeout=0.3)


async def test_qemu_exit_is_a_disconnect_error(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("dies")
    async with QMPConnection.open(vm.qmp_path) as qmp:
        await vm.stop()

        async def poll_until_error() -> None:
            for _ in range(20):  # the reader notices EOF asynchronously
                await qmp.execute("query-status", timeout=1)
                await asyncio.sleep(0.05)

        with pytest.raises(QMPDisconnectedError):
            await poll_until_error()
        assert not qmp.connected
