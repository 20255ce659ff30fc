"""After a failed or interrupted QMP migration: both QEMUs asked where the guest runs.

QEMU keeps migrating when its QMP client goes away, so a lost source socket says nothing
about where the guest is: the controller reconnects (bounded) and asks; a QEMU whose
socket refuses connections is gone. Each end's ``query-status`` becomes an
:data:`~spice_libvirt.migration.placement.EndState`, and the two together a placement
(:func:`~spice_libvirt.migration.placement.decide_placement`), waited for (bounded) until
the guest runs on exactly one end -- a cancelled destination takes a moment to exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from spice_libvirt import errors
from spice_libvirt.migration.placement import EndState, PlacementVerdict, decide_placement
from spice_libvirt.qemu.qmp import QMPConnectError, QMPConnection
from spice_libvirt.qemu.request import parse_qmp_address

#: ``query-status`` -> what the end means for the guest's placement
_STATES: dict[str, EndState] = {
    "running": "running",
    "paused": "paused",
    "suspended": "paused",
    "finish-migrate": "paused",
    "prelaunch": "paused",
    "inmigrate": "incoming",
    "postmigrate": "stopped",
    "shutdown": "stopped",
    "guest-panicked": "stopped",
    "internal-error": "stopped",
    "io-error": "paused",
}

#: how long a lost QMP socket is retried
RECONNECT_TIMEOUT = 5.0


def _gone(exc: QMPConnectError) -> bool:
    """Nobody listens on the socket any more (the QEMU process is gone), as opposed to a
    QEMU that does not answer in time."""
    cause = exc.exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or getattr(cause, "exc", None)
    return isinstance(cause, ConnectionRefusedError | FileNotFoundError)


@dataclasses.dataclass
class QmpEnd:
    """One QEMU's QMP, reconnected (bounded) when the socket was lost."""

    role: str
    address: str
    conn: QMPConnection
    command_timeout: float
    note: Callable[[str], None]
    #: set once a reconnect replaced the original connection (its event streams are dead)
    reconnected: bool = False
    gone: bool = False

    async def connection(self) -> QMPConnection | None:
        """A live connection, reconnecting once if the old one was lost; None if none."""
        if self.conn.connected:
            return self.conn
        if self.gone:
            return None
        fresh = QMPConnection(f"{self.role}-again", command_timeout=self.command_timeout)
        try:
            await fresh.connect(
                parse_qmp_address(self.address), timeout=RECONNECT_TIMEOUT, attempt_interval=0.1
            )
        except QMPConnectError as exc:
            self.gone = _gone(exc)
            self.note(
                f"the {self.role} QMP is lost and "
                + ("nobody listens on it: that QEMU is gone" if self.gone else f"{exc}")
            )
            return None
        await self.conn.close()
        self.conn, self.reconnected = fresh, True
        self.note(f"the {self.role} QMP connection was lost: reconnected")
        return fresh

    async def state(self) -> EndState:
        conn = await self.connection()
        if conn is None:
            return "absent" if self.gone else "unknown"
        try:
            status = str((await conn.execute("query-status", timeout=3))["status"])
        except errors.QMPError:
            conn = await self.connection()  # it may have gone in between
            return "absent" if self.gone else "unknown"
        return _STATES.get(status, "unknown")


async def settle_placement(
    src: QmpEnd, dst: QmpEnd, timeout: float
) -> tuple[PlacementVerdict, EndState, EndState]:
    """Ask both QEMUs until the guest runs on exactly one (bounded); the placement then."""
    deadline = time.monotonic() + timeout
    while True:
        s, d = await asyncio.gather(src.state(), dst.state())
        verdict = decide_placement(s, d)
        settled = (s == "running" and d in ("absent", "stopped", "incoming")) or (
            d == "running" and s in ("stopped", "absent")
        )
        if settled or time.monotonic() >= deadline:
            return verdict, s, d
        # a cancelled destination exits on its own, with no event we could hear
        await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


__all__ = ["QmpEnd", "settle_placement"]
