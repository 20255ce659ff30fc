"""spice-libvirt: seamless SPICE live migration for QEMU/KVM and libvirt, verified.

The package has four layers, one module per concern:

* :mod:`spice_libvirt.spice` -- a sans-IO SPICE codec and state machines, plus an asyncio
  client on top that follows every migration path and records what happened;
* the migration controller over QMP (bare QEMU) and over libvirt;
* the libvirt hook and management entry points (CLI, Python API, VDSM adapters);
* the built-in labs that run all of it for real on one machine.
"""

from __future__ import annotations

from spice_libvirt.errors import SpiceLibvirtError

__all__ = ["SpiceLibvirtError", "__version__"]
__version__ = "0.1.0"
