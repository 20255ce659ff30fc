"""Does libvirtd write QEMU monitor traffic -- SPICE tickets included -- into its logs?

A SPICE ticket set or extended through libvirt (``--extend-ticket``, a manager's ticket)
travels to QEMU as ``set_password`` on the monitor. At debug level libvirt logs every
monitor command in full (``qemu.qemu_monitor_json``: "Send command ..."), so the password
lands in the log in clear. That is libvirt's doing, not ours, and the default levels do not
do it; but monitor debug logging is how operators troubleshoot migrations, so the doctor
says so before a migration would write the ticket there.

A debug message of source ``S`` reaches an output when the first log filter matching ``S``
(libvirt wraps a filter's pattern in ``*...*``) has priority 1 -- or no filter matches and
the daemon's level is 1 -- and the output's own priority is 1. The daemon's running
settings come from ``virt-admin`` (they may have been changed at run time, the way one
turns debugging on without a restart), else from its configuration file. Read-only.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from spice_libvirt.doctor.model import Check, ok, skip, warn

#: the sources whose debug messages carry monitor commands in full
MONITOR_SOURCES = ("qemu.qemu_monitor_json", "qemu.qemu_monitor")
#: where the system daemons read their settings (monolithic, then modular)
DAEMON_CONFIGS = (Path("/etc/libvirt/libvirtd.conf"), Path("/etc/libvirt/virtqemud.conf"))
#: the fix the check proposes (docs/operations.md says the same)
QUIET_MONITOR = "3:qemu.qemu_monitor_json 3:qemu.qemu_monitor"


@dataclass(frozen=True)
class LogSettings:
    """libvirt's log settings: level, filters (``"1:qemu"`` ...) and outputs."""

    level: int = 3
    filters: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    origin: str = "defaults"


def _priority(entry: str) -> tuple[int, str]:
    head, _, rest = entry.partition(":")
    return (int(head), rest) if head.isdigit() else (3, entry)


def monitor_debug_outputs(settings: LogSettings) -> list[str]:
    """The outputs that would receive monitor commands in full (empty: none)."""
    outputs = [o for o in settings.outputs if _priority(o)[0] <= 1]
    if not outputs:
        return []
    for source in MONITOR_SOURCES:
        level = settings.level
        for entry in settings.filters:
            priority, pattern = _priority(entry)
            pattern = pattern.lstrip("+")  # "+" asks for a stack trace: not a pattern
            if fnmatch.fnmatchcase(source, f"*{pattern}*"):
                level = priority
                break
        if level <= 1:
            return outputs
    return []


def parse_config(text: str, origin: str) -> LogSettings:
    """``log_level``, ``log_filters`` and ``log_outputs`` of a libvirt daemon config."""

    def value(key: str) -> str | None:
        found = re.search(rf'^\s*{key}\s*=\s*"?([^"\n]*)"?', text, re.MULTILINE)
        return found.group(1).strip() if found else None

    level = value("log_level")
    return LogSettings(
        level=int(level) if level and level.isdigit() else 3,
        filters=tuple((value("log_filters") or "").split()),
        outputs=tuple((value("log_outputs") or "").split()),
        origin=origin,
    )


def _virt_admin(what: str, uri: str) -> str | None:
    tool = shutil.which("virt-admin")
    if tool is None:
        return None
    try:
        done = subprocess.run(
            [tool, "-c", uri, what], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.partition(":")[2].strip()


def running_settings(admin_uri: str) -> LogSettings | None:
    """The running daemon's filters and outputs (``virt-admin``), None when not readable.
    Its level cannot be read back; the configuration's is used."""
    filters = _virt_admin("daemon-log-filters", admin_uri)
    outputs = _virt_admin("daemon-log-outputs", admin_uri)
    if filters is None or outputs is None:
        return None
    config = configured()
    level = config.level if config is not None else 3
    return LogSettings(level, tuple(filters.split()), tuple(outputs.split()), "virt-admin")


def configured(paths: tuple[Path, ...] = DAEMON_CONFIGS) -> LogSettings | None:
    for path in paths:
        try:
            return parse_config(path.read_text(), str(path))
        except OSError:
            continue
    return None


def check_monitor_logging(admin_uri: str = "libvirtd:///system") -> Check:
    """Warn when libvirtd's log would receive SPICE tickets (monitor commands at debug)."""
    settings = running_settings(admin_uri) or configured()
    if settings is None:
        return skip("secrets-in-logs", "libvirt's log settings could not be read")
    outputs = monitor_debug_outputs(settings)
    if not outputs:
        return ok("secrets-in-logs", f"libvirt does not log monitor commands ({settings.origin})")
    return warn(
        "secrets-in-logs",
        f"libvirt logs QEMU monitor commands at debug level to {', '.join(outputs)} "
        f"({settings.origin}): a SPICE ticket set or extended through libvirt "
        "(--extend-ticket) is written there in clear",
        f"put '{QUIET_MONITOR}' first in the log filters (virt-admin daemon-log-filters, "
        "log_filters in libvirtd.conf), or do not extend tickets while debugging",
    )


__all__ = [
    "LogSettings",
    "check_monitor_logging",
    "configured",
    "monitor_debug_outputs",
    "parse_config",
    "running_settings",
]
