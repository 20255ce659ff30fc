"""spice-libvirt: seamless SPICE live migration for QEMU/KVM and libvirt, verified.

The package has four layers, one module per concern:

* :mod:`spice_libvirt.spice` -- a sans-IO SPICE codec and state machines, plus an asyncio
  client on top that follows every migration path and records what happened;
* the migration controller over QMP (:mod:`spice_libvirt.qemu`, bare QEMU) and over
  libvirt (:mod:`spice_libvirt.libvirt`), with what both share in
  :mod:`spice_libvirt.migration`;
* the libvirt hook, the host agent and the management entry points (CLI, this Python API,
  VDSM adapters).

The labs that run all of it for real on one machine are a separate distribution
(``spice_libvirt_lab``, in ``lab/`` of the source tree) that hypervisors never install.

The libvirt entry points are imported on first use, so that ``import spice_libvirt`` works
on hosts without libvirt-python (bare QEMU, or the hook, which must never load libvirt).
"""

from __future__ import annotations

from spice_libvirt.errors import SpiceLibvirtError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs every CLI start and console-script hook call an import
    from typing import Any

__all__ = [
    "MigrationRequest",
    "SpiceLibvirtError",
    "__version__",
    "evacuate_host",
    "evacuate_host_async",
    "migrate_domain",
    "migrate_domain_async",
    "migrate_qemu",
]
#: The one version source: pyproject.toml reads it (``dynamic = ["version"]``, a plain
#: literal that setuptools finds without importing the package), ``--version`` prints it.
__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first use.
_LAZY = {
    "evacuate_host": "spice_libvirt.api",
    "evacuate_host_async": "spice_libvirt.api",
    "migrate_domain": "spice_libvirt.api",
    "migrate_domain_async": "spice_libvirt.api",
    "migrate_qemu": "spice_libvirt.qemu.controller",
    "MigrationRequest": "spice_libvirt.qemu.request",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spice_libvirt' has no attribute {name!r}")
