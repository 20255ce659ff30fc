"""libvirt's job statistics (``virDomainGetJobStats``) in the report's and the progress
display's units -- the libvirt counterpart of ``query-migrate`` on the QEMU path."""

from __future__ import annotations

from typing import Any

from spice_libvirt.migration.progress import MigrationProgress
from spice_libvirt.migration.report import MigrationFigures


def figures_from_stats(stats: dict[str, Any], figures: MigrationFigures) -> None:
    """Fill ``figures`` from a completed job's statistics."""

    def get(key: str) -> int | None:
        value = stats.get(key)
        return int(value) if value is not None else None

    figures.total_time_ms = get("time_elapsed") or figures.total_time_ms
    figures.downtime_ms = get("downtime")
    figures.setup_time_ms = get("setup_time")
    figures.transferred_bytes = get("data_processed") or get("memory_processed")
    figures.total_bytes = get("data_total") or get("memory_total")
    figures.normal_pages = get("memory_normal")
    figures.duplicate_pages = get("memory_constant")
    bps = stats.get("memory_bps")
    figures.mbps = round(float(bps) * 8 / 1e6, 3) if bps else figures.mbps
    figures.passes = get("memory_iteration")
    figures.dirty_pages_rate = get("memory_dirty_rate")


def progress_from_stats(stats: dict[str, Any]) -> MigrationProgress:
    """One progress sample of a running job (precopy stays at most 99 %)."""
    total = int(stats.get("data_total", 0) or 0)
    remaining = int(stats.get("data_remaining", 0) or 0)
    return MigrationProgress(
        status="active",
        elapsed_ms=int(stats.get("time_elapsed", 0) or 0),
        percent=round(min(99.0, 100.0 * (total - remaining) / total), 1) if total else 0.0,
        transferred_bytes=int(stats.get("data_processed", 0) or 0),
        remaining_bytes=remaining,
        total_bytes=total,
        mbps=float(stats.get("memory_bps", 0) or 0) * 8 / 1e6,
        dirty_pages_rate=int(stats.get("memory_dirty_rate", 0) or 0),
        passes=int(stats.get("memory_iteration", 0) or 0),
    )


__all__ = ["figures_from_stats", "progress_from_stats"]
