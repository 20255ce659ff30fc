"""What the embedded client saw of one migration, as data.

These models are the contract between the client (which fills them in, message by message)
and the controller (which puts them into the verdict). They live apart from both so that
neither has to import the other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

#: The path the client actually took. ``none`` means no migration message arrived; ``lost``
#: that the VM moved and the client could not follow: its session is gone.
ClientPath = Literal[
    "seamless", "semi-seamless", "switch-host", "cancelled", "failed", "lost", "none"
]


class PathStep(BaseModel):
    """One protocol step of a migration, in the order the client saw or did it."""

    t_ms: float = Field(description="milliseconds since the first migration message")
    channel: str = Field(description="channel name and id, e.g. 'main:0', 'display:0'")
    side: Literal["src", "dst"]
    direction: Literal["rx", "tx", "event"]
    message: str = Field(description="message name, e.g. MIGRATE_BEGIN_SEAMLESS")
    detail: str = ""


class StreamStats(BaseModel):
    """Continuity of the guest's record stream on the port channel."""

    records: int = 0
    gaps: int = 0
    duplicates: int = 0
    first: int | None = None
    last: int | None = None
    max_stall_ms: float = 0.0
    #: records that did not parse (misaligned or corrupted bytes)
    malformed: int = 0


class SessionChange(BaseModel):
    """How a client's SPICE session came through a migration: the path, and the session id
    and channels before and after. Shared by the client's own record and the verdict."""

    path: ClientPath
    #: None: not known (a client followed by its address, without the monitor passthrough)
    connection_id_before: int | None
    connection_id_after: int | None = None
    connection_id_kept: bool = False
    channels_before: list[str] = Field(default_factory=list)
    channels_after: list[str] = Field(default_factory=list)


class ClientMigrationRecord(SessionChange):
    """The embedded client's own account of one migration."""

    steps: list[PathStep] = Field(default_factory=list)
    #: per channel: milliseconds between the last message read from the source and the first
    #: read from (or sent to) the destination; the time the channel was dark for the user
    blackout_ms: dict[str, float] = Field(default_factory=dict)
    #: monotonic time (time.monotonic(), seconds) at which the client told the source it had
    #: linked every channel to the destination (MIGRATE_CONNECTED[_SEAMLESS]); None if never
    connected_reply_at: float | None = None
    #: monotonic time of the first migration message (BEGIN*, SWITCH_HOST)
    started_at: float | None = None
    finished_at: float | None = None
    destination: str | None = Field(default=None, description="host:port the client moved to")
    error: str | None = None

    def path_summary(self) -> str:
        """The protocol path in one line, each message once with its count, in order of first
        appearance: ``src:MIGRATE x5 -> dst:MIGRATE_DATA x4``.

        Meant for people reading a terminal (channels interleave, so exact order is in the
        timed :attr:`steps`).
        """
        counts: dict[str, int] = {}
        for step in self.steps:
            if step.direction == "event" and not step.message.startswith(("LINKED", "DONE")):
                continue
            label = f"{step.side}:{step.message}"
            counts[label] = counts.get(label, 0) + 1
        return " -> ".join(f"{label} x{n}" if n > 1 else label for label, n in counts.items())
