"""Old path of :mod:`spice_libvirt.lab.libvirt_migrate` (a lab concern); kept for importers."""

from spice_libvirt.lab.libvirt_migrate import (
    lab_migrate,
    lab_request,
    remove_extra_domains,
    start_extra_domains,
)

__all__ = ["lab_migrate", "lab_request", "remove_extra_domains", "start_extra_domains"]
