"""Old home of progress reporting: it lives in :mod:`spice_libvirt.migration.progress`."""

from spice_libvirt.migration.progress import (
    LogReporter,
    MigrationProgress,
    NullReporter,
    ProgressReporter,
    RichReporter,
    RunLog,
    make_reporter,
)

__all__ = [
    "LogReporter",
    "MigrationProgress",
    "NullReporter",
    "ProgressReporter",
    "RichReporter",
    "RunLog",
    "make_reporter",
]
