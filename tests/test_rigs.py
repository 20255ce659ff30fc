"""The shared test rigs themselves (:mod:`tests.rigs`): remote-viewer's log read as an oracle,
the full-session test, and the lab marks -- the parts every real-component test leans on."""

from __future__ import annotations

from pathlib import Path

import pytest

from spice_libvirt.migration.evidence import SpiceSession
from tests.rigs.libvirt_lab import LIBVIRT_LAB, lab_marks
from tests.rigs.viewer import (
    VIEWER_CHANNELS,
    ViewerTls,
    full_session,
    log_time,
    migration_messages,
    viewer_outcome,
)

# lines in spice-gtk 0.42's SPICE_DEBUG format, as remote-viewer writes them
_PREFIX = "(remote-viewer:42): GSpice-DEBUG: "


def _line(at: str, text: str) -> str:
    return f"{_PREFIX}{at}: ../src/channel-main.c:2367 main-1:0: {text}\n"


BEGIN = _line("10:00:01.000", "migration message: migrate-begin-seamless")
LINKED = _line("10:00:01.250", "migration: connections all ok")
SUCCESS = _line("10:00:01.900", "all channel migrated, success")
SWITCH = _line("10:00:02.000", "migration message: migrate-switch-host")
DISPLAY_UP = f"{_PREFIX}10:00:02.750: ../src/spice-channel.c:2755 display-2:0: channel up\n"
END = _line("10:00:02.000", "migration message: migrate-end")


def test_a_seamless_migration_is_every_channel_migrated() -> None:
    found = viewer_outcome(BEGIN + LINKED + SUCCESS)
    assert (found.path, found.display_outage_s, found.link_s) == ("seamless", 0.0, 0.25)
    # begun and linked is not yet seamless: the log is not conclusive
    assert viewer_outcome(BEGIN + LINKED).path is None


def test_a_switch_host_counts_once_the_new_display_is_up() -> None:
    assert viewer_outcome(BEGIN + SWITCH).path is None  # still reconnecting
    found = viewer_outcome(BEGIN + SWITCH + DISPLAY_UP)
    assert (found.path, found.display_outage_s) == ("switch-host", 0.75)
    # a switch-host wins over an earlier begin and over a later success line
    assert viewer_outcome(BEGIN + SWITCH + DISPLAY_UP + SUCCESS).path == "switch-host"


def test_migrate_end_is_semi_seamless() -> None:
    assert viewer_outcome(BEGIN + END).path == "semi-seamless"


def test_nothing_in_the_log_is_no_outcome() -> None:
    assert viewer_outcome("") == viewer_outcome("unrelated\n")
    assert viewer_outcome("").path is None


def test_migration_messages_in_order() -> None:
    assert migration_messages(BEGIN + SWITCH + END) == [
        "migrate-begin-seamless",
        "migrate-switch-host",
        "migrate-end",
    ]
    assert log_time(BEGIN) == 10 * 3600 + 1.0
    assert log_time("no timestamp") is None


def test_full_session_needs_every_viewer_channel() -> None:
    every: dict[tuple[int, int], bool | None] = {(t, 0): True for t in (1, 2, 3, 4, 10)}
    partial: dict[tuple[int, int], bool | None] = {(1, 0): True, (2, 0): True}
    sessions = {7: SpiceSession(7, dict(partial)), 9: SpiceSession(9, dict(every))}
    assert set(sessions[9].names) == VIEWER_CHANNELS
    assert full_session(sessions) == 9
    assert full_session({7: sessions[7]}) is None


def test_viewer_tls_requires_every_channel_secure() -> None:
    argv = ViewerTls(ca_file=Path("/ca.pem"), subject="CN=hostB").argv()
    assert argv == [
        "--spice-ca-file=/ca.pem",
        "--spice-host-subject=CN=hostB",
        "--spice-secure-channels=all",
    ]


def test_lab_marks_carry_the_lab_options() -> None:
    marks = lab_marks(client_rtt_ms=300, guest="linux")
    assert marks[: len(LIBVIRT_LAB)] == LIBVIRT_LAB
    assert marks[-1].mark.name == "libvirt_lab"
    assert marks[-1].mark.kwargs == {"client_rtt_ms": 300, "guest": "linux"}
    assert [m.mark.name for m in LIBVIRT_LAB][:2] == ["libvirt", "slow"]


@pytest.mark.parametrize("name", ["shared_lab", "libvirt_lab_dir", "x_server"])
def test_the_rig_fixtures_count_as_real_components(name: str) -> None:
    """A test skipped because its lab or X server could not start fails the run."""
    from tests.honest_skips import REAL_FIXTURES

    assert name in REAL_FIXTURES
