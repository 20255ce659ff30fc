"""Exit codes of the ``spice-libvirt`` command, a contract for management tooling.

They are stable: oVirt/VDSM-style callers branch on them without parsing text.
"""

from __future__ import annotations

import enum

from spice_libvirt import errors


class ExitCode(enum.IntEnum):
    OK = 0
    #: Unexpected internal failure (a bug); the message says what happened.
    FAILURE = 1
    #: Wrong command-line usage or invalid configuration/input document.
    USAGE = 2
    #: A host, port or socket could not be reached in time.
    UNREACHABLE = 3
    #: The SPICE server refused the ticket.
    PERMISSION_DENIED = 4
    #: The peer does not speak SPICE or violated the protocol.
    PROTOCOL = 5
    #: TLS certificate verification failed.
    TLS = 6
    #: The migration failed or was cancelled; the VM still runs on the source.
    MIGRATION_FAILED = 7
    #: The migration completed, but the client did not follow seamlessly.
    NOT_SEAMLESS = 8
    #: QEMU/QMP or libvirt refused an operation outside a migration.
    HYPERVISOR = 9
    #: The lab could not be built, used or torn down.
    LAB = 10


def for_error(exc: BaseException) -> ExitCode:
    """Map an exception to the exit code a caller can branch on."""
    if isinstance(exc, errors.ConfigError):
        return ExitCode.USAGE
    if isinstance(exc, errors.AuthenticationError):
        return ExitCode.PERMISSION_DENIED
    if isinstance(exc, errors.TLSVerificationError):
        return ExitCode.TLS
    if isinstance(exc, errors.ConnectError):
        return ExitCode.UNREACHABLE
    if isinstance(exc, errors.ProtocolError):
        return ExitCode.PROTOCOL
    if isinstance(exc, errors.MigrationError):
        return ExitCode.MIGRATION_FAILED
    if isinstance(exc, errors.QMPError | errors.LibvirtError | errors.HookError):
        return ExitCode.HYPERVISOR
    if isinstance(exc, errors.LabError):
        return ExitCode.LAB
    return ExitCode.FAILURE
