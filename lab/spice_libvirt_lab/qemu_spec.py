"""A lab VM's command line: the spec that decides it, and the pure function that writes it.

Kept apart from process handling (:mod:`spice_libvirt_lab.qemu_process`) so that the one place that
knows how a lab VM looks can be read, and tested, without starting anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt_lab import guest as guest_mod
from spice_libvirt_lab.guest import GuestImages
from spice_libvirt_lab.memcheck import MemcheckImage, MemcheckOptions

#: The QEMU binary; ``SPICE_LIBVIRT_QEMU`` overrides it (e.g. a self-built QEMU).
DEFAULT_QEMU_BINARY = "qemu-system-x86_64"
#: CPU model under KVM. Plain ``host`` aborts QEMU 7.2 on nested PVM (``kvm_pvm``): "failed
#: to set MSR 0x10a" (IA32_ARCH_CAPABILITIES) then an assertion in kvm_buf_set_msrs. Hiding
#: that one feature works everywhere and costs the lab nothing (it only tells the guest which
#: CPU vulnerabilities the host mitigates).
KVM_CPU = "host,-arch-capabilities"
#: CPU model under TCG: everything TCG can emulate.
TCG_CPU = "max"
#: what QEMU's ``tls-channel=`` accepts (spice-server's channel names, and "default")
_SPICE_CHANNEL_NAMES = frozenset(
    {
        "default",
        "main",
        "display",
        "inputs",
        "cursor",
        "playback",
        "record",
        "smartcard",
        "usbredir",
        "port",
        "webdav",
    }
)


class QemuSpec(BaseModel):
    """Everything that decides a lab VM's command line; see :func:`qemu_argv`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    guest: Literal["firmware", "linux", "memcheck"] = "firmware"
    memory_mib: int = Field(default=128, ge=8, le=65536)
    #: ``auto``: :func:`spice_libvirt_lab.guest.default_accel` (KVM for firmware, TCG for
    #: linux unless SPICE_LIBVIRT_LINUX_ACCEL says otherwise)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    spice_host: str = "127.0.0.1"
    #: None: pick a free port
    spice_port: int | None = Field(default=None, ge=1, le=65535)
    #: only together with ``tls_dir``; None there: pick a free port
    spice_tls_port: int | None = Field(default=None, ge=1, le=65535)
    #: x509-dir with ca-cert.pem, server-cert.pem, server-key.pem (see lab.tls)
    tls_dir: Path | None = None
    #: channels spice-server refuses in plain text (``-spice tls-channel=X``; "default" =
    #: every channel not named otherwise): a plain link to them gets NEED_SECURED, which is
    #: what keeps a TLS client on TLS *and* lets spice-gtk pre-link
    tls_channels: list[str] = Field(default_factory=list)
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
    #: memcheck guest only (None there: the defaults); ``memory_mib`` must hold its RAM
    memcheck: MemcheckOptions | None = None
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
        if self.tls_channels and self.tls_dir is None:
            raise ValueError("tls_channels needs tls_dir")
        for channel in self.tls_channels:
            if channel not in _SPICE_CHANNEL_NAMES:
                raise ValueError(f"unknown SPICE channel {channel!r} in tls_channels")
        if self.dirty_mb and self.guest != "linux":
            raise ValueError("dirty_mb needs the linux guest")
        if self.dirty_mb >= self.memory_mib:
            raise ValueError(f"dirty_mb={self.dirty_mb} does not fit in {self.memory_mib} MiB")
        if self.memcheck is not None and self.guest != "memcheck":
            raise ValueError("memcheck options need the memcheck guest")
        if self.guest == "memcheck" and self.memory_mib < self.memcheck_options.memory_mib:
            raise ValueError(
                f"the memcheck guest needs {self.memcheck_options.memory_mib} MiB of RAM for "
                f"its {self.memcheck_options.working_set_mib} MiB working set, not "
                f"{self.memory_mib}"
            )
        if self.password is not None and ("," in self.password or not self.password):
            # QMP takes any string, but an empty one would silently mean "no access".
            raise ValueError("password must be non-empty and must not contain ','")
        if self.stream_port_name is not None and "," in self.stream_port_name:
            raise ValueError("stream_port_name must not contain ','")
        return self

    @property
    def memcheck_options(self) -> MemcheckOptions:
        return self.memcheck or MemcheckOptions()

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
    images: GuestImages | MemcheckImage | None = None,
) -> list[str]:
    """The full QEMU command line for ``spec``; pure apart from resolving ``accel="auto"``.

    ``spice_port``/``spice_tls_port`` fill in ports the spec leaves to be chosen, ``accel``
    overrides the spec's, ``images`` is required for the linux and the memcheck guest.
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
        spice += [f"tls-channel={channel}" for channel in spec.tls_channels]
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
        if not isinstance(images, GuestImages):
            raise ConfigError("the linux guest needs its built images (lab.guest)")
        argv += ["-kernel", str(images.kernel), "-initrd", str(images.initrd)]
        argv += ["-append", kernel_cmdline(spec), "-no-reboot"]
    elif spec.guest == "memcheck":
        if not isinstance(images, MemcheckImage):
            raise ConfigError("the memcheck guest needs its built image (lab.memcheck)")
        argv += ["-kernel", str(images.image), "-append", spec.memcheck_options.cmdline()]
        argv += ["-no-reboot"]

    argv += ["-serial", f"file:{spec.serial_log}"]
    argv += ["-qmp", f"unix:{spec.qmp_path},server=on,wait=off"]
    argv += ["-pidfile", str(spec.pidfile)]
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    argv += spec.extra_args
    return argv
