"""What the fault matrix checks after every fault, on real processes (tests and benchmark).

A fault scenario breaks something at a chosen moment of a real migration; afterwards the
same invariants must hold whatever broke: the VM runs on exactly one host (asked of both
ends), no migration job is left, the source's bandwidth is back to what it was, nothing
keeps running. This module holds the observation side -- a snapshot of both libvirtds or
both QEMUs -- and the CLI runner that delivers a signal when a condition is seen.

Conditions are *observed* states (a job exists, the throttle is in place), not times:
the runner looks at the hypervisors, bounded, and signals the moment the state is there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
#: QEMU's max-bandwidth while the libvirt controller holds a migration (bytes/s)
HOLD_BYTES_PER_S = 4096


@dataclasses.dataclass
class CliRun:
    """One CLI run that a signal interrupted (or not)."""

    returncode: int
    stdout: str
    stderr: str
    #: seconds from start to the signal (None: the condition was never seen)
    signalled_after_s: float | None
    #: seconds from the signal to the process's exit
    exit_after_signal_s: float | None

    def json(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.stdout)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Look at ``condition`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def handler_installed(pid: int, sig: int = signal.SIGTERM) -> bool:
    """Process ``pid`` catches ``sig``: the CLI's own code runs (its SIGTERM handler is
    the first thing it installs), so a signal now reaches it, not the interpreter's start."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def run_cli_interrupted(
    argv: list[str],
    when: Callable[[], bool] | None,
    sig: int = signal.SIGINT,
    *,
    timeout: float = 180.0,
    when_timeout: float = 60.0,
) -> CliRun:
    """``spice-libvirt argv``; send ``sig`` once ``when()`` holds (None: as soon as the
    CLI's code runs, i.e. in its preflight).

    The CLI starts as a user's would for SIGINT (Python's default handler, whatever this
    process inherited) and, for SIGTERM, as a script's background job does: with SIGINT
    *ignored* -- SIGTERM must undo the migration whatever SIGINT's disposition is.
    """
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    disposition = "default_int_handler" if sig == signal.SIGINT else "SIG_IGN"
    boot = (
        "import signal, sys\n"
        f"signal.signal(signal.SIGINT, signal.{disposition})\n"
        "from spice_libvirt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", boot, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPOSITORY,
    )
    signalled: float | None = None
    try:
        ready = when or (lambda: handler_installed(proc.pid))
        seen = wait_for(lambda: proc.poll() is not None or ready(), when_timeout, 0.002)
        if seen and proc.poll() is None:
            signalled = time.monotonic()
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # only ours, by PID
            proc.kill()
            proc.communicate(timeout=30)
    t_end = time.monotonic()
    return CliRun(
        returncode=proc.returncode,
        stdout=out,
        stderr=err,
        signalled_after_s=None if signalled is None else round(signalled - t0, 3),
        exit_after_signal_s=None if signalled is None else round(t_end - signalled, 3),
    )


# --------------------------------------------------------------------------- libvirt


@dataclasses.dataclass
class HostView:
    """One libvirtd's view of the domain."""

    state: str  # running | paused | shutoff | absent | unreachable
    job: int | None = None  # virDomainJobType, 0 = none
    max_speed_mibs: int | None = None
    qemu_max_bandwidth: int | None = None


def libvirt_host_view(uri: str, domain: str, *, qmp: bool = True) -> HostView:
    """``qmp=False``: without QEMU's max-bandwidth, read through the monitor passthrough,
    which taints the domain (for a lab whose tests check that nothing did)."""
    import libvirt
    import libvirt_qemu  # type: ignore[import-untyped]

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return HostView("unreachable")
    try:
        try:
            dom = conn.lookupByName(domain)
        except libvirt.libvirtError:
            return HostView("absent")
        if not dom.isActive():
            return HostView("shutoff")
        state = dom.state()[0]
        name = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused"}
        view = HostView(name.get(state, f"state-{state}"))
        try:
            view.job = int(dom.jobInfo()[0])
            view.max_speed_mibs = int(dom.migrateGetMaxSpeed(0))
            if not qmp:
                return view
            reply = libvirt_qemu.qemuMonitorCommand(
                dom, '{"execute":"query-migrate-parameters"}', 0
            )
            view.qemu_max_bandwidth = json.loads(reply)["return"]["max-bandwidth"]
        except libvirt.libvirtError:
            pass
        return view
    finally:
        conn.close()


def libvirt_views(uris: dict[str, str], domain: str, *, qmp: bool = True) -> dict[str, HostView]:
    return {name: libvirt_host_view(uri, domain, qmp=qmp) for name, uri in uris.items()}


def running_on(views: dict[str, HostView]) -> list[str]:
    return [name for name, v in views.items() if v.state == "running"]


def settled(views: dict[str, HostView]) -> bool:
    """Exactly one host runs the domain, the other has none of it, and no job anywhere."""
    others = [v for v in views.values() if v.state != "running"]
    return (
        len(running_on(views)) == 1
        and all(v.state in ("absent", "shutoff") for v in others)
        and all(not v.job for v in views.values())
    )


def throttled(uri: str, domain: str, bytes_per_s: int = HOLD_BYTES_PER_S) -> bool:
    """The hold is in place on ``uri``: a job runs and QEMU's max-bandwidth is the hold's."""
    view = libvirt_host_view(uri, domain)
    return bool(view.job) and view.qemu_max_bandwidth == bytes_per_s


def job_running(uri: str, domain: str) -> bool:
    return bool(libvirt_host_view(uri, domain).job)


def qemu_pids_in(netns_name: str, domain: str) -> list[int]:
    """PIDs of the QEMU running ``domain`` inside network namespace ``netns_name``."""
    try:
        target = os.stat(f"/run/netns/{netns_name}").st_ino
    except OSError:
        return []
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino != target:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and f"guest={domain}".encode() in b",".join(argv):
            found.append(int(entry.name))
    return found


def record_row(**row: Any) -> None:
    """Append one fault-matrix row to ``$SPICE_LIBVIRT_FAULT_ROWS`` (the benchmark sets
    it; a plain test run writes nothing)."""
    path = os.environ.get("SPICE_LIBVIRT_FAULT_ROWS")
    if not path:
        return
    row.setdefault("test", os.environ.get("PYTEST_CURRENT_TEST", "").removesuffix(" (call)"))
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(row, sort_keys=True, default=str) + "\n")
