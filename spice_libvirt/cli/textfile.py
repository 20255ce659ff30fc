"""What ``migrate`` and ``evacuate`` add to node_exporter's textfile collector.

The CLI is a short-lived process that Prometheus cannot scrape; node_exporter's textfile
collector is how such jobs report (``--collector.textfile.directory``: every ``*.prom``
file there is read at each scrape). The file named by ``metrics_textfile`` in the host
configuration holds our counters across runs; each run reads them back, adds its own
outcomes and writes the whole file again:

* ``spice_libvirt_controller_migrations_total{command, outcome}``: ``command`` is
  ``migrate`` or ``evacuate``; ``outcome`` the verdict (``seamless``, ``switch-host``...)
  or ``error`` when the command failed before it had one;
* ``spice_libvirt_controller_last_run_timestamp_seconds{command}``: when it last ran.

Written the way the collector's documentation asks: to a temporary file in the same
directory (not ``*.prom``, so a scrape never reads half a file), then renamed over the old
one; mode 0644 set explicitly (node_exporter runs as another user); a symlink in the
file's place is refused, not followed. Runs that end at the same moment take turns on a
lock on the directory, so neither loses the other's counts. The text is the client
library's exposition (``prometheus_client``), so it parses as node_exporter parses it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from spice_libvirt.errors import SpiceLibvirtError
from spice_libvirt.files import UnsafePathError, write_file

MIGRATIONS = "spice_libvirt_controller_migrations"
LAST_RUN = "spice_libvirt_controller_last_run_timestamp_seconds"
#: what node_exporter needs to read the file (it runs as its own user)
FILE_MODE = 0o644
#: a file larger than this is not ours to parse (ours is a few hundred bytes)
MAX_BYTES = 1 << 20


class TextfileError(SpiceLibvirtError):
    """The textfile could not be read back or written."""


Counts = dict[tuple[str, str], float]


class _Snapshot(Collector):
    """The counters as they are to be written: the library renders them."""

    def __init__(self, counts: Counts, last_run: dict[str, float]) -> None:
        self.counts = counts
        self.last_run = last_run

    def collect(self) -> Iterable[Metric]:
        migrations = CounterMetricFamily(
            MIGRATIONS,
            "Migrations spice-libvirt's CLI ran, by command and outcome.",
            labels=["command", "outcome"],
        )
        for (command, outcome), value in sorted(self.counts.items()):
            migrations.add_metric([command, outcome], value)
        last = GaugeMetricFamily(
            LAST_RUN, "When the command last finished (UNIX time).", labels=["command"]
        )
        for command, at in sorted(self.last_run.items()):
            last.add_metric([command], at)
        return [migrations, last]


def render(counts: Counts, last_run: dict[str, float]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(counts, last_run))
    return generate_latest(registry).decode()


def parse(text: str) -> tuple[Counts, dict[str, float]]:
    """Our counters back from a file we wrote (anything else in it is dropped)."""
    counts: Counts = {}
    last_run: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name in (f"{MIGRATIONS}_total", MIGRATIONS):
                    key = (labels.get("command", ""), labels.get("outcome", ""))
                    counts[key] = counts.get(key, 0.0) + float(sample.value)
                elif sample.name == LAST_RUN and "command" in labels:
                    last_run[labels["command"]] = float(sample.value)
    except ValueError as exc:
        raise TextfileError(f"not a metrics file: {exc}") from exc
    return counts, last_run


def add_outcomes(path: Path, command: str, outcomes: Iterable[str], now: float) -> None:
    """Add one to ``{command, outcome}`` for each outcome; ``last_run`` = ``now``."""
    with _locked(path.parent):
        counts, last_run = parse(_read(path))
        for outcome in outcomes:
            key = (command, outcome)
            counts[key] = counts.get(key, 0.0) + 1.0
        last_run[command] = now
        _write(path, render(counts, last_run))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise TextfileError(f"{directory}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TextfileError(f"{path} is a symlink: refused") from exc
        raise TextfileError(f"{path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise TextfileError(f"{path} is larger than {MAX_BYTES} bytes: not ours")
    return data.decode(errors="replace")


def _write(path: Path, text: str) -> None:
    """The product's one way to write a file (:func:`spice_libvirt.files.write_file`): a
    temporary file beside it (not ``*.prom``), the mode set whatever the umask, renamed."""
    try:
        write_file(path, text, FILE_MODE, sync=True)
    except UnsafePathError as exc:
        raise TextfileError(f"{path}: cannot write: {exc}") from exc
