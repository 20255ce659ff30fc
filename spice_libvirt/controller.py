"""Old home of the QMP controller: the bare-QEMU path lives in :mod:`spice_libvirt.qemu`.

``from spice_libvirt.controller import MigrationRequest, migrate_qemu`` is public API and
keeps working.
"""

from spice_libvirt.migration.witness import DEFAULT_WITNESS_RTT, MigrationWitness
from spice_libvirt.qemu.controller import QemuMigrationController, migrate_qemu
from spice_libvirt.qemu.preflight import qemu_pid_of_socket, seamless_option_of
from spice_libvirt.qemu.request import MigrationRequest, parse_qmp_address
from spice_libvirt.qemu.transfer import FINAL_STATES

__all__ = [
    "DEFAULT_WITNESS_RTT",
    "FINAL_STATES",
    "MigrationRequest",
    "MigrationWitness",
    "QemuMigrationController",
    "migrate_qemu",
    "parse_qmp_address",
    "qemu_pid_of_socket",
    "seamless_option_of",
]
