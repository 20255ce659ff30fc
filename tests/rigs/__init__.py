"""Test rigs written once and shared by every test module (and imported by the benchmarks).

* :mod:`tests.rigs.libvirt_lab`: the two-host libvirt lab's marks, a lab per module or per
  test, and the one leak check run after each;
* :mod:`tests.rigs.viewer`: a private Xvfb, remote-viewer processes, and remote-viewer's
  own log read as an independent account of a migration;
* :mod:`tests.rigs.unit`: the ``unit`` marker (``pytest -m unit``, no root needed) and the
  check that a unit test starts no real component.

The fixtures that use them (``shared_lab``, ``libvirt_lab_dir``, ``x_server``) are in
``tests/conftest.py``.
"""
