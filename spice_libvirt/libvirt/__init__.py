"""The libvirt path: open connections with bounds, bridge libvirt's events into asyncio,
and drive seamless SPICE migrations (one domain or a whole host) through libvirt itself.

Users run libvirt, not bare QEMU; this package makes libvirt's own migration seamless for the
SPICE client instead of replacing it (see :mod:`spice_libvirt.libvirt.controller`).
"""
