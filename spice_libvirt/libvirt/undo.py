"""Putting a libvirt migration right after an error or an interruption, and saying where
the domain runs.

The hold makes the migration job crawl (1 MiB/s, or 4 KiB/s throttled); a controller that stops caring about it
-- Ctrl-C, SIGTERM, an error in the release -- would leave it crawling for hours with the
domain paused on the destination. So every exit path other than a clean
completion comes here: the job is aborted (or, if libvirt refuses because it is already
switching over, released so it completes), its end awaited, QEMU's ``max-bandwidth`` put
back if our passthrough throttle outlived the job, a source that libvirt left paused
resumed, and both libvirtds asked -- over *fresh* connections, since either may have
restarted -- where the domain runs (:func:`spice_libvirt.migration.placement.decide_placement`).

Each step is bounded; the caller runs the whole undo through
:func:`~spice_libvirt.migration.placement.run_to_completion`, so a second cancellation
cannot cut it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from spice_libvirt import errors
from spice_libvirt.libvirt.connection import Connection, require_libvirt
from spice_libvirt.libvirt.hold import release_hold
from spice_libvirt.migration.placement import EndState, PlacementVerdict, decide_placement

#: how long the job may take to end once aborted (libvirt's Finish/Confirm round trip)
JOB_END_TIMEOUT = 30.0
#: how long both hosts may take to settle (the destination's incoming domain destroyed,
#: the source resumed) before the placement is taken as it stands
SETTLE_TIMEOUT = 30.0
#: how long an abort refused for want of a job is retried (the job is about to start)
ABORT_RETRY = 5.0
#: a source paused this long with nothing on the destination is resumed by us
RESUME_AFTER = 5.0


@dataclasses.dataclass
class JobUndo:
    """What it takes to undo one running ``migrateToURI3``."""

    src: Connection
    dom: Any
    migration: asyncio.Task[Any]
    #: the domain's libvirt migration speed (MiB/s) and downtime (ms) before, for a release
    orig_speed: int
    orig_downtime: int | None
    #: QEMU's own max-bandwidth before the migration (bytes/s; None: not read)
    qemu_bandwidth_before: int | None
    note: Callable[[str], None]

    async def run(self) -> bool | None:
        """Abort or finish the job; True if QEMU's bandwidth is as before (None: unknown)."""
        if not self.migration.done():
            await self._abort_or_release()
        return await self._restore_bandwidth()

    async def _abort_or_release(self) -> None:
        # right after migrateToURI3 was called libvirt may not have started the job yet
        # ("no job is active"): try again briefly before settling for a completion
        deadline = time.monotonic() + ABORT_RETRY
        while True:
            try:
                await self.src.call(self.dom.abortJob, "abort the migration job", timeout=10.0)
                self.note("undo: migration job aborted")
                break
            except errors.LibvirtError as exc:
                if self.migration.done() or time.monotonic() >= deadline:
                    self.note(f"undo: abortJob refused ({exc}): releasing the hold")
                    await self._release()
                    break
            await asyncio.wait({self.migration}, timeout=0.2)
        if await self._job_ended(JOB_END_TIMEOUT):
            return
        self.note("undo: the job did not end after abortJob: releasing the hold")
        await self._release()
        if not await self._job_ended(JOB_END_TIMEOUT):
            self.note(f"undo: the migration job still runs after {2 * JOB_END_TIMEOUT:.0f} s")

    async def _release(self) -> None:
        with contextlib.suppress(errors.LibvirtError):
            await release_hold(self.src, self.dom, self.orig_speed, self.orig_downtime, 10.0)

    async def _job_ended(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.wait({self.migration})
        return self.migration.done()

    async def _restore_bandwidth(self) -> bool | None:
        """libvirt resets QEMU's migration parameters when its job ends; check, and put
        back what our passthrough throttle left if it did not."""
        before = self.qemu_bandwidth_before
        if before is None:
            return None
        command: dict[str, Any] = {"execute": "query-migrate-parameters"}
        try:
            now = (await self.src.qemu_monitor(self.dom, command)).get("return", {})
            current = now.get("max-bandwidth")
            if current == before:
                return True
            status = (await self.src.qemu_monitor(self.dom, {"execute": "query-migrate"})).get(
                "return", {}
            )
            if status.get("status") in ("active", "pre-switchover", "device", "setup"):
                self.note(f"undo: max-bandwidth {current}, a migration still runs: left alone")
                return False
            await self.src.qemu_monitor(
                self.dom,
                {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": before}},
            )
            self.note(f"undo: QEMU max-bandwidth put back from {current} to {before} B/s")
            return True
        except errors.LibvirtError as exc:
            self.note(f"undo: QEMU max-bandwidth not checked ({exc})")
            return None


def _state_of(lv: Any, state: int, reason: int, *, incoming_possible: bool) -> EndState:
    if state in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_BLOCKED):
        return "running"
    if state == lv.VIR_DOMAIN_PAUSED:
        if incoming_possible and reason in (
            lv.VIR_DOMAIN_PAUSED_MIGRATION,
            lv.VIR_DOMAIN_PAUSED_STARTING_UP,
        ):
            return "incoming"
        return "paused"
    return "stopped"


async def end_state(uri: str, name: str, *, destination: bool) -> tuple[EndState, Any]:
    """What one libvirtd says of domain ``name`` (over a fresh connection), and the
    connection (None if unreachable; the caller closes it)."""
    lv = require_libvirt()
    try:
        conn = await Connection.open(uri, timeout=10.0, call_timeout=10.0)
    except errors.LibvirtError:
        return "unknown", None
    try:
        dom = await conn.lookup(name)
        if not await conn.call(dom.isActive, "is active"):
            return ("absent" if destination else "stopped"), conn
        state, reason = await conn.call(dom.state, "domain state")
        return _state_of(lv, state, reason, incoming_possible=destination), conn
    except errors.LibvirtError as exc:
        not_found = type(exc).__name__ == "DomainNotFoundError"
        return ("absent" if not_found else "unknown"), conn


async def _look(source_uri: str, dest_uri: str, name: str) -> tuple[EndState, EndState, Any]:
    (src, src_conn), (dst, dst_conn) = await asyncio.gather(
        end_state(source_uri, name, destination=False),
        end_state(dest_uri, name, destination=True),
    )
    if dst_conn is not None:
        await dst_conn.close()
    return src, dst, src_conn


async def settle_placement(
    source_uri: str,
    dest_uri: str,
    name: str,
    *,
    was_running: bool,
    note: Callable[[str], None],
    timeout: float = SETTLE_TIMEOUT,
) -> tuple[PlacementVerdict, EndState, EndState]:
    """Ask both libvirtds until the domain runs on exactly one of them (bounded); resume a
    source left paused with nothing on the destination; the placement as it then stands,
    with what each end said."""
    deadline = time.monotonic() + timeout
    paused_since: float | None = None
    while True:
        src, dst, src_conn = await _look(source_uri, dest_uri, name)
        try:
            verdict = decide_placement(src, dst)
            settled = (src == "running" and dst in ("absent", "stopped")) or (
                dst == "running" and src in ("stopped", "absent")
            )
            now = time.monotonic()
            orphan = src == "paused" and dst in ("absent", "stopped") and was_running
            paused_since = (paused_since or now) if orphan else None
            # libvirt resumes the source itself when it cancels a job; if it has not
            # after a while, the guest's only copy is frozen: resume it
            if paused_since is not None and now - paused_since > RESUME_AFTER and src_conn:
                await _resume(src_conn, name, note)
                paused_since = None
            if settled or now >= deadline:
                return verdict, src, dst
        finally:
            if src_conn is not None:
                await src_conn.close()
        # libvirt has no event for "the peer's incoming domain is gone": look again soon
        await asyncio.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


async def _resume(conn: Connection, name: str, note: Callable[[str], None]) -> bool:
    try:
        dom = await conn.lookup(name)
        await conn.call(dom.resume, "resume the source", timeout=10.0)
    except errors.LibvirtError as exc:
        note(f"undo: resuming the paused source failed: {exc}")
        return False
    note("undo: the source was left paused with nothing on the destination: resumed")
    return True


__all__ = ["JobUndo", "end_state", "settle_placement"]
