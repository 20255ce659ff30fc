"""The bare-QEMU path (QMP), laid out like :mod:`spice_libvirt.libvirt`: :mod:`.qmp` the
connection, :mod:`.preflight` the checks before anything changes, :mod:`.controller` the flow."""
