"""The delay bridge's queue logic, sans-IO: delay, loss and jitter per direction.

No sockets and no clock here: the caller passes the time in, so the whole behaviour (FIFO
order under jitter, bounds, reproducible randomness from a seed) is tested without
namespaces; :mod:`spice_libvirt_lab.delaybridge` is the I/O loop around it and re-exports
these names.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from pydantic import BaseModel, Field

from spice_libvirt.errors import ConfigError

#: virtio-net header (10 bytes) + the largest GSO frame a veth produces (64 KiB) + slack.
RECV_BUF = 256 * 1024

#: RTTs above this are certainly a typo (and would pin lots of memory in the queues).
MAX_RTT_MS = 10_000.0
#: One-way jitter (uniform half-width or normal sigma) above this is certainly a typo too.
MAX_JITTER_MS = 1_000.0

JitterDist = Literal["uniform", "normal"]
#: A per-direction setting: one value for both directions, or [if1->if2, if2->if1].
PerDirection = float | Sequence[float]


class BridgeStats(BaseModel):
    """Counters the bridge reports on its control socket and at exit."""

    rtt_ms: float
    forwarded: list[int] = Field(description="frames forwarded, per direction [if1->if2, if2->if1]")
    dropped_full: list[int] = Field(description="frames dropped because the queue was full")
    send_errors: list[int] = Field(description="frames the kernel refused to send")
    queued: list[int] = Field(description="frames waiting now, per direction")
    queued_bytes: list[int]
    max_frames: int
    max_bytes: int
    loss_pct: list[float] = Field(default=[0.0, 0.0], description="random loss per direction")
    jitter_ms: list[float] = Field(default=[0.0, 0.0], description="one-way jitter per direction")
    jitter_dist: JitterDist = "uniform"
    seed: int | None = None
    dropped_loss: list[int] = Field(default=[0, 0], description="frames lost on purpose")


@dataclass
class _Direction:
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    queued_bytes: int = 0
    last_due: float = 0.0
    forwarded: int = 0
    dropped_full: int = 0
    send_errors: int = 0
    loss_pct: float = 0.0
    jitter_ms: float = 0.0
    dropped_loss: int = 0


def check_pair(value: PerDirection, what: str, top: float) -> tuple[float, float]:
    """One value or a pair -> a checked pair (direction 0, direction 1)."""
    if isinstance(value, int | float):
        pair = (float(value), float(value))
    else:
        values = [float(v) for v in value]
        if len(values) != 2:
            raise ConfigError(f"{what} takes one value or two (one per direction), not {value}")
        pair = (values[0], values[1])
    for v in pair:
        if not 0.0 <= v <= top:  # also refuses NaN
            raise ConfigError(f"{what} must be between 0 and {top:g}, not {v}")
    return pair


class DelayLine:
    """Two bounded FIFO delay queues (sans-IO): push frames in, pop them when they are due.

    Direction 0 carries frames received on the first interface (to be sent on the second),
    direction 1 the reverse. Each frame is due ``one_way_s`` after it arrived, but never
    before the frame ahead of it, so the order on the wire is kept.
    """

    def __init__(
        self,
        rtt_ms: float,
        *,
        max_frames: int = 50_000,
        max_bytes: int = 64 << 20,
        loss_pct: PerDirection = 0.0,
        jitter_ms: PerDirection = 0.0,
        jitter_dist: JitterDist = "uniform",
        seed: int | None = None,
    ):
        if max_frames < 1 or max_bytes < RECV_BUF:
            raise ConfigError(f"queue bounds too small: {max_frames} frames, {max_bytes} bytes")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._dirs = (_Direction(), _Direction())
        self.rtt_ms = 0.0
        self.jitter_dist: JitterDist = "uniform"
        self.seed: int | None = None
        self._rng = random.Random()
        self.set_rtt(rtt_ms)
        self.set_impairment(loss_pct=loss_pct, jitter_ms=jitter_ms, jitter_dist=jitter_dist)
        self.reseed(seed)

    def set_impairment(
        self,
        *,
        loss_pct: PerDirection | None = None,
        jitter_ms: PerDirection | None = None,
        jitter_dist: str | None = None,
        direction: int | None = None,
    ) -> None:
        """Change loss and jitter (``None``: keep), for both directions or one.

        Checked as a whole before anything changes, so a refused request changes nothing.
        """
        if direction not in (None, 0, 1):
            raise ConfigError(f"direction must be 0 or 1, not {direction!r}")
        if jitter_dist not in (None, "uniform", "normal"):
            raise ConfigError(f"jitter distribution must be uniform or normal, not {jitter_dist!r}")
        loss = None if loss_pct is None else check_pair(loss_pct, "loss_pct", 100.0)
        jitter = None if jitter_ms is None else check_pair(jitter_ms, "jitter_ms", MAX_JITTER_MS)
        for i, d in enumerate(self._dirs):
            if direction is not None and i != direction:
                continue
            if loss is not None:
                d.loss_pct = loss[i]
            if jitter is not None:
                d.jitter_ms = jitter[i]
        if jitter_dist is not None:
            self.jitter_dist = cast(JitterDist, jitter_dist)

    def reseed(self, seed: int | None) -> None:
        """Restart the loss/jitter RNG: the same seed and the same frames give the same
        losses and delays (``None``: seeded from the OS, not reproducible)."""
        self.seed = seed
        self._rng.seed(seed)

    @property
    def impaired(self) -> bool:
        """Any loss or jitter configured (the fast path must then go through the line)."""
        return any(d.loss_pct > 0.0 or d.jitter_ms > 0.0 for d in self._dirs)

    def lose(self, direction: int) -> bool:
        """Draw whether the next frame of ``direction`` is lost (and count it if so)."""
        d = self._dirs[direction]
        if d.loss_pct > 0.0 and self._rng.random() * 100.0 < d.loss_pct:
            d.dropped_loss += 1
            return True
        return False

    def _delay_s(self, d: _Direction) -> float:
        if d.jitter_ms <= 0.0:
            return self.one_way_s
        if self.jitter_dist == "normal":
            sample = self._rng.gauss(0.0, d.jitter_ms)
        else:
            sample = self._rng.uniform(-d.jitter_ms, d.jitter_ms)
        return max(0.0, self.one_way_s + sample / 1000.0)

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the round-trip time; frames already queued keep their release time."""
        if not 0.0 <= rtt_ms <= MAX_RTT_MS:
            raise ConfigError(f"rtt must be between 0 and {MAX_RTT_MS:.0f} ms, not {rtt_ms}")
        self.rtt_ms = float(rtt_ms)

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0

    def push(self, direction: int, frame: bytes, now: float) -> bool:
        """Queue a frame that arrived at ``now``; ``False`` if it was dropped (lost on
        purpose, or the queue is full)."""
        if self.lose(direction):
            return False
        d = self._dirs[direction]
        if len(d.queue) >= self.max_frames or d.queued_bytes + len(frame) > self.max_bytes:
            d.dropped_full += 1
            return False
        due = max(now + self._delay_s(d), d.last_due)
        d.last_due = due
        d.queue.append((due, frame))
        d.queued_bytes += len(frame)
        return True

    def pop_due(self, direction: int, now: float) -> list[bytes]:
        """Remove and return the frames of one direction whose time has come, oldest first."""
        d = self._dirs[direction]
        out: list[bytes] = []
        while d.queue and d.queue[0][0] <= now:
            _, frame = d.queue.popleft()
            d.queued_bytes -= len(frame)
            out.append(frame)
        return out

    def next_due(self) -> float | None:
        """The earliest release time over both directions, or ``None`` when both are empty."""
        heads = [d.queue[0][0] for d in self._dirs if d.queue]
        return min(heads) if heads else None

    def count_sent(self, direction: int, ok: bool) -> None:
        d = self._dirs[direction]
        if ok:
            d.forwarded += 1
        else:
            d.send_errors += 1

    def stats(self) -> BridgeStats:
        return BridgeStats(
            rtt_ms=self.rtt_ms,
            forwarded=[d.forwarded for d in self._dirs],
            dropped_full=[d.dropped_full for d in self._dirs],
            send_errors=[d.send_errors for d in self._dirs],
            queued=[len(d.queue) for d in self._dirs],
            queued_bytes=[d.queued_bytes for d in self._dirs],
            max_frames=self.max_frames,
            max_bytes=self.max_bytes,
            loss_pct=[d.loss_pct for d in self._dirs],
            jitter_ms=[d.jitter_ms for d in self._dirs],
            jitter_dist=self.jitter_dist,
            seed=self.seed,
            dropped_loss=[d.dropped_loss for d in self._dirs],
        )
