"""Old home of the verdict models: they live in :mod:`spice_libvirt.migration.report`."""

from spice_libvirt.migration import report as _report
from spice_libvirt.migration.report import *  # noqa: F403 - the whole public surface, as before

__all__ = _report.__all__
