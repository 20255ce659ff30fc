"""Start and stop the lab's QEMU processes, with SPICE, QMP and a stream port.

This is the one place that knows how a lab VM's command line looks; every test, lab and
benchmark starts its QEMUs through :func:`start_qemu` so that all of them get the same
channel set (qxl display, virtio-serial with a ``spiceport`` chardev) and the same
hygiene on a machine other people's QEMUs share:

* the process is ours: spawned directly (never ``-daemonize``), so we know its PID from
  the start, stop it by that PID only, and reap it; ``-pidfile`` is written as well for
  anyone inspecting the work directory;
* every listening port is chosen free (:mod:`spice_libvirt_lab.ports`) unless the spec
  fixes it, and a start that loses the race for an auto-chosen port is retried with new
  ports;
* QEMU's stdout/stderr go to ``<workdir>/<name>.log``; if QEMU exits before its QMP
  socket answers, :class:`~spice_libvirt.errors.LabError` carries the last lines of that
  log, which is where QEMU says what was wrong;
* the SPICE password never appears on the command line (``ps`` would show it): the VM
  starts with ticketing on and no password, and the password is set over QMP
  (``set_password``) before :func:`start_qemu` returns.

A QEMU QMP unix socket serves one client at a time; :func:`start_qemu` disconnects its
own session before returning, so the socket is free for the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Literal

from qemu.qmp import QMPError as _QMPLibError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from spice_libvirt.errors import ConfigError, LabError, QMPError
from spice_libvirt.qemu.qmp import NegotiatingClient
from spice_libvirt_lab import guest as guest_mod
from spice_libvirt_lab.guest import GuestImages
from spice_libvirt_lab.memcheck import READY_MARKER as MEMCHECK_READY
from spice_libvirt_lab.memcheck import MemcheckImage, ensure_memcheck_guest
from spice_libvirt_lab.ports import free_tcp_ports
from spice_libvirt_lab.procs import (
    proc_start_time,
    same_process_alive,
    wait_exit,
    wait_exit_async,
)
from spice_libvirt_lab.qemu_spec import (
    DEFAULT_QEMU_BINARY,
    KVM_CPU,
    TCG_CPU,
    QemuSpec,
    kernel_cmdline,
    qemu_argv,
    resolve_accel,
)
from spice_libvirt_lab.tls import CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE

log = logging.getLogger(__name__)

#: Longest path a unix socket address can hold on Linux (sun_path is 108 bytes, NUL included).
_SUN_PATH_MAX = 107
#: How often a start is retried when an auto-chosen port was taken in the meantime.
_PORT_RETRIES = 3
#: What QEMU 7.2 / spice-server 0.15 print when a listening port is taken ("reds_init_socket:
#: binding socket to 127.0.0.1:P failed", "Failed to open SPICE sockets"), plus the generic
#: socket error text of other listeners (migration -incoming).
_PORT_CONFLICT_MARKERS = (
    "Failed to open SPICE sockets",
    "binding socket to",
    "Address already in use",
)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept) if kept else "(log is empty)"


class QemuInstance:
    """A QEMU process this program started; :meth:`stop` ends it (by PID only)."""

    def __init__(
        self,
        spec: QemuSpec,
        process: asyncio.subprocess.Process,
        *,
        argv: list[str],
        spice_port: int,
        spice_tls_port: int | None,
        accel: Literal["kvm", "tcg"],
        images: GuestImages | MemcheckImage | None,
    ) -> None:
        self.spec = spec
        self.pid: int = process.pid
        self.argv = argv
        self.spice_port = spice_port
        self.spice_tls_port = spice_tls_port
        self.accel = accel
        self.images = images
        self.qmp_path = spec.qmp_path
        self.serial_log = spec.serial_log
        self.log_path = spec.log_path
        self.pidfile = spec.pidfile
        self._process = process
        self._start_time = proc_start_time(process.pid)
        self._loop = asyncio.get_running_loop()
        self._stopped = False

    def __repr__(self) -> str:
        return (
            f"<QemuInstance {self.spec.name} pid={self.pid} spice={self.spice_port}"
            f" tls={self.spice_tls_port} accel={self.accel}>"
        )

    @property
    def command_line(self) -> str:
        """The exact command line, shell-quoted (also saved as ``<name>.cmdline``)."""
        return shlex.join(self.argv)

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def is_running(self) -> bool:
        """True while our QEMU process exists and is not a zombie."""
        if self._process.returncode is not None:
            return False
        return same_process_alive(self.pid, self._start_time)

    def log_tail(self, lines: int = 15) -> str:
        """The last non-empty lines QEMU wrote to stdout/stderr."""
        return _tail(self.log_path, lines)

    def serial_text(self) -> str:
        """What the guest wrote to its serial console so far."""
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def _signal(self, sig: signal.Signals) -> None:
        if proc_start_time(self.pid) != self._start_time:
            return  # not our process any more: never signal a stranger
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _gone(self) -> bool:
        return proc_start_time(self.pid) != self._start_time or self._process.returncode is not None

    async def _wait_reaped(self, timeout: float) -> bool:
        """Until the process is reaped and :attr:`returncode` is set; False after ``timeout``.

        The child watcher reaps the process and sets the return code a moment later; waiting
        on :meth:`asyncio.subprocess.Process.wait` (an event, not a poll of ``/proc``) is
        what makes :attr:`returncode` reliable once :meth:`stop` returns. From another
        event loop than the one that started QEMU, the process's end is awaited on a pidfd.
        """
        try:
            if asyncio.get_running_loop() is self._loop:
                async with asyncio.timeout(timeout):
                    await self._process.wait()
                return True
        except TimeoutError:
            return False
        return await wait_exit_async(self.pid, self._start_time, timeout)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; waits until reaped. Idempotent."""
        if self._process.returncode is None:
            self._signal(signal.SIGTERM)
            if not await self._wait_reaped(timeout):
                log.warning("%s did not exit on SIGTERM within %.1f s; killing", self, timeout)
                self._signal(signal.SIGKILL)
                if not await self._wait_reaped(30.0):
                    raise LabError(f"QEMU {self.spec.name} (pid {self.pid}) survived SIGKILL")
        self._cleanup_files()

    def stop_sync(self, timeout: float = 5.0) -> None:
        """:meth:`stop` for places without a running event loop (atexit, finalizers).

        Waits for the process to end (pidfd), not for the reaping, which is the event
        loop's child watcher's business.
        """
        if not self._gone():
            self._signal(signal.SIGTERM)
            if not wait_exit(self.pid, self._start_time, timeout):
                self._signal(signal.SIGKILL)
                wait_exit(self.pid, self._start_time, 30.0)
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.qmp_path.unlink(missing_ok=True)
            self.pidfile.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def qmp(self, timeout: float = 5.0) -> AsyncIterator[NegotiatingClient]:
        """A QMP session for the ``async with`` block (the socket takes one client at a time)."""
        client = NegotiatingClient(self.spec.name)
        try:
            await asyncio.wait_for(client.connect(str(self.qmp_path)), timeout)
        except (OSError, _QMPLibError, TimeoutError) as exc:
            raise QMPError(f"cannot connect to QMP of {self.spec.name}: {exc}") from exc
        try:
            yield client
        finally:
            await client.disconnect()

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 10.0
    ) -> Any:
        """Run one QMP command in its own short session; failures become ``QMPError``."""
        async with self.qmp() as client:
            try:
                return await asyncio.wait_for(client.execute(command, arguments), timeout)
            except (_QMPLibError, TimeoutError) as exc:
                raise QMPError(f"{command} on {self.spec.name} failed: {exc}") from exc


class _NotReady(Exception):
    """QMP did not answer yet; tenacity retries on this one only."""


def _live_owner(spec: QemuSpec) -> int | None:
    """PID of a running QEMU that owns this spec's pidfile and QMP socket, if any.

    Starting a second VM of the same name in the same workdir would delete the first one's
    QMP socket; this is checked by PID and command line, so a stale pidfile is harmless.
    """
    try:
        pid = int(spec.pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if f"unix:{spec.qmp_path},server=on,wait=off".encode() in cmdline:
        return pid
    return None


def _check_spec_files(spec: QemuSpec) -> None:
    longest = len(os.fsencode(spec.qmp_path))
    if longest > _SUN_PATH_MAX:
        raise ConfigError(
            f"QMP socket path {spec.qmp_path} is {longest} bytes, more than a unix socket"
            f" address holds ({_SUN_PATH_MAX}); use a shorter workdir or name"
        )
    owner = _live_owner(spec)
    if owner is not None:
        raise ConfigError(
            f"a QEMU named {spec.name} already runs in {spec.workdir} (pid {owner});"
            " pick another name or workdir"
        )
    if spec.tls_dir is not None:
        for name in (CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE):
            if not (spec.tls_dir / name).is_file():
                raise ConfigError(f"tls_dir {spec.tls_dir} has no {name} (see lab.tls)")


async def _wait_qmp(inst: QemuInstance, deadline: float) -> None:
    """Until QMP greets us: a dead QEMU is a LabError, a slow one is retried."""

    async def attempt() -> None:
        if not inst.is_running():
            code = await _reap(inst)
            raise LabError(
                f"QEMU {inst.spec.name} exited (status {code}) before QMP was ready:\n"
                + inst.log_tail()
            )
        if not inst.qmp_path.exists():
            raise _NotReady
        client = NegotiatingClient(inst.spec.name)
        try:
            await asyncio.wait_for(client.connect(str(inst.qmp_path)), 1.0)
        except (OSError, _QMPLibError, TimeoutError) as exc:
            raise _NotReady from exc
        await client.disconnect()

    budget = max(0.1, deadline - time.monotonic())
    try:
        async for try_ in AsyncRetrying(
            retry=retry_if_exception_type(_NotReady),
            stop=stop_after_delay(budget),
            wait=wait_fixed(0.05),
            reraise=True,
        ):
            with try_:
                await attempt()
    except _NotReady:
        raise LabError(
            f"QEMU {inst.spec.name} did not answer on QMP within {budget:.1f} s:\n"
            + inst.log_tail()
        ) from None


async def _reap(inst: QemuInstance) -> int | None:
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(inst._process.wait(), 2.0)
    return inst.returncode


async def _spawn(
    spec: QemuSpec,
    argv: list[str],
    *,
    spice_port: int,
    spice_tls_port: int | None,
    accel: Literal["kvm", "tcg"],
    images: GuestImages | MemcheckImage | None,
) -> QemuInstance:
    for stale in (spec.qmp_path, spec.pidfile, spec.serial_log):
        stale.unlink(missing_ok=True)
    (spec.workdir / f"{spec.name}.cmdline").write_text(shlex.join(argv) + "\n")
    with spec.log_path.open("wb") as logfile:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile
            )
        except FileNotFoundError as exc:
            raise LabError(f"{argv[0]} is not installed (run scripts/setup.sh)") from exc
    return QemuInstance(
        spec,
        process,
        argv=argv,
        spice_port=spice_port,
        spice_tls_port=spice_tls_port,
        accel=accel,
        images=images,
    )


async def start_qemu(
    spec: QemuSpec, *, timeout: float = 20.0, images: GuestImages | MemcheckImage | None = None
) -> QemuInstance:
    """Start a VM for ``spec``; returns once QMP answers (and the password is set).

    The linux and the memcheck guest are built first if not cached yet (that build is not
    counted in ``timeout``; pass ``images`` to use a specific build). On any failure the process is
    stopped before the error propagates, so nothing is left running.
    """
    _check_spec_files(spec)
    accel = resolve_accel(spec)
    if spec.guest == "linux" and images is None:
        images = await asyncio.to_thread(guest_mod.ensure_linux_guest)
    elif spec.guest == "memcheck" and images is None:
        images = await asyncio.to_thread(ensure_memcheck_guest)
    spec.workdir.mkdir(parents=True, exist_ok=True)
    auto_ports = spec.spice_port is None or (
        spec.tls_dir is not None and spec.spice_tls_port is None
    )
    attempts = _PORT_RETRIES if auto_ports else 1
    for attempt in range(1, attempts + 1):
        wanted = 2 if spec.tls_dir is not None else 1
        picked = free_tcp_ports(wanted, spec.spice_host)
        port = spec.spice_port if spec.spice_port is not None else picked[0]
        tls_port = None
        if spec.tls_dir is not None:
            tls_port = spec.spice_tls_port if spec.spice_tls_port is not None else picked[1]
        argv = qemu_argv(spec, spice_port=port, spice_tls_port=tls_port, accel=accel, images=images)
        log.debug("starting %s: %s", spec.name, shlex.join(argv))
        inst = await _spawn(
            spec, argv, spice_port=port, spice_tls_port=tls_port, accel=accel, images=images
        )
        try:
            await _wait_qmp(inst, time.monotonic() + timeout)
            if spec.password is not None:
                await inst.execute("set_password", {"protocol": "spice", "password": spec.password})
        except LabError as exc:
            await inst.stop()
            conflict = any(m in inst.log_tail(40) for m in _PORT_CONFLICT_MARKERS)
            if conflict and attempt < attempts:
                log.info("%s lost a port race (%s); retrying with new ports", spec.name, exc)
                continue
            raise
        except BaseException:
            await inst.stop()
            raise
        return inst
    raise AssertionError("unreachable")  # pragma: no cover


async def wait_guest_ready(inst: QemuInstance, timeout: float = 60.0) -> None:
    """Until the guest can be used: for linux, /init printed GUEST-READY on the serial log.

    Only for a VM that boots (not ``incoming``): a migration destination's serial log
    starts empty, because the guest booted on the source. The firmware guest has nothing
    to wait for once QEMU runs. Raises :class:`LabError`
    with the serial and QEMU log tails if QEMU dies or the marker does not appear in time.
    """
    if inst.spec.guest == "firmware":
        if not inst.is_running():
            raise LabError(f"QEMU {inst.spec.name} is not running:\n{inst.log_tail()}")
        return
    marker = MEMCHECK_READY if inst.spec.guest == "memcheck" else guest_mod.READY_MARKER
    await wait_serial(inst, marker, timeout)


async def wait_serial(inst: QemuInstance, text: str, timeout: float) -> None:
    """Until the guest wrote ``text`` on its serial console.

    The console is a file QEMU appends to; there is no event to await, so it is re-read
    every 50 ms under one deadline. :class:`LabError` if QEMU dies or the time runs out.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not inst.is_running():
            raise LabError(
                f"QEMU {inst.spec.name} exited while the guest was booting:\n{inst.log_tail()}"
            )
        if text in inst.serial_text():
            return
        if time.monotonic() > deadline:
            serial = "\n".join(inst.serial_text().splitlines()[-10:]) or "(serial log is empty)"
            raise LabError(
                f"guest {inst.spec.name} printed no {text} within {timeout:.0f} s; serial:\n{serial}"
            )
        await asyncio.sleep(0.05)


class QemuGroup:
    """Starts VMs in one work directory and stops every one of them together.

    Tests and labs use it so that a failure half-way through never leaves a QEMU behind::

        async with QemuGroup(workdir) as vms:
            src = await vms.start(name="src")
            dst = await vms.start(name="dst", incoming="defer")
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[QemuInstance] = []
        self._counter = 0

    async def __call__(
        self,
        name: str | None = None,
        *,
        timeout: float = 20.0,
        images: GuestImages | MemcheckImage | None = None,
        **fields: Any,
    ) -> QemuInstance:
        """Start a VM; keyword arguments are :class:`QemuSpec` fields (workdir filled in)."""
        if name is None:
            name = f"vm{self._counter}"
            self._counter += 1
        fields.setdefault("workdir", self.workdir)
        return await self.start_spec(QemuSpec(name=name, **fields), timeout=timeout, images=images)

    start = __call__

    async def start_spec(
        self,
        spec: QemuSpec,
        *,
        timeout: float = 20.0,
        images: GuestImages | MemcheckImage | None = None,
    ) -> QemuInstance:
        inst = await start_qemu(spec, timeout=timeout, images=images)
        self.started.append(inst)
        return inst

    async def stop_all(self) -> None:
        """Stop every VM started here (newest first); the first error is raised at the end."""
        first: BaseException | None = None
        for inst in reversed(self.started):
            try:
                await inst.stop()
            except Exception as exc:
                first = first or exc
                inst.stop_sync()
        if first is not None:
            raise first

    async def __aenter__(self) -> QemuGroup:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop_all()


__all__ = [
    "DEFAULT_QEMU_BINARY",
    "KVM_CPU",
    "TCG_CPU",
    "QemuGroup",
    "QemuInstance",
    "QemuSpec",
    "kernel_cmdline",
    "qemu_argv",
    "resolve_accel",
    "start_qemu",
    "wait_guest_ready",
    "wait_serial",
]
