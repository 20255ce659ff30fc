"""Old home of the QMP connection: it lives in :mod:`spice_libvirt.qemu.qmp`."""

from spice_libvirt.qemu.qmp import (
    EventPredicate,
    EventStream,
    QMPAddress,
    QMPCommandError,
    QMPConnectError,
    QMPConnection,
    QMPDisconnectedError,
    QMPEvent,
    QMPTimeoutError,
)

__all__ = [
    "EventPredicate",
    "EventStream",
    "QMPAddress",
    "QMPCommandError",
    "QMPConnectError",
    "QMPConnection",
    "QMPDisconnectedError",
    "QMPEvent",
    "QMPTimeoutError",
]
