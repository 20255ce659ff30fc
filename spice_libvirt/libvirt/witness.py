"""Old path of :mod:`spice_libvirt.lab.witness_thread` (a lab concern); kept for importers."""

from spice_libvirt.lab.witness_thread import ThreadedWitness

__all__ = ["ThreadedWitness"]
