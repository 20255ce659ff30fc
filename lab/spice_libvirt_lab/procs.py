"""Process identity and inter-process locks for the labs.

The labs end only processes they started, by PID; a PID alone can be recycled, so a process
is identified by (PID, start time). Lab commands from several shells serialise on a file
lock with a bounded wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from spice_libvirt.errors import LabError


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: the fields after the last ')' are fixed
    return stat[stat.rindex(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (clock ticks since boot), None if no such process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def proc_state(pid: int) -> str | None:
    """The one-letter state (R, S, Z, ...), None if no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def same_process_alive(pid: int, start_time: int | None) -> bool:
    """True while ``pid`` is still the process that started at ``start_time`` and not a zombie."""
    return proc_start_time(pid) == start_time and proc_state(pid) not in (None, "Z", "X")


def same_process_present(pid: int, start_time: int | None) -> bool:
    """True while ``pid`` is still the process that started at ``start_time``, a zombie
    included: an ended process stays in the process table until its parent reaps it."""
    return start_time is not None and proc_start_time(pid) == start_time


def _open_pidfd(pid: int, start_time: int | None) -> int | None:
    """A pidfd for ``pid`` if it still is the process that started at ``start_time``.

    The identity is checked *after* opening, so a PID recycled in between is never waited on.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if not same_process_alive(pid, start_time):
        os.close(fd)
        return None
    return fd


def wait_exit(pid: int, start_time: int | None, timeout: float) -> bool:
    """Block until the process ends (exits or becomes a zombie); False after ``timeout``.

    Waits on a pidfd, which the kernel makes readable when the process ends: no polling.
    """
    fd = _open_pidfd(pid, start_time)
    if fd is None:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(fd)


async def wait_exit_async(pid: int, start_time: int | None, timeout: float) -> bool:
    """:func:`wait_exit` on the running event loop (a reader on the pidfd)."""
    fd = _open_pidfd(pid, start_time)
    if fd is None:
        return True
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    loop.add_reader(fd, ended.set)
    try:
        async with asyncio.timeout(timeout):
            await ended.wait()
        return True
    except TimeoutError:
        return not same_process_alive(pid, start_time)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout: float, busy: str, poll: float = 0.05) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    :raise LabError: with ``busy`` as the message when the lock is not free within ``timeout``
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(busy) from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_daemonizing(argv: list[str], log: Path, what: str, *, timeout: float) -> None:
    """Run a command that starts daemons and returns (their output appended to ``log``).

    :raise LabError: it did not return within ``timeout``, or failed (with the log's tail)
    """
    with open(log, "ab") as out:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=timeout,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{what}: the daemons did not start in time") from exc
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-600:].strip()
        raise LabError(f"{what}: daemon start failed: {tail}")
