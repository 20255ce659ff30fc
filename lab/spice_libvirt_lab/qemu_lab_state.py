"""The QEMU lab's state file and process bookkeeping: what ``lab up`` started, by PID.

``lab.json`` records each QEMU with its PID *and* start time, so ``lab down`` (possibly from
another shell, after this process is gone) stops exactly the QEMUs the lab started.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from spice_libvirt import errors
from spice_libvirt_lab.memcheck import MemcheckOptions
from spice_libvirt_lab.procs import same_process_alive, wait_exit

log = logging.getLogger(__name__)

STATE_FILE = "lab.json"
#: QEMUs started by this process (see :meth:`QemuLab._start_side`)
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
SideName = Literal["a", "b"]
GuestKind = Literal["firmware", "linux", "memcheck"]


class SideState(BaseModel):
    """One QEMU of the lab, as recorded when we started it."""

    side: SideName
    role: Literal["source", "destination"]
    name: str
    pid: int
    #: /proc/<pid>/stat start time: tells our QEMU from a later process with the same PID
    start_time: int | None
    qmp_path: Path
    spice_host: str
    spice_port: int
    spice_tls_port: int | None = None
    #: the port this side listens on for an incoming migration (destination only)
    migrate_port: int | None = None
    serial_log: Path
    log_path: Path
    argv: list[str]
    started_at: dt.datetime

    @property
    def spice_uri(self) -> str:
        uri = f"spice://{self.spice_host}:{self.spice_port}"
        if self.spice_tls_port:
            uri += f"?tls-port={self.spice_tls_port}"
        return uri


TlsMode = Literal["secure", "mixed"]


class LabTls(BaseModel):
    """The lab's TLS material: one CA and one server certificate shared by both sides.

    ``mode``: ``secure`` (``tls-channel=default``: every channel refuses plain text, the
    plain port answers NEED_SECURED) or ``mixed`` (plain links accepted too). A state file
    written before modes existed was mixed, hence that default here.
    """

    directory: Path
    ca_cert: Path
    subject: str
    mode: TlsMode = "mixed"


class LabState(BaseModel):
    """The lab state file (``lab.json``)."""

    version: int = 1
    guest: GuestKind
    tls: LabTls | None = None
    accel: Literal["kvm", "tcg"]
    memory_mib: int
    #: the memcheck guest's options (its working set, dirty rate, pass interval)
    memcheck: MemcheckOptions | None = None
    directory: Path
    created_at: dt.datetime
    sides: dict[SideName, SideState]
    source: SideName = "a"
    migrations: int = 0
    last_outcome: str | None = None

    @property
    def destination(self) -> SideName:
        return "b" if self.source == "a" else "a"


class SideStatus(BaseModel):
    side: SideName
    role: str
    pid: int
    alive: bool
    qemu_status: str | None = None
    spice_uri: str
    qmp: str
    migrate_uri: str | None = None


class LabStatus(BaseModel):
    up: bool
    directory: Path
    guest: GuestKind | None = None
    #: None: no TLS
    tls_mode: TlsMode | None = None
    migrations: int = 0
    last_outcome: str | None = None
    source: SideStatus | None = None
    destination: SideStatus | None = None


# -- process bookkeeping -----------------------------------------------------------------


def side_alive(side: SideState) -> bool:
    """True while the recorded PID is still *our* QEMU and not a zombie."""
    return same_process_alive(side.pid, side.start_time)


def _reap(pid: int) -> None:
    """Collect the exit status if the QEMU is our child (same process); else nothing."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)  # it has ended (see stop_side): this only reaps it
            del _CHILDREN[pid]


def stop_side(side: SideState, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; only if the PID is still ours.

    The end of the process is awaited on a pidfd (an event), not by polling ``/proc``.
    """
    if side_alive(side):
        with contextlib.suppress(ProcessLookupError):
            os.kill(side.pid, signal.SIGTERM)
        if not wait_exit(side.pid, side.start_time, timeout):
            log.warning("QEMU %s (pid %d) ignored SIGTERM: SIGKILL", side.name, side.pid)
            if side_alive(side):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(side.pid, signal.SIGKILL)
            wait_exit(side.pid, side.start_time, 30.0)
    _reap(side.pid)
    with contextlib.suppress(OSError):
        side.qmp_path.unlink()


def _spawn_detached(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (it survives our exit and our terminal's ^C)."""
    with log_path.open("wb") as logfile:
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError as exc:
            raise errors.LabError(f"{argv[0]} is not installed") from exc


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:]) or "(log is empty)"


def state_summary(state: LabState) -> dict[str, Any]:
    """What ``lab up --json`` prints: both sides' SPICE URIs, QMP sockets and PIDs."""
    out: dict[str, Any] = {
        "directory": str(state.directory),
        "guest": state.guest,
        "accel": state.accel,
        "memory_mib": state.memory_mib,
        "tls": state.tls.model_dump(mode="json") if state.tls else None,
    }
    for role, key in (("source", state.source), ("destination", state.destination)):
        side = state.sides[key]
        out[role] = {
            "side": side.side,
            "pid": side.pid,
            "spice_uri": side.spice_uri,
            "qmp": str(side.qmp_path),
            "serial_log": str(side.serial_log),
            "migrate_uri": f"tcp:127.0.0.1:{side.migrate_port}" if side.migrate_port else None,
        }
    return out


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
