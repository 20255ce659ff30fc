"""When to hold a migration's switchover: the bulk moves while the client links.

QEMU 7.2 switches over as soon as the data still to send (the rest of the current pass plus
what the guest dirtied meanwhile) is below the bandwidth it measures times the downtime
limit. A 1 ms downtime limit therefore holds a guest that keeps dirtying memory, but an idle
guest is across at the end of its first pass whatever the limit. Holding the speed at
libvirt's floor (1 MiB/s) from the start holds any guest with memory to move -- and makes
the client's links (about 7 RTT) and the memory transfer run one after the other, which for
a guest that takes seconds to move (256 MiB at VDSM's 52 MiB/s: 5 s) is most of the added
time. This plan holds the *switchover*, not the bulk:

* at the start the downtime limit goes to 1 ms and the speed stays the caller's -- unless
  the caller's speed would move the whole memory before the client is expected to be
  linked (an unlimited ``virsh migrate``): then the first pass is *paced* to end about
  then, so the memory still moves while the client links;
* the progress (libvirt's ``memory_remaining``) is sampled, more often as the end of the
  pass comes near; when the rest would be sent within the guard at the pace measured, and
  the client is not yet at its release point, the hold proper goes on (1 MiB/s), with
  enough data left to keep QEMU from switching over;
* the caller's values come back at the release, as before.

``mode="bulk"`` is the hold from the start (1 MiB/s at ``setup``), kept for comparison and
for callers that want it. Everything here is arithmetic on observations: the agent
(:mod:`spice_libvirt.agent.plan`) and the controller (:mod:`spice_libvirt.libvirt.hold`)
sample and act; ``tests/test_switchover.py`` checks the rules with made-up clocks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

MIB = 1 << 20
#: the hold proper: libvirt's smallest speed (MiB/s) and downtime (ms)
HOLD_SPEED_MIBS = 1
HOLD_DOWNTIME_MS = 1
#: the part of the guest's resident memory taken to be zero pages all the same (a kernel
#: zeroes what it allocates): the lab's linux guest had 84 MiB resident for 65 MiB of data
#: sent; the hold goes on while this much of the resident set is still ahead
RESIDENT_ZERO_SHARE = 0.25
#: a guest with less non-zero memory than this is held from the start: at libvirt's 1 MiB/s
#: floor QEMU still sends 2-5 MiB/s of data (measured in the lab), so this much lasts a few
#: seconds at best, and a pass over it at any pace could end before the client has linked
NEAR_EMPTY_BYTES = 32 * MIB
#: a client links every channel in about 6.2 RTT + 50 ms (``rtt-seamless.md``, remote-viewer)
#: and its answer reaches the source one RTT after the last link: the release point
LINK_RTTS = 7.2
LINK_FIXED_S = 0.1

HoldMode = Literal["switchover", "bulk"]


def expected_link_s(rtt_s: float | None, assumed_s: float) -> float:
    """How long after the start a client with this RTT is at its release point
    (``assumed_s`` when its RTT is unknown)."""
    if rtt_s is None or rtt_s < 0:
        return assumed_s
    return LINK_RTTS * rtt_s + LINK_FIXED_S


@dataclasses.dataclass(frozen=True)
class Progress:
    """One sample of the migration's progress (libvirt's job statistics)."""

    at: float
    #: bytes of memory still to scan in the current pass (``memory_remaining``)
    remaining: int
    #: libvirt's ``memory_iteration`` (1: the first pass; 0: unknown)
    iteration: int = 0
    #: bytes of non-zero pages sent so far (``memory_normal_bytes``)
    sent_data: int = 0
    #: how late the sample came (the holder's delay, scheduling and the call itself, s)
    lag: float = 0.0


def progress_from_job_stats(stats: Mapping[str, Any], at: float, lag: float) -> Progress:
    """A sample from libvirt's job statistics (``virDomainGetJobStats``), as the agent and
    the controller both take them."""
    return Progress(
        at=at,
        lag=lag,
        remaining=int(stats.get("memory_remaining") or 0),
        iteration=int(stats.get("memory_iteration") or 0),
        sent_data=int(stats.get("memory_normal_bytes") or 0),
    )


@dataclasses.dataclass(frozen=True)
class GuestMemory:
    """What the first pass has to move, as far as the source host can tell at ``setup``."""

    #: non-zero guest memory (the guest RAM mapping's resident set: pages never touched
    #: are not resident, and are zero); None: unknown
    data_bytes: int | None
    #: memory scanned after the guest RAM (video RAM and the like: mostly zero pages)
    tail_bytes: int = 0

    @classmethod
    def of(cls, resident: int | None, ram_bytes: int, job_total: int) -> tuple[GuestMemory, int]:
        """From the guest RAM's resident set, its size and the job's memory total (0:
        not known yet): what the first pass moves, and the total to scan."""
        total = job_total or ram_bytes
        return cls(resident, max(0, total - ram_bytes) if ram_bytes else 0), total


class _Pace:
    """How fast one quantity runs down, from successive samples (the fastest counts)."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None
        self.peak: float | None = None

    def add(self, at: float, value: int, *, shrinking: bool = True) -> None:
        last, self.last = self.last, (at, value)
        if last is None or at <= last[0]:
            return
        delta = (last[1] - value) if shrinking else (value - last[1])
        if delta < 0:
            return  # a new pass: no pace
        rate = delta / (at - last[0])
        self.peak = rate if self.peak is None else max(self.peak, rate)

    def eta(self, left: int) -> float | None:
        if self.peak is None or self.peak <= 0:
            return None
        return max(0, left) / self.peak


@dataclasses.dataclass(frozen=True)
class SpeedChange:
    """A speed the holder must set now, and why (for the verdict's notes)."""

    speed_mibs: int
    why: str


@dataclasses.dataclass
class SwitchoverPlan:
    """The speed of one held migration until its release.

    Two measures say how close the end of the pass is, and the nearer one counts:

    * the non-zero data still ahead (the guest's resident memory, less the share of it
      that may be zero pages, minus the non-zero bytes sent so far), at the fastest pace
      non-zero data was sent: this is what the hold proper needs to have left, since zero
      pages cost QEMU next to nothing on the wire and cannot be held back by any speed;
    * the guest RAM still to scan (the pass's remainder minus the video RAM scanned after
      it), at the fastest pace it was scanned.

    A guest with little non-zero memory (a freshly booted one) is paced slowly from the
    start and held early: the hold from the start, as the bulk mode does, is where this
    falls back to when the guest would otherwise converge before the client links.
    """

    mode: HoldMode
    caller_speed_mibs: int
    #: seconds from the start until the client is expected at its release point
    link_s: float
    #: hold when the end of the pass would come within this many seconds
    guard_s: float = 0.4
    min_sample_s: float = 0.05
    max_sample_s: float = 0.5
    started_at: float = 0.0
    memory: GuestMemory = dataclasses.field(default_factory=lambda: GuestMemory(None))
    #: the speed this plan set last (None: the caller's is in force)
    speed_mibs: int | None = None
    #: when the hold proper (1 MiB/s) went on
    held_at: float | None = None
    #: progress samples taken (each one libvirt call), and the last one's time
    samples: int = 0
    last_at: float | None = None
    #: the largest delay a sample came with: a busy host needs a wider guard
    lag: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    _data: _Pace = dataclasses.field(default_factory=_Pace)
    _scan: _Pace = dataclasses.field(default_factory=_Pace)

    # ---------------------------------------------------------------- start

    def start(self, at: float, memory: GuestMemory, total_bytes: int) -> SpeedChange | None:
        """The speed to set at ``setup``; None: the caller's speed stays."""
        self.started_at = at
        self.memory = memory
        if self.mode == "bulk":
            return self._hold(at, "held from the start (bulk mode)")
        if memory.data_bytes is not None and memory.data_bytes < NEAR_EMPTY_BYTES:
            return self._hold(
                at,
                f"held from the start: only {memory.data_bytes / MIB:.0f} MiB of the guest's "
                "memory is resident (a near-empty guest is across in a moment)",
            )
        to_move = memory.data_bytes if memory.data_bytes is not None else total_bytes
        budget = self.link_s + self.guard()
        pace = max(HOLD_SPEED_MIBS + 1, math.ceil(to_move / budget / MIB))
        if self.caller_speed_mibs <= pace:
            return None
        self.speed_mibs = pace
        what = "non-zero " if memory.data_bytes is not None else ""
        why = (
            f"paced at {pace} MiB/s: at the caller's {_speed(self.caller_speed_mibs)} the "
            f"{to_move / MIB:.0f} MiB of {what}memory would be across before the client is "
            f"expected to link ({self.link_s:.1f} s)"
        )
        self.notes.append(why)
        return SpeedChange(pace, why)

    def first_sample_at(self) -> float:
        return self.started_at + self.min_sample_s

    # ---------------------------------------------------------------- samples

    @property
    def holding(self) -> bool:
        return self.held_at is not None

    def eta(self, progress: Progress) -> float | None:
        """Seconds until the pass's holdable part could be over (the nearer measure)."""
        etas: list[float] = []
        if self.memory.data_bytes is not None:
            data_left = self.memory.data_bytes * (1 - RESIDENT_ZERO_SHARE) - progress.sent_data
            data = self._data.eta(int(data_left))
            if data is not None:
                etas.append(data)
        scan = self._scan.eta(progress.remaining - self.memory.tail_bytes)
        if scan is not None:
            etas.append(scan)
        return min(etas) if etas else None

    def observe(self, progress: Progress) -> tuple[SpeedChange | None, float | None]:
        """A new sample: ``(change, next_sample_at)``; no next sample once the hold is on."""
        self.samples += 1
        self.last_at = progress.at
        self.lag = max(self.lag, progress.lag)
        if progress.remaining > 0 or progress.sent_data > 0:
            self._data.add(progress.at, progress.sent_data, shrinking=False)
            self._scan.add(progress.at, progress.remaining)
        if self.holding:
            return None, None
        if progress.iteration > 1:
            why = "the first pass is over: switchover held"
            return self._hold(progress.at, why), None
        eta = self.eta(progress)
        if eta is None:  # one sample says nothing of the pace: the next one soon
            return None, progress.at + self.min_sample_s
        guard = self.guard()
        if eta <= guard + self.min_sample_s:
            why = (
                f"the pass would end in {eta * 1000:.0f} ms "
                f"({progress.remaining / MIB:.1f} MiB left to scan): switchover held"
            )
            return self._hold(progress.at, why), None
        wait = min(self.max_sample_s, max(self.min_sample_s, (eta - guard) / 2))
        return None, progress.at + wait

    def guard(self) -> float:
        """The guard, widened by twice the worst delay a sample came with: on a busy host
        the next look, and the hold after it, come that much later."""
        return self.guard_s + 2 * self.lag

    def hold_now(self, why: str, at: float | None = None) -> SpeedChange:
        """The hold proper at once (the holder knows something the samples do not)."""
        at = at if at is not None else (self.last_at or self.started_at)
        return self._hold(at, why)

    def caller_speed(self, speed_mibs: int) -> SpeedChange | None:
        """The caller set a new speed: kept, unless it would outrun the pace or the hold."""
        self.caller_speed_mibs = speed_mibs
        if self.holding:
            return SpeedChange(HOLD_SPEED_MIBS, "the hold's speed put back")
        if self.speed_mibs is not None and speed_mibs > self.speed_mibs:
            return SpeedChange(self.speed_mibs, "the pace put back")
        self.speed_mibs = None  # the caller's own speed is slower than the pace: it rules
        return None

    def ours(self, speed_mibs: int) -> bool:
        """Is a speed read back the one this plan set? (At or below the hold's is ours too:
        libvirt shows a QMP throttle as 0, and no caller goes below libvirt's floor.)"""
        return speed_mibs <= HOLD_SPEED_MIBS or speed_mibs == self.speed_mibs

    def held_ms(self, released_at: float) -> float:
        """How long the hold proper was on (0: the client linked during the bulk)."""
        if self.held_at is None:
            return 0.0
        return round(max(0.0, released_at - self.held_at) * 1000.0, 1)

    # ---------------------------------------------------------------- internals

    def _hold(self, at: float, why: str) -> SpeedChange:
        self.held_at = at
        self.speed_mibs = HOLD_SPEED_MIBS
        self.notes.append(why)
        return SpeedChange(HOLD_SPEED_MIBS, why)


def _speed(speed_mibs: int) -> str:
    return "unlimited speed" if speed_mibs >= 1 << 40 else f"{speed_mibs} MiB/s"


__all__ = [
    "HOLD_DOWNTIME_MS",
    "HOLD_SPEED_MIBS",
    "GuestMemory",
    "HoldMode",
    "Progress",
    "SpeedChange",
    "SwitchoverPlan",
    "expected_link_s",
    "progress_from_job_stats",
]
