"""Exit codes of the ``spice-libvirt`` command, a contract for management tooling.

They are stable: oVirt/VDSM-style callers branch on them without parsing text. This module
is the only place that decides them: from an error (:func:`for_error`), from a migration
verdict (:func:`for_report`) and from a host evacuation (:func:`for_evacuation`). The
reports are read by duck typing (``outcome``, ``migration.status``, ``tls_downgraded``), so
this module depends on nothing but the error tree and every command shares one policy.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, Protocol

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
    #: The migration moved a channel from TLS to plain text.
    TLS_DOWNGRADED = 11
    #: Where the VM runs could not be established as exactly one host (it may run on
    #: both, on neither, or an end did not answer): check it now.
    PLACEMENT_UNKNOWN = 12
    #: ``doctor``: this host is not ready for seamless migration (a check failed).
    NOT_READY = 13
    #: Refused, nothing written: root would run code or trust a directory that someone
    #: other than root can change (``hook install``, ``agent unit``, ``agent run``'s state).
    UNSAFE_PATH = 14
    #: The migration completed -- the VM runs on the destination -- and a client could not
    #: follow it: its session is gone (e.g. no connection of the client reached the
    #: destination). Not a failed migration, not merely "not seamless".
    CLIENT_LOST = 15
    #: Interrupted (SIGINT), by the shell's convention 128 + 2.
    INTERRUPTED = 130
    #: Terminated (SIGTERM), 128 + 15; handled like SIGINT: the migration is undone first.
    TERMINATED = 143


#: One line per code, for ``--help`` epilogs (the README's table says the same).
EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success; for migrations: seamless (or no client was connected)",
    ExitCode.FAILURE: "internal error (a bug)",
    ExitCode.USAGE: "usage or configuration error",
    ExitCode.UNREACHABLE: "host, port or socket unreachable",
    ExitCode.PERMISSION_DENIED: "SPICE ticket refused",
    ExitCode.PROTOCOL: "the peer is not SPICE or broke the protocol",
    ExitCode.TLS: "TLS certificate verification failed",
    ExitCode.MIGRATION_FAILED: "migration failed or was cancelled; the VM still runs on the source",
    ExitCode.NOT_SEAMLESS: "migration completed, the client did not follow seamlessly",
    ExitCode.HYPERVISOR: "QEMU/QMP or libvirt refused an operation",
    ExitCode.LAB: "the lab could not be built, used or torn down",
    ExitCode.TLS_DOWNGRADED: "the migration moved a channel from TLS to plain text",
    ExitCode.PLACEMENT_UNKNOWN: "the VM does not run on exactly one host, or that is unknown",
    ExitCode.NOT_READY: "doctor: this host is not ready for seamless migration",
    ExitCode.UNSAFE_PATH: "refused: root would run or trust a path others can change",
    ExitCode.CLIENT_LOST: "migration completed, a client could not follow: its session is gone",
    ExitCode.INTERRUPTED: "interrupted (SIGINT); the migration was undone first",
    ExitCode.TERMINATED: "terminated (SIGTERM); the migration was undone first",
}

#: Placements (``report.placement``) that are not exactly one host.
_UNSETTLED_PLACEMENTS = frozenset({"both", "none", "unknown"})

#: Outcomes in which the client kept its session without any loss.
_SEAMLESS_OUTCOMES = frozenset({"seamless", "no-client"})


def exit_codes_epilog() -> str:
    """The exit-code table as ``--help`` prints it (use with RawDescriptionHelpFormatter)."""
    return "exit codes:\n" + "\n".join(
        f"  {int(code):>3}  {text}" for code, text in EXIT_CODE_HELP.items()
    )


class _Figures(Protocol):
    @property
    def status(self) -> str | None: ...


class Verdict(Protocol):
    """What :func:`for_report` reads of a migration report (QEMU or libvirt path)."""

    @property
    def outcome(self) -> str: ...

    @property
    def migration(self) -> _Figures: ...


def migration_failed(report: Verdict) -> bool:
    """True when the VM did not move: cancelled, or the migration did not complete.

    ``failed`` with a *completed* migration means a client broke, not the migration: the
    VM runs on the destination, so that is not this case (it is :attr:`NOT_SEAMLESS`).
    """
    status = report.migration.status
    if report.outcome == "cancelled" or (status is not None and status != "completed"):
        return True
    return status is None and report.outcome == "failed"


def for_report(report: Verdict) -> ExitCode:
    """The exit code of one migration's verdict.

    Precedence: the VM's placement not established as one host (12), then the VM did
    not move (7), then a channel lost TLS (11), then a client lost its session (15), then
    the client did not follow seamlessly (8); seamless or no client at all is 0.
    """
    if getattr(report, "placement", None) in _UNSETTLED_PLACEMENTS:
        return ExitCode.PLACEMENT_UNKNOWN
    if migration_failed(report):
        return ExitCode.MIGRATION_FAILED
    if getattr(report, "tls_downgraded", False):
        return ExitCode.TLS_DOWNGRADED
    if report.outcome == "client-lost":
        return ExitCode.CLIENT_LOST
    if report.outcome in _SEAMLESS_OUTCOMES:
        return ExitCode.OK
    return ExitCode.NOT_SEAMLESS


def for_client_record(record: Any) -> ExitCode:
    """One migration as a watching client saw it (``watch``): seamless or not, TLS kept,
    the session lost."""
    if getattr(record, "tls_downgraded", False):
        return ExitCode.TLS_DOWNGRADED
    if record.path == "lost":
        return ExitCode.CLIENT_LOST
    return ExitCode.OK if record.path == "seamless" else ExitCode.NOT_SEAMLESS


def worst(codes: Iterable[ExitCode]) -> ExitCode:
    """The code of a batch: the first failure, else TLS downgraded, else not seamless, else 0.

    Any code other than 0, 8 and 11 is a failure of some domain and says the most; the
    first one (in the caller's order) wins so the result does not depend on set ordering.
    """
    seen = list(codes)
    soft = (ExitCode.OK, ExitCode.NOT_SEAMLESS, ExitCode.TLS_DOWNGRADED)
    hard = [c for c in seen if c not in soft]
    if hard:
        return hard[0]
    for code in (ExitCode.TLS_DOWNGRADED, ExitCode.NOT_SEAMLESS):
        if code in seen:
            return code
    return ExitCode.OK


def for_domain_result(result: Any) -> ExitCode:
    """One evacuated domain: its verdict's code, or the code of the error it raised."""
    report = getattr(result, "report", None)
    if report is not None:
        return for_report(report)
    return ExitCode(int(result.exit_code))


def for_evacuation(report: Any) -> ExitCode:
    """A host evacuation: the worst domain's code (see :func:`worst`); none migrated is 0."""
    return worst(for_domain_result(d) for d in report.domains)


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
    if isinstance(exc, errors.UnsafePathError):
        return ExitCode.UNSAFE_PATH
    return ExitCode.FAILURE
