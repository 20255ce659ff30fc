"""Old home of the verdict models: they live in :mod:`spice_libvirt.migration.report`."""

from spice_libvirt.migration.report import (
    CHANNEL_TYPE_NAMES,
    CHANNEL_TYPE_NUMBERS,
    ClientVerdict,
    Endpoint,
    LinkWait,
    MigrationFigures,
    MigrationReport,
    Outcome,
    PhaseTiming,
    channel_name,
    classify_outcome,
    embedded_path_is_seamless,
    parse_channel_name,
)

__all__ = [
    "CHANNEL_TYPE_NAMES",
    "CHANNEL_TYPE_NUMBERS",
    "ClientVerdict",
    "Endpoint",
    "LinkWait",
    "MigrationFigures",
    "MigrationReport",
    "Outcome",
    "PhaseTiming",
    "channel_name",
    "classify_outcome",
    "embedded_path_is_seamless",
    "parse_channel_name",
]
