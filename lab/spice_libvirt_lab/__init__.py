"""Everything lab: real QEMUs, libvirtds and clients on one machine, to prove migrations.

Product code never imports this package; the command line (:mod:`spice_libvirt_lab.command`),
the tests and the benchmarks do. Dependencies point one way: ``cli -> lab -> {qemu,
libvirt} -> migration -> spice``.

* :mod:`.labdir` -- the one default lab directory, created private; removal only inside it
* QEMU: :mod:`.qemu_spec` (a VM's command line, pure), :mod:`.qemu` (start, stop, reap),
  :mod:`.qemu_lab` and :mod:`.qemu_lab_state` (the two-QEMU lab on loopback)
* libvirt: :mod:`.libvirt_host` (one host's private libvirtd), :mod:`.libvirt_state`,
  :mod:`.libvirt_domain`, :mod:`.libvirt_status`, :mod:`.libvirt_lab` (up, migrate, down),
  :mod:`.libvirt_migrate` (the lab driven by the seamless controller)
* the client's side: :mod:`.witness_thread` (our client on its own loop, e.g. in the
  client namespace), :mod:`.netns`, :mod:`.delaybridge` (a chosen RTT)
* shared pieces: :mod:`.guest` (the test guests), :mod:`.tls` (a lab CA), :mod:`.ports`,
  :mod:`.procs` (process identity, pidfd waits, locks)
"""

#: The lab's version follows the product's: they are released together from one tree.
__version__ = "0.1.0"
