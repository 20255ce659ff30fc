"""One line to the local syslog socket (journald, rsyslog), besides the SQLite journal.

Why: fleets already ship libvirtd's and VDSM's logs from syslog/journald to their log
servers; one line per hook call and per migration there means spice-libvirt's record
travels the same way, without anyone reading our SQLite file on each host.

Why not :mod:`logging.handlers.SysLogHandler` or :mod:`syslog`: the hook runs on every
event of every domain, and ``logging`` (with ``socket``, ``enum``, ``re``, ``traceback``...)
would cost it more than all its other imports; the C ``syslog()`` of :mod:`syslog` always
writes to ``/dev/log`` and can block when the reader is slow. This module imports only
``_socket`` (the C half of :mod:`socket`) when it sends, and sends one non-blocking datagram:

* never fatal: no socket (no ``/dev/log`` on a container or a test machine), a refused or
  full socket, an unwritable path: the line is dropped and the caller never hears of it;
* never slow: ``MSG_DONTWAIT``-style non-blocking send, no retries, no reconnects;
* the format is the one glibc's ``syslog()`` writes to ``/dev/log`` (RFC 3164 without a
  host name): ``<PRI>Mmm dd hh:mm:ss TAG[PID]: MESSAGE``, facility ``daemon``, which
  journald and rsyslog both parse (journald shows TAG as ``SYSLOG_IDENTIFIER``).
"""

from __future__ import annotations

import os
import time

#: syslog facility ``daemon`` (3), as libvirtd logs
_FACILITY = 3
INFO = 6
WARNING = 4
#: longer lines are cut (journald takes more, but classic syslogds stop near 2 KiB)
MAX_BYTES = 2048


def format_line(tag: str, message: str, severity: int = INFO, *, now: float | None = None) -> bytes:
    """The datagram: control characters in ``message`` become spaces (one line, always)."""
    stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now))
    text = "".join(c if c >= " " and c != "\x7f" else " " for c in message)
    line = f"<{_FACILITY * 8 + severity}>{stamp} {tag}[{os.getpid()}]: {text}"
    return line.encode("utf-8", "replace")[:MAX_BYTES]


def send(tag: str, message: str, *, path: str, severity: int = INFO) -> bool:
    """Send one line to the datagram socket at ``path``; True if it went out.

    ``path`` empty means "no syslog". Every failure returns False, silently.
    """
    if not path or not os.path.exists(path):  # no syslog here: not even the import
        return False
    try:
        import _socket

        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    except (ImportError, OSError):
        return False
    try:
        sock.setblocking(False)
        sock.sendto(format_line(tag, message, severity), path)
    except OSError:  # absent, refused, full (EAGAIN), not a socket, no permission...
        return False
    finally:
        sock.close()
    return True
