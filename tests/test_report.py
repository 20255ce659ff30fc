"""The verdict models and the classification rules (pure: no QEMU)."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spice_libvirt.migration.progress import (
    LogReporter,
    MigrationProgress,
    NullReporter,
    make_reporter,
)
from spice_libvirt.migration.report import (
    CHANNEL_TYPE_NAMES,
    ClientVerdict,
    Endpoint,
    MigrationReport,
    channel_name,
    parse_channel_name,
)
from spice_libvirt.migration.verdict import classify_outcome, embedded_path_is_seamless
from spice_libvirt.spice.record import ClientMigrationRecord, PathStep, StreamStats


def verdict(path: str, cid: int = 7, after: int | None = 7) -> ClientVerdict:
    return ClientVerdict.model_validate(
        {
            "kind": "external",
            "path": path,
            "connection_id_before": cid,
            "connection_id_after": after,
            "connection_id_kept": after == cid,
        }
    )


def step(message: str, side: str = "src", direction: str = "rx") -> PathStep:
    return PathStep.model_validate(
        {"t_ms": 0.0, "channel": "main:0", "side": side, "direction": direction, "message": message}
    )


@given(st.sampled_from(sorted(CHANNEL_TYPE_NAMES)), st.integers(0, 255))
def test_channel_names_round_trip(channel_type: int, channel_id: int) -> None:
    assert parse_channel_name(channel_name(channel_type, channel_id)) == (channel_type, channel_id)


def test_channel_name_examples() -> None:
    assert channel_name(2, 0) == "display:0"
    assert channel_name(10, 1) == "port:1"
    assert channel_name(42, 3) == "42:3"
    assert parse_channel_name("42:3") == (42, 3)


@pytest.mark.parametrize(
    ("status", "paths", "cancelled", "expected"),
    [
        ("completed", ["seamless"], False, "seamless"),
        ("completed", ["seamless", "switch-host"], False, "switch-host"),
        ("completed", ["semi-seamless", "seamless"], False, "semi-seamless"),
        ("completed", ["none"], False, "failed"),
        ("completed", ["failed"], False, "failed"),
        ("completed", [], False, "no-client"),
        ("failed", ["seamless"], False, "failed"),
        ("cancelled", ["cancelled"], False, "cancelled"),
        ("failed", ["cancelled"], True, "cancelled"),
        (None, [], False, "failed"),
    ],
)
def test_classify_outcome(
    status: str | None, paths: list[str], cancelled: bool, expected: str
) -> None:
    clients = [verdict(p) for p in paths]
    assert classify_outcome(status, clients, cancelled=cancelled) == expected


def test_embedded_seamless_needs_the_whole_handshake() -> None:
    full = ClientMigrationRecord(
        path="seamless",
        connection_id_before=5,
        connection_id_after=5,
        connection_id_kept=True,
        steps=[
            step("MIGRATE_BEGIN_SEAMLESS"),
            step("MIGRATE_CONNECTED_SEAMLESS", direction="tx"),
            step("MIGRATE"),
            step("MIGRATE_DATA"),
            step("MIGRATE_DATA", side="dst", direction="tx"),
        ],
    )
    assert embedded_path_is_seamless(full)
    no_data = full.model_copy(update={"steps": full.steps[:3]})
    assert not embedded_path_is_seamless(no_data)
    no_begin = full.model_copy(update={"steps": full.steps[1:]})
    assert not embedded_path_is_seamless(no_begin)
    new_id = full.model_copy(update={"connection_id_kept": False, "connection_id_after": 9})
    assert not embedded_path_is_seamless(new_id)
    claims_switch = full.model_copy(update={"path": "switch-host"})
    assert not embedded_path_is_seamless(claims_switch)


def test_report_json_is_one_object_with_the_contract_fields() -> None:
    report = MigrationReport(
        outcome="seamless",
        seamless=True,
        started_at=dt.datetime(2026, 11, 21, tzinfo=dt.UTC),
        source=Endpoint(qmp="/run/a.qmp"),
        destination=Endpoint(qmp="/run/b.qmp"),
        migrate_uri="tcp:127.0.0.1:1",
        client_target="127.0.0.1:5901",
        clients=[verdict("seamless")],
        stream=StreamStats(records=10, gaps=0, duplicates=0),
    )
    data = json.loads(report.model_dump_json())
    assert data["outcome"] == "seamless"
    assert data["stream"]["records"] == 10
    assert {"gaps", "duplicates"} <= set(data["stream"])
    assert data["clients"][0]["connection_id_kept"] is True
    for key in ("total_time_ms", "downtime_ms", "setup_time_ms", "transferred_bytes", "passes"):
        assert key in data["migration"]
    assert MigrationReport.model_validate_json(report.model_dump_json()) == report


def test_outcome_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="outcome"):
        MigrationReport.model_validate(
            {
                "outcome": "fine",
                "started_at": "2026-11-21T00:00:00Z",
                "source": {"qmp": "a"},
                "destination": {"qmp": "b"},
                "migrate_uri": "x",
                "client_target": "y",
            }
        )


def test_progress_from_query_migrate() -> None:
    info = {
        "status": "active",
        "total-time": 1200,
        "ram": {
            "total": 1000,
            "remaining": 250,
            "transferred": 800,
            "mbps": 80.0,
            "dirty-pages-rate": 12,
            "dirty-sync-count": 2,
        },
    }
    progress = MigrationProgress.from_query(info)
    assert progress.percent == 75.0
    assert progress.mb_per_s == 10.0
    assert progress.passes == 2
    assert "pass 2" in progress.line()
    done = MigrationProgress.from_query(
        {"status": "completed", "ram": {"total": 1, "remaining": 1}}
    )
    assert done.percent == 100.0
    # precopy shows at most 99 % until QEMU says completed
    almost = MigrationProgress.from_query({"status": "active", "ram": {"total": 5, "remaining": 0}})
    assert almost.percent == 99.0


def test_reporter_is_log_lines_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    reporter = make_reporter()
    assert isinstance(reporter, LogReporter)  # pytest's stderr is not a TTY
    assert isinstance(make_reporter(quiet=True), NullReporter)
    with caplog.at_level(logging.INFO, logger="spice_libvirt.migration.progress"):
        reporter.phase("link-wait", "linked in 40 ms")
        reporter.update(MigrationProgress(status="active", percent=50.0))
        reporter.update(MigrationProgress(status="active", percent=51.0))  # rate-limited
        reporter.update(MigrationProgress(status="completed", percent=100.0))
        reporter.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "link-wait: linked in 40 ms"
    assert len(lines) == 3
    assert "completed" in lines[-1]
