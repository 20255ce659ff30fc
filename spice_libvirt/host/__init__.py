"""What this host's kernel and libvirt's run directory say about a domain's QEMU process.

The domain's QEMU as libvirt recorded it and checked (:mod:`.trusted_qemu`), its TCP sockets
from the kernel (:mod:`.procnet`) and their round-trip times (:mod:`.tcpinfo`). Read-only and
without libvirt or the monitor, so that both the host agent and the taint-free controller
(:mod:`spice_libvirt.libvirt.census`) use one account of who is connected to a guest.
"""
