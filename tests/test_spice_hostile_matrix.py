"""The embedded client against a hostile server in every phase.

``spice-libvirt watch`` -- the client as a user runs it -- against the matrix of
:mod:`spice_libvirt_lab.hostile_matrix` (fake servers on loopback, named as stand-ins: a real
spice-server cannot be made to misbehave). Each case must end in the first real error, one
line on stderr with its documented exit code, or keep the session (the source told
MIGRATE_CONNECT_ERROR inside spice-server's 10 s window when a destination cannot be
linked); settled within 10 s of the hostile act, the client's peak RSS within 100 MB.
"""

from __future__ import annotations

import asyncio

import pytest

from spice_libvirt_lab import hostile_matrix
from spice_libvirt_lab.hostile_matrix import RSS_LIMIT_MB, SETTLE_LIMIT_S, Row

CASES = [c.name for c in hostile_matrix.cases()]


pytestmark = pytest.mark.slow  # 44 hostile servers against real client processes: ~30 s


@pytest.fixture(scope="module")
def rows() -> dict[str, Row]:
    """Every case once (three client processes at a time); rows by case name."""
    measured = asyncio.run(hostile_matrix.run_all(hostile_matrix.cases(), parallel=3))
    return {row.case: row for row in measured}


@pytest.mark.parametrize("name", CASES)
def test_hostile_case(rows: dict[str, Row], name: str) -> None:
    row = rows[name]
    assert row.passed, f"{name}: {row.problems}"
    assert row.settle_s is not None
    assert row.settle_s <= SETTLE_LIMIT_S
    assert 0 < row.peak_rss_mb <= RSS_LIMIT_MB
    for line in row.stderr_lines:
        assert "Traceback" not in line
        assert "never retrieved" not in line


def test_matrix_covers_every_phase_and_kind() -> None:
    cases = hostile_matrix.cases()
    phases = {c.phase for c in cases}
    assert phases == {
        "set-up",
        "session",
        "pre-link",
        "hand-over",
        "after the switch",
        "switch-host",
    }
    kinds = " ".join(c.what for c in cases)
    for kind in (
        "oversized",
        "truncated",
        "unknown",
        "out-of-phase",
        "never answers",
        "refuses",
        "garbage",
        "pings",
        "ACK",
        "display data",
        "CHANNELS_LIST",
        "MIGRATE_DATA",
    ):
        assert kind in kinds, kind
    channels = {c.channel for c in cases if c.phase == "session"}
    assert {"main", "display", "inputs", "cursor"} <= channels
