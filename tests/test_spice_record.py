"""The one-line path summary people read in the terminal."""

from __future__ import annotations

from spice_libvirt.spice.record import ClientMigrationRecord, PathStep


def step(side: str, direction: str, message: str) -> PathStep:
    return PathStep(t_ms=0.0, channel="main:0", side=side, direction=direction, message=message)  # type: ignore[arg-type]


def test_path_summary_counts_in_first_seen_order_and_drops_noise() -> None:
    record = ClientMigrationRecord(
        path="seamless",
        connection_id_before=1,
        steps=[
            step("src", "rx", "MIGRATE_BEGIN_SEAMLESS"),
            step("dst", "event", "LINKED"),
            step("dst", "event", "LINKED"),
            step("src", "rx", "MIGRATE"),
            step("dst", "event", "SWAPPED"),
            step("src", "rx", "MIGRATE"),
            step("dst", "event", "DONE:seamless"),
        ],
    )
    assert record.path_summary() == (
        "src:MIGRATE_BEGIN_SEAMLESS -> dst:LINKED x2 -> src:MIGRATE x2 -> dst:DONE:seamless"
    )
