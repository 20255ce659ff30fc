"""Where SPICE tickets come from: a file or an environment variable, never argv.

A password on the command line is visible to every user through ``/proc/*/cmdline``;
these helpers are the only way the CLI accepts one.
"""

from __future__ import annotations

import os
from pathlib import Path

from spice_libvirt.errors import ConfigError

TICKET_ENV = "SPICE_LIBVIRT_TICKET"
#: spice-server truncates tickets to 60 bytes; a file far larger is a mistake (or /dev/zero),
#: and reading it whole would be unbounded.
MAX_TICKET_FILE_BYTES = 4096


def read_ticket(ticket_file: Path | None, env: dict[str, str] | None = None) -> str | None:
    """The ticket from ``ticket_file`` (first line, newline stripped) or ``$SPICE_LIBVIRT_TICKET``."""
    environ = os.environ if env is None else env
    if ticket_file is not None:
        try:
            with ticket_file.open("rb") as f:
                data = f.read(MAX_TICKET_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read ticket file {ticket_file}: {exc.strerror}") from None
        if len(data) > MAX_TICKET_FILE_BYTES:
            raise ConfigError(
                f"ticket file {ticket_file} is larger than {MAX_TICKET_FILE_BYTES} bytes"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"ticket file {ticket_file} is not UTF-8 text") from None
        lines = text.splitlines()
        return lines[0] if lines else ""
    return environ.get(TICKET_ENV)
