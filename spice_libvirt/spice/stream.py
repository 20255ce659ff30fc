"""Continuity check of the test guest's record stream (pure, no I/O).

The guest writes fixed 32-byte records ``"%020llu %010llu\\n"`` (counter, guest ms) into a
virtio-serial port; the counter advances only after a complete write, so a transport that
loses or repeats data shows up as a gap or a duplicate here. This is what "no in-flight
data lost" means in a verdict.
"""

from __future__ import annotations

import time

from spice_libvirt.spice.record import StreamStats

RECORD_SIZE = 32


def parse_record(record: bytes) -> int | None:
    """The counter of one record, or None when the bytes are not a record."""
    if len(record) != RECORD_SIZE or record[20:21] != b" " or record[31:32] != b"\n":
        return None
    counter, stamp = record[:20], record[21:31]
    if not (counter.isdigit() and stamp.isdigit()):
        return None
    return int(counter)


class StreamChecker:
    """Feeds on raw port bytes in any chunking and counts records, gaps and duplicates."""

    def __init__(self, clock: float | None = None) -> None:
        self._pending = bytearray()
        self.stats = StreamStats()
        self._last_arrival: float | None = clock

    def feed(self, data: bytes, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last_arrival is not None and self.stats.records:
            stall = (now - self._last_arrival) * 1000.0
            self.stats.max_stall_ms = max(self.stats.max_stall_ms, round(stall, 3))
        self._last_arrival = now
        self._pending += data
        while len(self._pending) >= RECORD_SIZE:
            chunk = bytes(self._pending[:RECORD_SIZE])
            counter = parse_record(chunk)
            if counter is None:
                # resynchronise on the next newline: a broken record must not poison the rest
                self.stats.malformed += 1
                cut = self._pending.find(b"\n")
                del self._pending[: cut + 1 if cut >= 0 else len(self._pending)]
                continue
            del self._pending[:RECORD_SIZE]
            self._count(counter)

    def _count(self, counter: int) -> None:
        stats = self.stats
        if stats.last is not None:
            if counter <= stats.last:
                stats.duplicates += 1
                return
            if counter != stats.last + 1:
                stats.gaps += 1
        if stats.first is None:
            stats.first = counter
        stats.last = counter
        stats.records += 1

    def snapshot(self) -> StreamStats:
        return self.stats.model_copy()

    def reset_stall(self) -> None:
        """Forget the longest stall seen so far (measure per migration)."""
        self.stats.max_stall_ms = 0.0
