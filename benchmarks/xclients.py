"""A private X server and remote-viewer processes for benchmarks and tests.

Why a module of its own: both ``bench_link.py`` and ``tests/test_remote_viewer.py`` need
the same two things -- an ``Xvfb`` on a display nobody else uses, and a ``remote-viewer``
started with a private HOME so it never reads or writes the user's settings -- and both
must end exactly the processes they started, by PID, even when the caller fails.

``Xvfb -displayfd`` picks a free display number itself and writes it to a pipe, so two
helpers starting X servers at the same time never race for ``:N``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from spice_libvirt.errors import LabError

XVFB = "Xvfb"
REMOTE_VIEWER = "remote-viewer"


def have_tools() -> list[str]:
    """The tools this module needs that are not installed (empty: all there)."""
    return [tool for tool in (XVFB, REMOTE_VIEWER) if shutil.which(tool) is None]


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps. Only ``proc``'s own PID."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return proc.wait(timeout)


class XServer:
    """One Xvfb; ``display`` is ``":N"``."""

    def __init__(self, proc: subprocess.Popen[bytes], display: str, log_path: Path) -> None:
        self.proc = proc
        self.display = display
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        _stop(self.proc)


@contextlib.contextmanager
def xvfb(workdir: Path, timeout: float = 10.0) -> Iterator[XServer]:
    """Run an Xvfb on a free display for the block; killed by PID afterwards."""
    log_path = workdir / "xvfb.log"
    read_fd, write_fd = os.pipe()
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    XVFB,
                    "-displayfd",
                    str(write_fd),
                    "-screen",
                    "0",
                    "1024x768x24",
                    "-nolisten",
                    "tcp",
                ],
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        os.close(write_fd)
        write_fd = -1
        server = XServer(proc, "", log_path)
        try:
            ready, _, _ = select.select([read_fd], [], [], timeout)
            number = os.read(read_fd, 64).decode().strip() if ready else ""
            if not number.isdigit():
                tail = log_path.read_text(errors="replace")[-800:]
                raise LabError(f"Xvfb announced no display within {timeout:g} s:\n{tail}")
            server.display = f":{number}"
            yield server
        finally:
            server.stop()
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


class RemoteViewer:
    """One remote-viewer process; its stdout+stderr go to ``log_path``."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, started: float) -> None:
        self.proc = proc
        self.log_path = log_path
        #: time.time() just before the process was spawned
        self.started = started

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        return _stop(self.proc)


def viewer_env(display: str, home: Path, *, debug: bool) -> dict[str, str]:
    """The environment of a remote-viewer: private HOME and runtime dir, no a11y bus.

    ``NO_AT_BRIDGE`` and the in-memory GSettings backend keep GTK from waiting on a session
    D-Bus that does not exist here; they shorten start-up without touching SPICE itself.
    """
    runtime = home / "run"
    runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DISPLAY": display,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "NO_AT_BRIDGE": "1",
        "GSETTINGS_BACKEND": "memory",
        "LANG": "C.UTF-8",
    }
    if debug:
        env["SPICE_DEBUG"] = "1"
    return env


def start_viewer(
    uri: str,
    display: str,
    workdir: Path,
    *,
    name: str = "rv",
    debug: bool = False,
    extra_env: Mapping[str, str] | None = None,
) -> RemoteViewer:
    """Spawn ``remote-viewer URI`` on ``display`` (in its own session, so ^C does not hit it)."""
    home = workdir / f"{name}-home"
    home.mkdir(parents=True, exist_ok=True)
    env = viewer_env(display, home, debug=debug)
    env.update(extra_env or {})
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        started = time.time()
        proc = subprocess.Popen(
            [REMOTE_VIEWER, uri],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RemoteViewer(proc, log_path, started)
