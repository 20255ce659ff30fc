"""A private X server and remote-viewer processes, and remote-viewer's own log as an oracle.

Tests and benchmarks (which import this module, never the other way round) need the same
things: an ``Xvfb`` on a display nobody else uses, a ``remote-viewer`` with a private HOME
(it never reads or writes the user's settings), started in the lab's client namespace or in
the root one, with or without TLS, and its ``SPICE_DEBUG`` log read as an account of the
migration that is independent of QMP and of our own verdict. Every process is ended by its
own PID, also when the caller fails.

``Xvfb -displayfd`` picks a free display number itself and writes it to a pipe, so two
runs starting X servers at the same time never race for ``:N``.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spice_libvirt.errors import LabError
from spice_libvirt.migration.evidence import Sessions
from spice_libvirt_lab import netns

XVFB = "Xvfb"
REMOTE_VIEWER = "remote-viewer"
#: the channels remote-viewer opens to the lab guests (firmware or linux)
VIEWER_CHANNELS = frozenset({"main:0", "display:0", "inputs:0", "cursor:0", "port:0"})


def missing_tools() -> list[str]:
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


# --------------------------------------------------------------------------- X server


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
    """Run an Xvfb on a free display for the block; ended by PID afterwards."""
    log_path = workdir / "xvfb.log"
    read_fd, write_fd = os.pipe()
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    XVFB,
                    "-displayfd",
                    str(write_fd),
                    "-nolisten",
                    "tcp",
                    "-screen",
                    "0",
                    "1024x768x24",
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


# --------------------------------------------------------------------------- remote-viewer


@dataclass(frozen=True)
class ViewerTls:
    """remote-viewer verifying ``ca_file`` and ``subject``, every channel required on TLS."""

    ca_file: Path
    subject: str

    def argv(self) -> list[str]:
        return [
            f"--spice-ca-file={self.ca_file}",
            f"--spice-host-subject={self.subject}",
            "--spice-secure-channels=all",
        ]


class RemoteViewer:
    """One remote-viewer process; its stdout+stderr (the SPICE_DEBUG log) go to ``log_path``."""

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

    def wait_channels(self, channels: int = len(VIEWER_CHANNELS), timeout: float = 30.0) -> None:
        """Until the log says ``channels`` channels are up (LabError if it exits or times out)."""
        deadline = time.monotonic() + timeout
        while self.log_text().count("channel up") < channels:
            if not self.alive():
                raise LabError(f"remote-viewer exited ({self.proc.returncode}): {self.log_path}")
            if time.monotonic() > deadline:
                raise LabError(f"remote-viewer did not link {channels} channels: {self.log_path}")
            time.sleep(0.05)

    def wait_relinked(self, mark: int, channels: int = 5, timeout: float = 15.0) -> None:
        """After a switch-host (in the log after ``mark``), until every channel is up again.

        A client killed while it re-links makes spice-server 0.15 crash the destination
        QEMU, so a viewer is stopped only once its channels are back (bounded, no error).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            segment = self.log_text()[mark:]
            at = segment.rfind("migrate-switch-host")
            if at < 0 or segment[at:].count("channel up") >= channels:
                return
            time.sleep(0.1)

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
    debug: bool = True,
    tls: ViewerTls | None = None,
    ns: str | None = None,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> RemoteViewer:
    """Spawn ``remote-viewer URI`` on ``display``, in network namespace ``ns`` if given.

    It runs in its own session (a ^C of the test run does not hit it); the log is
    ``workdir/<name>.log``, its HOME ``workdir/<name>-home``.
    """
    home = workdir / f"{name}-home"
    home.mkdir(parents=True, exist_ok=True)
    env = viewer_env(display, home, debug=debug)
    env.update(extra_env or {})
    argv = [REMOTE_VIEWER, *(tls.argv() if tls else ()), *extra_args, uri]
    if ns is not None:
        argv = netns.exec_argv(ns, argv)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        started = time.time()
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return RemoteViewer(proc, log_path, started)


def full_session(sessions: Sessions) -> int | None:
    """The connection id of a session with every channel remote-viewer opens, or None."""
    for cid, session in sessions.items():
        if set(session.names) >= VIEWER_CHANNELS:
            return cid
    return None


# --------------------------------------------------------------------------- the log oracle

#: spice-gtk's debug line for each migration message the main channel receives
#: (channel-main.c, "migration message: %s" with the message's spice-protocol name)
_MESSAGE = re.compile(r"migration message: (migrate-[a-z-]+)")
_TS = re.compile(r"GSpice-DEBUG: (\d\d):(\d\d):(\d\d\.\d+):")


def migration_messages(segment: str) -> list[str]:
    """The migration messages the main channel received, in order."""
    return _MESSAGE.findall(segment)


def log_time(line: str) -> float | None:
    """Seconds since midnight of a GSpice-DEBUG line's timestamp, or None."""
    m = _TS.search(line)
    if not m:
        return None
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])


@dataclass(frozen=True)
class ViewerOutcome:
    """What remote-viewer's log says about one migration."""

    #: seamless | semi-seamless | switch-host; None while the log is not conclusive
    path: str | None
    #: switch-host: from the switch to the new display channel up (seamless: 0)
    display_outage_s: float | None
    #: from migrate-begin-seamless to "connections all ok" (the client's links to the
    #: destination)
    link_s: float | None


def viewer_outcome(segment: str) -> ViewerOutcome:
    """The oracle, from the log written after the migration began (``log_text()[mark:]``).

    ``migrate-switch-host`` means the session was reset (conclusive once the new display
    channel is up); ``migrate-end`` is the semi-seamless path; spice-gtk's "all channel
    migrated, success" is a seamless migration of every channel.
    """
    lines = segment.splitlines()
    begin = next((log_time(x) for x in lines if "migrate-begin-seamless" in x), None)
    allok = next((log_time(x) for x in lines if "connections all ok" in x), None)
    link = round(allok - begin, 3) if begin is not None and allok is not None else None
    for i, line in enumerate(lines):
        if "migrate-switch-host" in line:
            t0 = log_time(line)
            up = next((log_time(x) for x in lines[i + 1 :] if "display-2:0: channel up" in x), None)
            if up is None or t0 is None:
                return ViewerOutcome(None, None, link)
            return ViewerOutcome("switch-host", round(up - t0, 3), link)
        if "migration message: migrate-end" in line:
            return ViewerOutcome("semi-seamless", None, link)
    if any("all channel migrated, success" in x for x in lines):
        return ViewerOutcome("seamless", 0.0, link)
    return ViewerOutcome(None, None, link)


def wait_outcome(viewer: RemoteViewer, mark: int, timeout: float = 10.0) -> ViewerOutcome:
    """:func:`viewer_outcome` once the log after ``mark`` is conclusive (spice-gtk logs
    after acting), or what it says at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = viewer_outcome(viewer.log_text()[mark:])
        if found.path is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
