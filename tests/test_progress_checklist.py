"""Migration phases on a terminal: a checklist beside the bar, not log records.

The run is a real :class:`~spice_libvirt.migration.progress.RunLog` driven the way both
controllers drive it (timed phases, a retroactive ``record``, progress samples, a failed
phase), in a child process whose stderr is a real pseudo-terminal, so ``make_reporter``
decides for itself. Off a terminal (a pipe) the same run gives the log lines it always did.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time

_RUN = """
import asyncio, logging, sys
from spice_libvirt.migration.progress import MigrationProgress, RunLog, make_reporter

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

async def main() -> None:
    log = RunLog(make_reporter())
    print(type(log.reporter).__name__, file=sys.stdout, flush=True)
    async with log.phase("preflight"):
        await asyncio.sleep(0.01)
    async with log.phase("transfer"):
        for pct in (10.0, 55.0, 99.0):
            log.reporter.update(MigrationProgress(status="active", percent=pct, mbps=80.0))
            await asyncio.sleep(0.05)
        log.reporter.update(MigrationProgress(status="completed", percent=100.0))
    log.record("verdict", log.t0, detail="seamless")
    try:
        async with log.phase("cleanup"):
            raise RuntimeError("source gone")
    except RuntimeError:
        pass
    log.reporter.close()

asyncio.run(main())
"""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def _env() -> dict[str, str]:
    return dict(os.environ, LC_ALL="C.UTF-8", COLUMNS="100", TERM="xterm")


def test_phases_are_a_checklist_on_a_terminal() -> None:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUN], stdout=subprocess.PIPE, stderr=secondary, env=_env()
    )
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.decode().strip() == "RichReporter"
    screen = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    # the final frame: every phase once, with its mark, time and detail
    assert re.search(r"✓ preflight +\d+ ms", screen), screen
    assert re.search(r"✓ transfer +\d+ ms", screen), screen
    assert re.search(r"✓ verdict +\d+ ms +seamless", screen), screen
    assert re.search(r"✗ cleanup +\d+ ms +source gone", screen), screen
    assert "migration completed" in screen
    # no log records: no source-file links, no logger names, no timestamps per phase
    assert "progress.py" not in screen
    assert "spice_libvirt.migration.progress" not in screen
    assert "INFO" not in screen


def test_off_a_terminal_the_phases_stay_log_lines() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN], capture_output=True, text=True, env=_env(), timeout=60,
        check=True,
    )  # fmt: skip
    assert proc.stdout.strip() == "LogReporter"
    messages = [line.split(": ", 1)[1] for line in proc.stderr.splitlines() if "INFO: " in line]
    assert messages[0] == "preflight"
    assert "transfer" in messages
    assert "verdict: seamless" in messages
    assert "✓" not in proc.stderr
