"""The QEMU runtime: command line shape (pure) and real QEMUs with each SPICE set-up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
from qemu.qmp import EventListener

from spice_libvirt.errors import ConfigError, LabError, QMPError
from spice_libvirt_lab import guest as guest_mod
from spice_libvirt_lab import ports as ports_mod
from spice_libvirt_lab import qemu_process as qemu_mod
from spice_libvirt_lab.guest import GuestImages, KernelPackage
from spice_libvirt_lab.qemu_process import QemuGroup, QemuSpec, qemu_argv
from spice_libvirt_lab.tls import TlsMaterial

SpiceLink = Callable[..., Awaitable[int]]

_FAKE_IMAGES = GuestImages(
    directory=Path("/cache/linux-x"),
    kernel=Path("/cache/linux-x/vmlinux"),
    initrd=Path("/cache/linux-x/initrd.gz"),
    pvh=True,
    kernel_package=KernelPackage(name="linux-image-6.1.0-56-amd64", version="6.1.192-2"),
    digest="x",
    built_at="2026-11-21T00:00:00+00:00",
    build_seconds=1.0,
)


def _value(argv: list[str], option: str) -> str:
    """The argument following ``option`` (which must occur exactly once)."""
    assert argv.count(option) == 1, (option, argv)
    return argv[argv.index(option) + 1]


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


# --------------------------------------------------------------------------- pure


def test_argv_firmware_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_mod, "kvm_usable", lambda: True)  # the argv, not this host
    spec = QemuSpec(name="src", workdir=Path("/w"), spice_port=5930, accel="kvm")
    argv = qemu_argv(spec)
    assert argv[0] == "qemu-system-x86_64"
    assert "-nodefaults" in argv
    assert "-daemonize" not in argv
    assert _value(argv, "-vga") == "qxl"
    assert _value(argv, "-display") == "none"
    assert _value(argv, "-accel") == "kvm"
    assert _value(argv, "-cpu") == qemu_mod.KVM_CPU
    assert _value(argv, "-m") == "128"
    assert _value(argv, "-name").split(",")[0] == "src"
    assert _value(argv, "-spice") == (
        "port=5930,addr=127.0.0.1,seamless-migration=on,disable-ticketing=on"
    )
    assert _value(argv, "-qmp") == "unix:/w/src.qmp,server=on,wait=off"
    assert _value(argv, "-pidfile") == "/w/src.pid"
    assert _value(argv, "-serial") == "file:/w/src.serial"
    assert _value(argv, "-chardev") == "spiceport,id=stream0,name=org.spice-libvirt.stream"
    assert _values(argv, "-device") == [
        "virtio-serial-pci,id=vser0",
        "virtserialport,bus=vser0.0,chardev=stream0,name=org.spice-libvirt.stream",
    ]
    for absent in ("-kernel", "-incoming", "-no-reboot", "-drive", "-netdev"):
        assert absent not in argv


def test_argv_linux_guest() -> None:
    spec = QemuSpec(
        name="lx",
        guest="linux",
        workdir=Path("/w"),
        spice_port=5931,
        accel="tcg",
        memory_mib=256,
        dirty_mb=64,
        dirty_ms=10,
        incoming="tcp:127.0.0.1:4444",
    )
    argv = qemu_argv(spec, images=_FAKE_IMAGES)
    assert _value(argv, "-accel") == "tcg"
    assert _value(argv, "-cpu") == "max"
    assert _value(argv, "-kernel") == "/cache/linux-x/vmlinux"
    assert _value(argv, "-initrd") == "/cache/linux-x/initrd.gz"
    assert _value(argv, "-append").split() == [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "portname=org.spice-libvirt.stream",
        "dirty_mb=64",
        "dirty_ms=10",
    ]
    assert "-no-reboot" in argv
    assert _value(argv, "-incoming") == "tcp:127.0.0.1:4444"
    with pytest.raises(ConfigError, match="images"):
        qemu_argv(spec)


def test_argv_password_tls_and_no_stream() -> None:
    spec = QemuSpec(
        name="t",
        workdir=Path("/w"),
        accel="tcg",
        password="hunter2",
        tls_dir=Path("/pki"),
        seamless_migration=False,
        stream_port_name=None,
        spice_host="::1",
    )
    argv = qemu_argv(spec, spice_port=6000, spice_tls_port=6001)
    spice = _value(argv, "-spice")
    assert spice == "port=6000,addr=::1,seamless-migration=off,tls-port=6001,x509-dir=/pki"
    assert not any("hunter2" in arg for arg in argv)  # the password goes over QMP only
    assert "-chardev" not in argv
    assert "-device" not in argv
    with pytest.raises(ConfigError, match="TLS needs a port"):
        qemu_argv(spec, spice_port=6000)
    with pytest.raises(ConfigError, match="SPICE port"):
        qemu_argv(spec)


def test_spec_rejects_incoherent_input() -> None:
    with pytest.raises(pydantic.ValidationError, match="needs tls_dir"):
        QemuSpec(name="a", workdir=Path("/w"), spice_tls_port=5999)
    with pytest.raises(pydantic.ValidationError, match="linux guest"):
        QemuSpec(name="a", workdir=Path("/w"), dirty_mb=16)
    with pytest.raises(pydantic.ValidationError, match="does not fit"):
        QemuSpec(name="a", guest="linux", workdir=Path("/w"), dirty_mb=128)
    with pytest.raises(pydantic.ValidationError, match="password"):
        QemuSpec(name="a", workdir=Path("/w"), password="a,b")
    with pytest.raises(pydantic.ValidationError, match="name"):
        QemuSpec(name="../evil", workdir=Path("/w"))
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        QemuSpec(name="a", workdir=Path("/w"), spice_prot=1)  # type: ignore[call-arg]


def test_accel_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_mod, "kvm_usable", lambda: True)
    monkeypatch.delenv("SPICE_LIBVIRT_LINUX_ACCEL", raising=False)
    assert guest_mod.default_accel("firmware") == "kvm"
    assert guest_mod.default_accel("linux") == "tcg"
    monkeypatch.setenv("SPICE_LIBVIRT_LINUX_ACCEL", "kvm")
    assert guest_mod.default_accel("linux") == "kvm"
    monkeypatch.setenv("SPICE_LIBVIRT_LINUX_ACCEL", "auto")
    monkeypatch.setattr(guest_mod, "kvm_flavour", lambda: "pvm")
    assert guest_mod.default_accel("linux") == "tcg"
    monkeypatch.setattr(guest_mod, "kvm_flavour", lambda: "intel")
    assert guest_mod.default_accel("linux") == "kvm"
    monkeypatch.setenv("SPICE_LIBVIRT_LINUX_ACCEL", "fast")
    with pytest.raises(LabError, match="SPICE_LIBVIRT_LINUX_ACCEL"):
        guest_mod.default_accel("linux")
    monkeypatch.setattr(guest_mod, "kvm_usable", lambda: False)
    assert guest_mod.default_accel("firmware") == "tcg"
    spec = QemuSpec(name="a", workdir=Path("/w"), accel="kvm")
    with pytest.raises(LabError, match="/dev/kvm"):
        qemu_mod.resolve_accel(spec)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = ports_mod.free_tcp_ports(8)
    assert len(set(ports)) == 8
    assert all(ports_mod.port_is_free(p) for p in ports)
    again = ports_mod.free_tcp_ports(8)
    assert not set(ports) & set(again)  # recently handed-out ports are not reused
    single = ports_mod.free_tcp_port()
    assert single not in ports + again


# --------------------------------------------------------------------------- real QEMU


@pytest.mark.qemu
@pytest.mark.usefixtures("require_kvm")
async def test_firmware_guest_runs_on_kvm_and_stops(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("fw")
    assert vm.accel == "kvm"
    assert vm.is_running()
    assert vm.pidfile.read_text().strip() == str(vm.pid)
    assert await vm.execute("query-kvm") == {"enabled": True, "present": True}
    status = await vm.execute("query-status")
    assert status["status"] == "running"
    assert (vm.spec.workdir / "fw.cmdline").read_text().strip() == vm.command_line
    # Same channel set as the linux guest: the stream port exists (nobody writes to it).
    chardevs = {c["label"]: c["filename"] for c in await vm.execute("query-chardev")}
    assert chardevs["stream0"] == "spiceport"
    await vm.stop()
    assert not vm.is_running()
    assert _not_ours(vm.pid, vm.spec.name)
    assert not vm.qmp_path.exists()
    await vm.stop()  # idempotent


def _not_ours(pid: int, name: str) -> bool:
    """No process with ``pid``, or one that is not the QEMU named ``name`` (PID reused)."""
    try:
        return name not in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return True


@pytest.mark.qemu
async def test_spice_without_ticket(qemu_factory: QemuGroup, spice_link: SpiceLink) -> None:
    vm = await qemu_factory("plain")
    info = await vm.execute("query-spice")
    assert info["enabled"] is True
    assert info["auth"] == "none"
    assert info["port"] == vm.spice_port
    assert info["host"] == "127.0.0.1"
    assert "tls-port" not in info
    assert vm.spice_tls_port is None
    assert await spice_link("127.0.0.1", vm.spice_port) == 0


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


@pytest.mark.qemu
async def test_spice_ticket_set_over_qmp(qemu_factory: QemuGroup, spice_link: SpiceLink) -> None:
    vm = await qemu_factory("ticket", password="s3cr3t-pw")
    info = await vm.execute("query-spice")
    assert info["auth"] == "spice"
    assert info["port"] == vm.spice_port
    assert "s3cr3t-pw" not in _cmdline(vm.pid)
    assert await spice_link("127.0.0.1", vm.spice_port, "wrong") == 7  # PERMISSION_DENIED
    assert await spice_link("127.0.0.1", vm.spice_port, "s3cr3t-pw") == 0


@pytest.mark.qemu
async def test_spice_tls_with_ticket(
    qemu_factory: QemuGroup, tls_material: TlsMaterial, spice_link: SpiceLink
) -> None:
    vm = await qemu_factory("tls", tls_dir=tls_material.directory, password="pw")
    info = await vm.execute("query-spice")
    assert info["tls-port"] == vm.spice_tls_port
    assert info["port"] == vm.spice_port
    assert info["auth"] == "spice"
    ca = tls_material.ca_cert
    assert await spice_link("127.0.0.1", vm.spice_tls_port, "pw", ca_file=ca) == 0
    assert await spice_link("127.0.0.1", vm.spice_tls_port, "no", ca_file=ca) == 7


@pytest.mark.qemu
async def test_early_exit_is_a_lab_error_with_qemu_message(qemu_factory: QemuGroup) -> None:
    with pytest.raises(LabError, match="no-such-device-model") as info:
        await qemu_factory("bad", extra_args=["-device", "no-such-device-model"])
    assert "exited" in str(info.value)
    assert qemu_factory.started == []


@pytest.mark.qemu
async def test_taken_port_fixed_fails_auto_port_retries(
    qemu_factory: QemuGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with pytest.raises(LabError, match="exited") as info:
            await qemu_factory("fixed", spice_port=taken)
        assert "spice" in str(info.value).lower()
        # An auto-chosen port that someone takes before QEMU binds it: retried with new ports.
        real = ports_mod.free_tcp_ports
        handed: list[list[int]] = []

        def first_taken(count: int, host: str = "127.0.0.1") -> list[int]:
            ports = [taken] if not handed else real(count, host)
            handed.append(ports)
            return ports

        monkeypatch.setattr(qemu_mod, "free_tcp_ports", first_taken)
        vm = await qemu_factory("auto")
        assert len(handed) == 2
        assert vm.spice_port == handed[1][0] != taken


@pytest.mark.qemu
async def test_tls_dir_without_files_is_config_error(
    qemu_factory: QemuGroup, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"ca-cert\.pem"):
        await qemu_factory("notls", tls_dir=tmp_path)


@pytest.mark.qemu
async def test_same_name_twice_in_one_workdir_is_refused(qemu_factory: QemuGroup) -> None:
    first = await qemu_factory("twin")
    with pytest.raises(ConfigError, match="already runs"):
        await qemu_factory("twin")
    assert first.is_running()
    assert (await first.execute("query-status"))["status"] == "running"
    await first.stop()
    again = await qemu_factory("twin")  # a stale pidfile would not block either
    assert again.is_running()


@pytest.mark.qemu
async def test_overlong_socket_path_is_config_error(qemu_factory: QemuGroup) -> None:
    deep = qemu_factory.workdir / ("d" * 100)
    with pytest.raises(ConfigError, match="unix socket"):
        await qemu_factory("long", workdir=deep)


@pytest.mark.qemu
async def test_stop_kills_a_qemu_that_ignores_sigterm(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("stubborn")
    os.kill(vm.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    await vm.stop(timeout=0.3)
    # stop() returns only once the process is reaped: the status is known at once
    assert vm.returncode == -signal.SIGKILL
    assert not vm.is_running()
    await vm.stop()  # idempotent


@pytest.mark.qemu
async def test_stop_returns_with_the_exit_status_known(qemu_factory: QemuGroup) -> None:
    """A QEMU that honours SIGTERM: no SIGKILL, and returncode is set when stop() returns."""
    vm = await qemu_factory("polite")
    await vm.stop(timeout=60)
    assert vm.returncode in (0, -signal.SIGTERM)
    assert not vm.is_running()
    assert not vm.qmp_path.exists()


@pytest.mark.qemu
async def test_incoming_defer_and_firmware_migration(qemu_factory: QemuGroup) -> None:
    """The runtime carries a real migration: dst waits in inmigrate, src moves to it."""
    src = await qemu_factory("src")
    dst = await qemu_factory("dst", incoming="defer")
    assert (await dst.execute("query-status"))["status"] == "inmigrate"
    port = ports_mod.free_tcp_port()
    await dst.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
    async with src.qmp() as q:
        caps = [{"capability": "events", "state": True}]
        await q.execute("migrate-set-capabilities", {"capabilities": caps})
        # awaited on QEMU's MIGRATION events (a generous bound), not polled
        with q.listen(listener := EventListener("MIGRATION")):
            await q.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            async with asyncio.timeout(120):
                async for event in listener:
                    data: dict[str, Any] = event["data"]  # type: ignore[assignment]
                    state = data["status"]
                    if state in ("completed", "failed", "cancelled"):
                        break
    assert state == "completed"
    assert (await dst.execute("query-status"))["status"] == "running"


@pytest.mark.qemu
async def test_qmp_errors_are_typed(qemu_factory: QemuGroup) -> None:
    vm = await qemu_factory("q")
    with pytest.raises(QMPError, match="no-such-command"):
        await vm.execute("no-such-command")
    await vm.stop()
    with pytest.raises(QMPError, match="cannot connect"):
        await vm.execute("query-status")


class _Boom(Exception):
    pass


@pytest.mark.qemu
async def test_group_stops_everything_when_the_body_fails(lab_dir: Path) -> None:
    started: list[qemu_mod.QemuInstance] = []

    async def body() -> None:
        async with QemuGroup(lab_dir) as vms:
            started.append(await vms())
            started.append(await vms(incoming="defer"))
            assert all(vm.is_running() for vm in started)
            raise _Boom

    with pytest.raises(_Boom):
        await body()
    assert len(started) == 2
    assert not any(vm.is_running() for vm in started)
