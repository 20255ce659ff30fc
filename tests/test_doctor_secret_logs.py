"""``doctor`` says when libvirt's debug log would receive a SPICE ticket.

libvirt logs every monitor command in full at debug level, ``set_password`` -- and so a
ticket extended through libvirt -- included; the lab test (``test_secrets_lab.py``) shows
it happen. Here: which log settings let monitor commands through to an output.
"""

from __future__ import annotations

from spice_libvirt.doctor.daemon_logs import (
    QUIET_MONITOR,
    LogSettings,
    monitor_debug_outputs,
    parse_config,
)
from spice_libvirt_lab.libvirt_host import LOG_FILTERS, SECRET_SAFE_LOG_FILTERS

DEBUG_FILE = "1:file:/var/log/libvirt/libvirtd.log"


def leaks(filters: str, outputs: str = DEBUG_FILE, level: int = 3) -> bool:
    return bool(monitor_debug_outputs(LogSettings(level, tuple(filters.split()), (outputs,))))


def test_which_settings_log_monitor_commands() -> None:
    assert not leaks("")  # the defaults: level 3
    assert leaks("1:qemu")  # "*qemu*" matches the monitor's sources
    assert leaks("1:qemu_monitor_json")
    assert leaks("", level=1)  # everything at debug
    assert not leaks("3:qemu 1:*", level=1)  # the first matching filter wins
    assert not leaks(f"{QUIET_MONITOR} 1:qemu")  # the fix the doctor proposes
    assert not leaks("1:qemu", outputs="3:journald")  # no debug output
    assert leaks("1:+qemu")  # "+" (a stack trace) is not part of the pattern
    assert leaks(LOG_FILTERS)  # the lab's diagnostic settings
    assert not leaks(SECRET_SAFE_LOG_FILTERS)  # the lab's settings for ticketed guests


def test_daemon_config_is_read() -> None:
    text = """# comment
log_level = 1
log_filters="1:qemu.qemu_monitor 3:*"
#log_outputs="3:syslog"
log_outputs="1:file:/var/log/libvirt/libvirtd.log"
"""
    settings = parse_config(text, "libvirtd.conf")
    assert settings.level == 1
    assert settings.filters == ("1:qemu.qemu_monitor", "3:*")
    assert settings.outputs == (DEBUG_FILE,)
    assert monitor_debug_outputs(settings) == [DEBUG_FILE]
    assert parse_config("", "empty") == LogSettings(origin="empty")
