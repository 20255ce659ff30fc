"""The libvirt lab guest's domain XML, rendered from the templates beside this module."""

from __future__ import annotations

import os
import string
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from spice_libvirt.errors import ConfigError
from spice_libvirt_lab import guest as guest_images
from spice_libvirt_lab.libvirt_state import (
    DEFAULT_DOMAIN,
    PORT_CHANNEL,
    TLS_LAB_PORT,
    TLS_LAB_TLS_PORT,
    GuestKind,
    TlsMode,
)
from spice_libvirt_lab.memcheck import MemcheckOptions

TEMPLATE = Path(__file__).with_name("templates") / "domain.xml"
TEMPLATE_LINUX = TEMPLATE.with_name("domain-linux.xml")
TEMPLATE_MEMCHECK = TEMPLATE.with_name("domain-memcheck.xml")
#: ``--tls-mode mixed``: the channels that refuse plain text; the others (display, the
#: agent's and the port's data) go as the client chooses
MIXED_SECURE_CHANNELS = ("main", "inputs", "cursor")


#: VDSM's placeholder: ticketing on from the start with a ticket that expired long ago, so
#: nobody links until the manager sets a real one (through libvirt, on the live device).
#: QEMU started without any ticket runs ``disable-ticketing=on`` and then refuses
#: ``set_password`` ("Could not set password").
TICKET_PLACEHOLDER = "passwd='*****' passwdValidTo='1970-01-01T00:00:01'"


def graphics_xml(tls_mode: TlsMode | None = None, *, ticket: bool = False) -> str:
    """The guest's ``<graphics>``: plain (autoport), or TLS as a manager configures it.

    With TLS the ports are fixed (see :data:`~spice_libvirt_lab.libvirt_state.TLS_LAB_PORT`)
    and ``secure`` puts the whole device in ``defaultMode='secure'``: libvirt then starts
    QEMU with ``tls-channel=default``; its plain port refuses every link with NEED_SECURED.
    ``tls-only`` drops the plain port (libvirt then tells clients ``port: 0``, which
    spice-gtk takes as absent: it pre-links on TLS, seamless as well).
    """
    auth = f" {TICKET_PLACEHOLDER}" if ticket else ""
    if tls_mode is None:
        return f"<graphics type='spice' autoport='yes'{auth}><listen type='address'/></graphics>"
    plain = "" if tls_mode == "tls-only" else f" port='{TLS_LAB_PORT}'"
    ports = f"autoport='no'{plain} tlsPort='{TLS_LAB_TLS_PORT}'{auth}"
    if tls_mode in ("secure", "tls-only"):
        return (
            f"<graphics type='spice' {ports} defaultMode='secure'>"
            "<listen type='address'/></graphics>"
        )
    channels = "".join(f"<channel name='{c}' mode='secure'/>" for c in MIXED_SECURE_CHANNELS)
    return f"<graphics type='spice' {ports}><listen type='address'/>{channels}</graphics>"


def render_domain_xml(
    *,
    name: str = DEFAULT_DOMAIN,
    memory_mib: int = 256,
    guest: GuestKind = "firmware",
    emulator: str = "/usr/bin/qemu-system-x86_64",
    machine: str = "pc",
    port_name: str = PORT_CHANNEL,
    tls_mode: TlsMode | None = None,
    ticket: bool = False,
    memcheck: MemcheckOptions | None = None,
    kernel_args: str = "",
) -> str:
    """The lab guest's domain XML from :data:`TEMPLATE` (firmware), :data:`TEMPLATE_LINUX`
    or :data:`TEMPLATE_MEMCHECK`.

    The memcheck guest runs with ``memcheck`` (default: :class:`MemcheckOptions`); its RAM
    is its working set plus what it keeps for itself, whatever ``memory_mib`` says. Its
    accelerator is chosen like the linux guest's (``SPICE_LIBVIRT_MEMCHECK_ACCEL``).
    ``kernel_args`` go on the linux guest's kernel command line (``dirty_mb=32 dirty_ms=20``:
    its memory dirtier, see ``guest/init``).

    The linux guest's kernel and initrd come from :mod:`spice_libvirt_lab.guest` (built into
    its cache on first use), and so does the accelerator choice: TCG unless
    ``SPICE_LIBVIRT_LINUX_ACCEL`` says otherwise, because this machine's nested KVM boots a
    Linux kernel about 100 times too slowly. The firmware guest uses KVM when ``/dev/kvm``
    is usable, with QEMU's default CPU model: ``host-model`` made QEMU abort here on MSR
    0x10a (arch-capabilities) under the nested ``kvm_pvm``.
    """
    if guest != "memcheck" and not 64 <= memory_mib <= 16384:
        raise ConfigError(f"memory must be between 64 and 16384 MiB, not {memory_mib}")
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise ConfigError(f"invalid domain name {name!r}")
    if not port_name or not all(ch.isalnum() or ch in "-_." for ch in port_name):
        raise ConfigError(f"invalid port channel name {port_name!r}")
    common = {
        "name": name,
        "memory_mib": memory_mib,
        "emulator": xml_escape(emulator, {"'": "&apos;"}),
        "machine": machine,
        "port_name": port_name,
        "graphics": graphics_xml(tls_mode, ticket=ticket),
    }
    if guest == "firmware":
        kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
        text = string.Template(TEMPLATE.read_text()).substitute(
            common, domain_type="kvm" if kvm else "qemu"
        )
    elif guest == "linux":
        images = guest_images.ensure_linux_guest()
        accel = guest_images.default_accel("linux")
        text = string.Template(TEMPLATE_LINUX.read_text()).substitute(
            common,
            domain_type="kvm" if accel == "kvm" else "qemu",
            kernel=xml_escape(str(images.kernel)),
            initrd=xml_escape(str(images.initrd)),
            cmdline=xml_escape(
                f"console=ttyS0 quiet panic=-1 portname={port_name} {kernel_args}"
            ).strip(),
            cpu=_cpu_xml(accel),
        )
    elif guest == "memcheck":
        from spice_libvirt_lab.memcheck import ensure_memcheck_guest

        options = memcheck or MemcheckOptions()
        accel = guest_images.default_accel("memcheck")
        text = string.Template(TEMPLATE_MEMCHECK.read_text()).substitute(
            common,
            memory_mib=options.memory_mib,
            domain_type="kvm" if accel == "kvm" else "qemu",
            kernel=xml_escape(str(ensure_memcheck_guest().image)),
            cmdline=options.cmdline(),
            cpu=_cpu_xml(accel),
        )
    else:
        raise ConfigError(f"unknown guest {guest!r}: firmware, linux or memcheck")
    ET.fromstring(text)  # a template that renders to invalid XML is a bug: fail here
    return text


def _cpu_xml(accel: str) -> str:
    """The ``<cpu>`` of a guest with a kernel: the host's under KVM (without the MSR that
    aborts QEMU on a nested ``kvm_pvm``), everything TCG can emulate otherwise."""
    if accel == "kvm":
        return (
            "<cpu mode='host-passthrough' migratable='on'>"
            "<feature policy='disable' name='arch-capabilities'/></cpu>"
        )
    return "<cpu mode='maximum' migratable='on'/>"
