"""Where the VM runs after a failed or interrupted migration, from evidence on both ends.

A report that says "the VM still runs on the source" without asking is how a VM ends up
running twice or nowhere: QEMU keeps migrating after its QMP client went away, libvirt
finishes a job after its caller died, a destination can be half-started. So after anything
but a clean completion both controllers ask *both* hypervisors and hand what they saw here;
the answer is one of ``source``, ``destination``, ``both`` (split brain), ``none`` (the
guest runs nowhere) or ``unknown`` (the evidence is missing) -- never a guess.

Pure: no I/O, no clock. Also home of :func:`run_to_completion`, the one way an undo step
runs (shielded from cancellation, bounded by a timeout).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable
from typing import Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What one end says about the guest:
#: ``running`` executes there; ``paused`` exists there, stopped, but could run (a source
#: paused by a failed switchover); ``incoming`` waits for a migration stream (QEMU
#: ``inmigrate``, libvirt's paused incoming domain); ``stopped`` is over there (QEMU
#: ``postmigrate``, libvirt shut off); ``absent`` no process or domain at all (the socket
#: refused, the domain is not defined/active); ``unknown`` the end did not answer.
EndState = Literal["running", "paused", "incoming", "stopped", "absent", "unknown"]
Placement = Literal["source", "destination", "both", "none", "unknown"]

#: placements that are a single host the VM runs on
SETTLED: frozenset[Placement] = frozenset({"source", "destination"})


@dataclasses.dataclass(frozen=True)
class PlacementVerdict:
    placement: Placement
    reason: str


def decide_placement(source: EndState, destination: EndState) -> PlacementVerdict:
    """Where the guest runs, given what each end says (see :data:`EndState`).

    A destination QEMU starts the guest only once the whole state has arrived and the
    source stopped for good, so ``destination running`` with the source unreachable is
    still evidence for the destination; the converse (a running source, the destination
    silent) is evidence for the source, because a destination can run the guest only
    after the source stopped it.
    """
    seen = f"source {source}, destination {destination}"
    src_runs = source == "running"
    dst_runs = destination == "running"
    if src_runs and dst_runs:
        return PlacementVerdict("both", f"{seen}: the guest runs on BOTH hosts")
    if src_runs:
        return PlacementVerdict("source", seen)
    if dst_runs:
        return PlacementVerdict("destination", seen)
    if source == "paused" and destination in ("incoming", "absent", "stopped"):
        # a paused source is the guest's only copy: it is where the VM is (to be resumed)
        return PlacementVerdict("source", f"{seen}: the source holds the only copy, paused")
    if destination == "paused" and source in ("stopped", "absent"):
        return PlacementVerdict("destination", f"{seen}: the destination holds it, paused")
    if "unknown" in (source, destination):
        return PlacementVerdict("unknown", f"{seen}: not enough evidence")
    if source == "paused" and destination == "paused":
        return PlacementVerdict("unknown", f"{seen}: both paused (mid-switchover?)")
    return PlacementVerdict("none", f"{seen}: the guest runs nowhere")


async def _bounded(aw: Awaitable[T], timeout: float, what: str) -> T | None:
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except TimeoutError:
        log.warning("%s: not done within %g s", what, timeout)
        return None


async def run_to_completion(aw: Awaitable[T], timeout: float, what: str) -> T | None:
    """Run an undo step to its end even if the caller is cancelled meanwhile; None if it
    did not finish within ``timeout``.

    A cancellation (Ctrl-C, SIGTERM, an outer timeout) that arrives during the step does
    not cut it: the step finishes (or times out), then the cancellation is re-raised, so
    the caller still unwinds as asked -- only after the VM is put right.
    """
    task = asyncio.ensure_future(_bounded(aw, timeout, what))
    interrupted = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done() and task.cancelled():  # pragma: no cover - only we hold it
                raise
            interrupted = True
    if interrupted:
        raise asyncio.CancelledError
    return result


__all__ = [
    "SETTLED",
    "EndState",
    "Placement",
    "PlacementVerdict",
    "decide_placement",
    "run_to_completion",
]
