"""The exception tree of spice-libvirt.

Every error the package raises on purpose derives from :class:`SpiceLibvirtError`, so a
management tool can catch one class and still tell the cases apart. The tree::

    SpiceLibvirtError
     +-- ConfigError              bad configuration, arguments or input files
     +-- ProtocolError            the SPICE wire protocol went wrong
     |    +-- LocalProtocolError      we misused the codec (a bug on our side)
     |    +-- RemoteProtocolError     the peer sent bytes that are not valid SPICE
     |         +-- LinkError              the server refused the link (carries the code)
     |              +-- AuthenticationError  PERMISSION_DENIED: wrong or expired ticket
     +-- ConnectError             a host or port could not be reached (timeouts included)
     |    +-- TLSVerificationError    the server's certificate did not verify
     +-- QMPError                 a QMP command failed or QEMU answered oddly
     +-- MigrationError           a migration step failed (carries the phase)
     +-- LibvirtError             libvirt refused or failed (wraps libvirt.libvirtError)
     +-- LabError                 the built-in lab could not be built or torn down
     +-- HookError                the libvirt hook could not do its job
     +-- AgentError               the host agent could not watch or hold a migration
     +-- UnsafePathError          root would run code (or trust a directory) others can change

Wrapping errors keep the cause in ``__cause__`` (always raised ``from``) and in ``.exc``
where one exists; ``str()`` gives one human line without the class name, which is what the
CLI prints.
"""

from __future__ import annotations


class SpiceLibvirtError(Exception):
    """Root of every error spice-libvirt raises deliberately."""


class ConfigError(SpiceLibvirtError):
    """Configuration, command-line arguments or an input document are invalid."""


class ProtocolError(SpiceLibvirtError):
    """The SPICE protocol was violated, by us or by the peer."""


class LocalProtocolError(ProtocolError):
    """We asked the codec for something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that is not valid SPICE: truncated, oversized or out of order."""


class LinkError(RemoteProtocolError):
    """The server answered a link with a non-zero SpiceLinkErr code."""

    def __init__(self, code: int, message: str | None = None) -> None:
        from spice_libvirt.spice.constants import LinkErr

        self.code = code
        try:
            self.name = LinkErr(code).name
        except ValueError:
            self.name = f"UNKNOWN_{code}"
        super().__init__(
            message or f"link refused by server: {self.name.lower().replace('_', ' ')}"
        )


class AuthenticationError(LinkError):
    """The server refused the ticket (SPICE_LINK_ERR_PERMISSION_DENIED)."""


class ConnectError(SpiceLibvirtError):
    """A TCP/TLS/unix connection could not be set up within its timeout."""

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        super().__init__(message)
        self.exc = exc


class TLSVerificationError(ConnectError):
    """The server's certificate failed verification (CA, hostname or subject)."""


class QMPError(SpiceLibvirtError):
    """A QMP command failed, timed out, or QEMU replied with something unexpected."""


class MigrationError(SpiceLibvirtError):
    """A migration step failed; ``phase`` names the step (preflight, link-wait, migrate, ...)."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(f"{phase}: {message}")
        self.phase = phase


class LibvirtError(SpiceLibvirtError):
    """libvirt refused or failed an operation."""


class LabError(SpiceLibvirtError):
    """The built-in lab could not be brought up, used or torn down."""


class HookError(SpiceLibvirtError):
    """The libvirt hook could not process its input."""


class AgentError(SpiceLibvirtError):
    """The host agent could not watch, hold or release a migration (never fatal to one)."""


class UnsafePathError(SpiceLibvirtError):
    """Root would run code, or trust a directory, that someone other than root can change
    (not root's, writable by a group or others); nothing was written."""


def unexpected(exc: BaseException) -> str:
    """An exception nobody planned for (a bug, a broken install), in one line: its type and
    message. For the places that must end in a known way whatever happens (the hooks)."""
    text = " ".join(str(exc).split())
    return f"unexpected {type(exc).__name__}" + (f": {text}" if text else "")


def first_error(exc: Exception) -> str:
    """A pydantic ``ValidationError`` as one line: the first field's name and message
    (pydantic prints several lines and a URL); any other exception as ``str()``."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    first = errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = str(first.get("msg", exc)).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
