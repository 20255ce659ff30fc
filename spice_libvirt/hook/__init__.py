"""The libvirt hook side of spice-libvirt: everything that runs *inside* libvirtd's calls.

Modules, one concern each:

* :mod:`~spice_libvirt.hook.qemu_hook` - the ``spice-libvirt-hook`` entry point libvirt runs;
* :mod:`~spice_libvirt.hook.deadline` - the time budget both entry points run under;
* :mod:`~spice_libvirt.hook.rewrite` - pure XML rewrite of the SPICE listen address;
* :mod:`~spice_libvirt.hook.journal` - the SQLite journal of invocations;
* :mod:`~spice_libvirt.hook.install` - putting the shim into ``hooks/qemu.d/`` and out again;
* :mod:`~spice_libvirt.hook.vdsm` - the oVirt/VDSM hook adapters.

Nothing in this package imports ``libvirt``: a hook that calls back into the daemon that is
waiting for it can deadlock it.
"""
