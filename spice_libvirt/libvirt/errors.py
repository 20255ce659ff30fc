"""Errors of the libvirt path, as subclasses of the package's tree.

They sit where a management tool expects them: an unreachable libvirtd is a
:class:`~spice_libvirt.errors.ConnectError` (exit code UNREACHABLE) *and* a
:class:`~spice_libvirt.errors.LibvirtError`; a refused preflight or a failed migration is a
:class:`~spice_libvirt.errors.MigrationError` (exit code MIGRATION_FAILED: the domain still
runs on the source). libvirt's own exception stays in ``__cause__`` and ``.exc``.
"""

from __future__ import annotations

from typing import Any

from spice_libvirt.errors import ConnectError, LibvirtError, MigrationError


class LibvirtOperationError(LibvirtError):
    """A libvirt call failed outside a migration (lookup, query, monitor command)."""

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        super().__init__(message)
        self.exc = exc
        #: libvirt's error code (``virErrorNumber``), when libvirt raised it
        self.code: int | None = _code_of(exc)


class LibvirtConnectError(LibvirtError, ConnectError):
    """A libvirtd could not be reached (or did not answer) within its timeout."""

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        ConnectError.__init__(self, message, exc)
        self.code: int | None = _code_of(exc)


class DomainNotFoundError(LibvirtOperationError):
    """No domain of that name (or UUID) on the host asked."""


class PreflightError(MigrationError):
    """The migration was refused before anything changed (the domain was not touched)."""

    def __init__(self, message: str) -> None:
        super().__init__("preflight", message)


class LibvirtMigrationError(MigrationError):
    """libvirt's migration job failed or timed out; ``source_running`` says where the domain is."""

    def __init__(self, message: str, *, source_running: bool | None) -> None:
        super().__init__("migrate", message)
        self.source_running = source_running


def _code_of(exc: BaseException | None) -> int | None:
    get: Any = getattr(exc, "get_error_code", None)
    if get is None:
        return None
    try:
        code = get()
    except Exception:  # a broken error object must not hide the real error
        return None
    return int(code) if code is not None else None


def error_code(exc: LibvirtOperationError) -> int | None:
    """libvirt's error code (``VIR_ERR_*``) behind one of our wrapped errors, if any."""
    return _code_of(exc.exc)


def message_of(exc: BaseException) -> str:
    """libvirt's own one-line message (``get_error_message``), else ``str(exc)``."""
    get: Any = getattr(exc, "get_error_message", None)
    if get is not None:
        try:
            text = get()
        except Exception:
            text = None
        if text:
            return str(text)
    return str(exc) or type(exc).__name__
