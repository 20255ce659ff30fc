"""What every benchmark script shares: the prelude, percentiles, the machine line, results.

The scripts run either way, from the repository root:

    .venv/bin/python -m benchmarks.bench_codec --rounds 7
    .venv/bin/python benchmarks/bench_codec.py --rounds 7

Run as a file, a script's directory (``benchmarks/``) is first on ``sys.path`` and the
repository is not, so each script starts with the same two-line prelude::

    if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
        import benchutil  # type: ignore[import-not-found]  # noqa: F401

which imports this module by its file name; importing it puts the repository first on
``sys.path`` (below), after which ``from benchmarks.benchutil import ...`` and
``from spice_libvirt ...`` work the same in both modes.

Every script also shares its command-line skeleton (:func:`arg_parser`: the description
from the docstring, ``--json``, ``--no-save``) and its ending (:func:`finish`: summary
and raw rows under ``benchmarks/results/``, then JSON or a markdown table on stdout).
Results are small summaries committed under ``benchmarks/results/``, with the last run's
raw rows as JSON lines next to them, so a reader can recompute any figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

RESULTS_DIR = Path(__file__).resolve().with_name("results")
S = TypeVar("S", bound=BaseModel)


def arg_parser(doc: str | None, *, summary: bool = True) -> argparse.ArgumentParser:
    """The parser every benchmark starts from: its docstring's first paragraph as the
    description; with a ``summary`` (see :func:`finish`) also ``--json`` and ``--no-save``
    (a trial run leaves the committed results alone)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    if not summary:
        return parser
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--no-save",
        dest="save",
        action="store_false",
        help="do not overwrite benchmarks/results/ (a trial run)",
    )
    return parser


def finish(
    name: str,
    summary: S,
    args: argparse.Namespace,
    markdown: Callable[[S], str],
    *,
    rows: tuple[str, Sequence[dict[str, Any]]] | None = None,
    extra: Callable[[S], None] | None = None,
) -> int:
    """Save the summary (and raw ``rows`` as ``(name, rows)``) unless ``--no-save``, then
    print it: JSON with ``--json``, else the markdown table (and ``extra``)."""
    path = None
    if args.save:
        if rows is not None:
            write_jsonl(rows[0], rows[1])
        path = write_summary(name, summary)
    if args.json:
        print(summary.model_dump_json(indent=1))
        return 0
    print(markdown(summary))
    if extra is not None:
        extra(summary)
    if path is not None:
        print(f"\nsummary written to {path}", file=sys.stderr)
    return 0


class Distribution(BaseModel):
    """Summary of one series of samples (milliseconds unless the field name says otherwise)."""

    n: int
    median: float | None = None
    p90: float | None = None
    p95: float | None = None
    min: float | None = None
    max: float | None = None


def percentile(samples: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): a value that really occurred, no interpolation.

    With 10-20 samples an interpolated p90 would invent a number between two runs; the
    nearest rank keeps the figure honest about how few samples there are.
    """
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def distribution(samples: Sequence[float], digits: int = 3) -> Distribution:
    if not samples:
        return Distribution(n=0)

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)

    return Distribution(
        n=len(samples),
        median=r(statistics.median(samples)),
        p90=r(percentile(samples, 90)),
        p95=r(percentile(samples, 95)),
        min=r(min(samples)),
        max=r(max(samples)),
    )


class Machine(BaseModel):
    """Where a figure was measured: without this line a number means little."""

    python: str = Field(default_factory=platform.python_version)
    implementation: str = Field(default_factory=platform.python_implementation)
    cpus: int = Field(default_factory=lambda: os.cpu_count() or 0)
    cpu_model: str = ""
    kernel: str = Field(default_factory=platform.release)
    load_avg_1m: float = Field(default_factory=lambda: round(os.getloadavg()[0], 2))
    measured_at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))
    versions: dict[str, str] = Field(default_factory=dict)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _tool_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def machine(*, tools: Sequence[str] = ()) -> Machine:
    """The machine line; ``tools`` adds versions of "qemu" and/or "remote-viewer"."""
    info = Machine(cpu_model=_cpu_model())
    commands = {
        "qemu": ["qemu-system-x86_64", "--version"],
        "remote-viewer": ["remote-viewer", "--version"],
    }
    for tool in tools:
        version = _tool_version(commands[tool])
        if version:
            info.versions[tool] = version
    if "remote-viewer" in tools:
        pkg = _tool_version(["dpkg-query", "-W", "-f", "${Version}", "libspice-client-gtk-3.0-5"])
        if pkg:
            info.versions["spice-gtk"] = pkg
    if "qemu" in tools:
        pkg = _tool_version(["dpkg-query", "-W", "-f", "${Version}", "libspice-server1"])
        if pkg:
            info.versions["spice-server"] = pkg
    return info


class SourceState(BaseModel):
    """The commit a figure was measured at, and whether the tree had uncommitted changes."""

    commit: str | None
    dirty: bool


def source_state() -> SourceState:
    """``git rev-parse --short HEAD`` and ``git status --porcelain`` of the repository
    (ignoring untracked files: a results file being written is not a change of the code)."""

    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPOSITORY), *argv],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return SourceState(
        commit=commit.strip() if commit else None, dirty=bool(status and status.strip())
    )


def write_summary(name: str, summary: BaseModel) -> Path:
    """Write the summary of one run to ``benchmarks/results/<name>.json`` (overwritten)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(summary.model_dump_json(indent=1) + "\n")
    return path


def write_jsonl(name: str, rows: Sequence[dict[str, Any]]) -> Path:
    """Raw per-round rows of the last run to ``benchmarks/results/<name>.jsonl`` (overwritten,
    so that the file always matches the summary next to it)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str, sort_keys=True) + "\n")
    return path


def fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"
