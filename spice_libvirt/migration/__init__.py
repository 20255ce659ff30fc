"""What both migration paths (bare QEMU over QMP, libvirt) share.

* :mod:`.witness` -- the embedded client as a controller sees it;
* :mod:`.evidence` -- ``query-spice`` and ``SPICE_*`` events parsed once, one channel
  naming, one unsigned connection id;
* :mod:`.verdict` -- evidence in, per-client verdicts and the outcome out (pure);
* :mod:`.policy` -- grace, release point, hold choice, TLS target (pure);
* :mod:`.report`, :mod:`.progress` -- the report models and progress reporting.

Dependencies point one way: ``{qemu, libvirt} -> migration -> spice``.
"""
