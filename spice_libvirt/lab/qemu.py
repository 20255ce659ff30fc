"""Start and stop the lab's QEMU processes, with SPICE, QMP and a stream port.

This is the one place that knows how a lab VM's command line looks; every test, lab and
benchmark starts its QEMUs through :func:`start_qemu` so that all of them get the same
channel set (qxl display, virtio-serial with a ``spiceport`` chardev) and the same
hygiene on a machine other people's QEMUs share:

* the process is ours: spawned directly (never ``-daemonize``), so we know its PID from
  the start, stop it by that PID only, and reap it; ``-pidfile`` is written as well for
  anyone inspecting the work directory;
* every listening port is chosen free (:mod:`spice_libvirt.lab.ports`) unless the spec
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

from pydantic import BaseModel, ConfigDict, Field, model_validator
from qemu.qmp import QMPClient
from qemu.qmp import QMPError as _QMPLibError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from spice_libvirt.errors import ConfigError, LabError, QMPError
from spice_libvirt.lab import guest as guest_mod
from spice_libvirt.lab.guest import GuestImages
from spice_libvirt.lab.ports import free_tcp_ports
from spice_libvirt.lab.procs import proc_start_time, same_process_alive
from spice_libvirt.lab.tls import CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE

log = logging.getLogger(__name__)

#: The QEMU binary; ``SPICE_LIBVIRT_QEMU`` overrides it (e.g. a self-built QEMU).
DEFAULT_QEMU_BINARY = "qemu-system-x86_64"
#: Longest path a unix socket address can hold on Linux (sun_path is 108 bytes, NUL included).
_SUN_PATH_MAX = 107
#: CPU model under KVM. Plain ``host`` aborts QEMU 7.2 on nested PVM (``kvm_pvm``): "failed
#: to set MSR 0x10a" (IA32_ARCH_CAPABILITIES) then an assertion in kvm_buf_set_msrs. Hiding
#: that one feature works everywhere and costs the lab nothing (it only tells the guest which
#: CPU vulnerabilities the host mitigates).
KVM_CPU = "host,-arch-capabilities"
#: CPU model under TCG: everything TCG can emulate.
TCG_CPU = "max"
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


class QemuSpec(BaseModel):
    """Everything that decides a lab VM's command line; see :func:`qemu_argv`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    guest: Literal["firmware", "linux"] = "firmware"
    memory_mib: int = Field(default=128, ge=16, le=65536)
    #: ``auto``: :func:`spice_libvirt.lab.guest.default_accel` (KVM for firmware, TCG for
    #: linux unless SPICE_LIBVIRT_LINUX_ACCEL says otherwise)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    spice_host: str = "127.0.0.1"
    #: None: pick a free port
    spice_port: int | None = Field(default=None, ge=1, le=65535)
    #: only together with ``tls_dir``; None there: pick a free port
    spice_tls_port: int | None = Field(default=None, ge=1, le=65535)
    #: x509-dir with ca-cert.pem, server-cert.pem, server-key.pem (see lab.tls)
    tls_dir: Path | None = None
    #: None: ``disable-ticketing=on``; else ticketing on, password set over QMP after start
    password: str | None = None
    seamless_migration: bool = True
    #: virtio-serial port (and spiceport chardev) name; None: no stream port at all
    stream_port_name: str | None = guest_mod.STREAM_PORT_NAME
    #: chardev backend for the stream port instead of ``spiceport`` (e.g.
    #: "socket,path=/x.sock,server=on,wait=off"): checks the guest's writer without SPICE
    stream_chardev: str | None = None
    #: ``-incoming`` value, e.g. "tcp:127.0.0.1:PORT" or "defer"
    incoming: str | None = None
    #: linux guest only: MiB the in-guest dirtier keeps dirty, and its pause between passes
    dirty_mb: int = Field(default=0, ge=0)
    dirty_ms: int = Field(default=20, ge=0)
    #: sockets, serial log, QEMU log and pidfile live here (created if missing)
    workdir: Path
    #: appended verbatim to the command line (lab experiments only)
    extra_args: list[str] = Field(default_factory=list)
    qemu_binary: str = Field(
        default_factory=lambda: os.environ.get("SPICE_LIBVIRT_QEMU", DEFAULT_QEMU_BINARY)
    )

    @model_validator(mode="after")
    def _coherent(self) -> QemuSpec:
        if self.spice_tls_port is not None and self.tls_dir is None:
            raise ValueError("spice_tls_port needs tls_dir")
        if self.dirty_mb and self.guest != "linux":
            raise ValueError("dirty_mb needs the linux guest")
        if self.dirty_mb >= self.memory_mib:
            raise ValueError(f"dirty_mb={self.dirty_mb} does not fit in {self.memory_mib} MiB")
        if self.password is not None and ("," in self.password or not self.password):
            # QMP takes any string, but an empty one would silently mean "no access".
            raise ValueError("password must be non-empty and must not contain ','")
        if self.stream_port_name is not None and "," in self.stream_port_name:
            raise ValueError("stream_port_name must not contain ','")
        return self

    # Paths are derived from the name so that two VMs may share one workdir.
    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"{self.name}.qmp"

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"{self.name}.serial"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return self.workdir / f"{self.name}.pid"


def resolve_accel(spec: QemuSpec) -> Literal["kvm", "tcg"]:
    """The accelerator ``spec`` gets on this host; explicit KVM must be usable."""
    if spec.accel == "auto":
        return guest_mod.default_accel(spec.guest)
    if spec.accel == "kvm" and not guest_mod.kvm_usable():
        raise LabError("accel=kvm was asked for, but /dev/kvm is missing or not accessible")
    return spec.accel


def kernel_cmdline(spec: QemuSpec) -> str:
    """The kernel arguments the linux guest's /init reads (see ``guest/init``)."""
    parts = ["console=ttyS0", "quiet", "panic=-1"]
    parts.append(f"portname={spec.stream_port_name or 'none'}")
    if spec.dirty_mb:
        parts += [f"dirty_mb={spec.dirty_mb}", f"dirty_ms={spec.dirty_ms}"]
    return " ".join(parts)


def qemu_argv(
    spec: QemuSpec,
    *,
    spice_port: int | None = None,
    spice_tls_port: int | None = None,
    accel: Literal["kvm", "tcg"] | None = None,
    images: GuestImages | None = None,
) -> list[str]:
    """The full QEMU command line for ``spec``; pure apart from resolving ``accel="auto"``.

    ``spice_port``/``spice_tls_port`` fill in ports the spec leaves to be chosen, ``accel``
    overrides the spec's, ``images`` is required for the linux guest.
    """
    port = spec.spice_port if spec.spice_port is not None else spice_port
    if port is None:
        raise ConfigError("qemu_argv needs a SPICE port: set spec.spice_port or pass spice_port")
    tls_port = spec.spice_tls_port if spec.spice_tls_port is not None else spice_tls_port
    if spec.tls_dir is not None and tls_port is None:
        raise ConfigError("TLS needs a port: set spec.spice_tls_port or pass spice_tls_port")
    accel = accel or resolve_accel(spec)

    argv = [spec.qemu_binary, "-name", f"{spec.name},debug-threads=on"]
    argv += ["-machine", "pc", "-accel", accel, "-cpu", KVM_CPU if accel == "kvm" else TCG_CPU]
    argv += ["-m", str(spec.memory_mib), "-smp", "1"]
    argv += ["-nodefaults", "-vga", "qxl", "-display", "none", "-msg", "timestamp=on"]

    spice = [
        f"port={port}",
        f"addr={spec.spice_host}",
        f"seamless-migration={'on' if spec.seamless_migration else 'off'}",
    ]
    if spec.tls_dir is not None:
        spice += [f"tls-port={tls_port}", f"x509-dir={spec.tls_dir}"]
    if spec.password is None:
        spice.append("disable-ticketing=on")
    argv += ["-spice", ",".join(spice)]

    if spec.stream_port_name is not None:
        argv += ["-device", "virtio-serial-pci,id=vser0"]
        backend = spec.stream_chardev or f"spiceport,name={spec.stream_port_name}"
        kind, _, options = backend.partition(",")
        argv += ["-chardev", ",".join(filter(None, [kind, "id=stream0", options]))]
        argv += [
            "-device",
            f"virtserialport,bus=vser0.0,chardev=stream0,name={spec.stream_port_name}",
        ]

    if spec.guest == "linux":
        if images is None:
            raise ConfigError("the linux guest needs its built images (lab.guest)")
        argv += ["-kernel", str(images.kernel), "-initrd", str(images.initrd)]
        argv += ["-append", kernel_cmdline(spec), "-no-reboot"]

    argv += ["-serial", f"file:{spec.serial_log}"]
    argv += ["-qmp", f"unix:{spec.qmp_path},server=on,wait=off"]
    argv += ["-pidfile", str(spec.pidfile)]
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    argv += spec.extra_args
    return argv


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
        images: GuestImages | None,
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

    async def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._gone():
                return True
            await asyncio.sleep(0.02)
        return self._gone()

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; waits until reaped. Idempotent."""
        if not self._gone():
            self._signal(signal.SIGTERM)
            if not await self._wait_gone(timeout):
                log.warning("%s did not exit on SIGTERM within %.1f s; killing", self, timeout)
                self._signal(signal.SIGKILL)
                if not await self._wait_gone(10.0):
                    raise LabError(f"QEMU {self.spec.name} (pid {self.pid}) survived SIGKILL")
        self._cleanup_files()

    def stop_sync(self, timeout: float = 5.0) -> None:
        """:meth:`stop` for places without a running event loop (atexit, finalizers)."""
        if not self._gone():
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self._gone() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not self._gone():
                self._signal(signal.SIGKILL)
                deadline = time.monotonic() + 10.0
                while not self._gone() and time.monotonic() < deadline:
                    time.sleep(0.02)
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.qmp_path.unlink(missing_ok=True)
            self.pidfile.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def qmp(self, timeout: float = 5.0) -> AsyncIterator[QMPClient]:
        """A QMP session for the ``async with`` block (the socket takes one client at a time)."""
        client = QMPClient(self.spec.name)
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
        client = QMPClient(inst.spec.name)
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
    images: GuestImages | None,
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
    spec: QemuSpec, *, timeout: float = 20.0, images: GuestImages | None = None
) -> QemuInstance:
    """Start a VM for ``spec``; returns once QMP answers (and the password is set).

    The linux guest is built first if it is not cached yet (that build is not counted in
    ``timeout``; pass ``images`` to use a specific build). On any failure the process is
    stopped before the error propagates, so nothing is left running.
    """
    _check_spec_files(spec)
    accel = resolve_accel(spec)
    if spec.guest == "linux" and images is None:
        images = await asyncio.to_thread(guest_mod.ensure_linux_guest)
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
    deadline = time.monotonic() + timeout
    while True:
        if not inst.is_running():
            raise LabError(
                f"QEMU {inst.spec.name} exited while the guest was booting:\n{inst.log_tail()}"
            )
        if inst.spec.guest == "firmware" or guest_mod.READY_MARKER in inst.serial_text():
            return
        if time.monotonic() > deadline:
            serial = "\n".join(inst.serial_text().splitlines()[-10:]) or "(serial log is empty)"
            raise LabError(
                f"guest {inst.spec.name} printed no {guest_mod.READY_MARKER} within"
                f" {timeout:.0f} s; serial:\n{serial}"
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
        images: GuestImages | None = None,
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
        self, spec: QemuSpec, *, timeout: float = 20.0, images: GuestImages | None = None
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
