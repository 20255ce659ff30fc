"""What the agent subscribes to besides QEMU's MIGRATION events
(:meth:`~spice_libvirt.libvirt.connection.Connection.migration_events`): the graphics events
of the local libvirtd (which connections to a SPICE port linked a channel), and the graphics
events of destination libvirtds, fanned out to the holds that wait for them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from spice_libvirt import errors
from spice_libvirt.libvirt.connection import Connection, EventStream, GraphicsEvent
from spice_libvirt.libvirt.real_clients import SourceChannels

log = logging.getLogger(__name__)

#: graphics events kept per destination for a hold that subscribes a little late
HISTORY_S = 30.0


async def pump_source_events(
    stream: EventStream[GraphicsEvent],
    channels: SourceChannels,
    also: Callable[[GraphicsEvent], None] | None = None,
) -> None:
    """Feed ``channels`` the local libvirtd's graphics events until cancelled, and ``also``
    (the holds: a client leaving the source is evidence for their verdicts)."""
    try:
        async for event in stream:
            channels.absorb(event)
            if also is not None:
                also(event)
    finally:
        stream.close()


def on_close(conn: Connection) -> asyncio.Event:
    """An event set when libvirt closes ``conn`` (libvirtd restarted, keepalive lost)."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def callback(_conn: Any, _reason: int, _opaque: Any) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(closed.set)

    with contextlib.suppress(Exception):
        conn.conn.registerCloseCallback(callback, None)
    return closed


class Destination:
    """One destination libvirtd: its connection and its graphics events, kept for a while
    so that a hold that subscribes after the client began linking still sees every link."""

    def __init__(self, uri: str, conn: Connection, stream: EventStream[GraphicsEvent]) -> None:
        self.uri = uri
        self.conn = conn
        self.closed = on_close(conn)
        self._stream = stream
        self._history: collections.deque[GraphicsEvent] = collections.deque()
        self._listeners: dict[str, list[asyncio.Queue[GraphicsEvent]]] = {}
        self._pump = asyncio.create_task(self._run(), name=f"graphics events of {uri}")

    @classmethod
    async def open(cls, uri: str, timeout: float) -> Destination:
        """Read-only: the agent only listens there, so libvirtd refuses anything else."""
        conn = await Connection.open(uri, timeout=timeout, call_timeout=timeout, read_only=True)
        try:
            stream = await conn.graphics_events()
        except errors.LibvirtError:
            await conn.close()
            raise
        return cls(uri, conn, stream)

    @property
    def alive(self) -> bool:
        return not self.closed.is_set() and not self._pump.done()

    async def _run(self) -> None:
        async for event in self._stream:
            self._history.append(event)
            while self._history and self._history[0].at < event.at - HISTORY_S:
                self._history.popleft()
            for queue in self._listeners.get(event.domain, []):
                queue.put_nowait(event)

    def listen(
        self, domain: str, since: float, queue: asyncio.Queue[GraphicsEvent] | None = None
    ) -> asyncio.Queue[GraphicsEvent]:
        """``domain``'s events from ``since`` (monotonic) on, the earlier ones replayed, into
        ``queue`` (a new one by default; several destinations may share one)."""
        queue = queue if queue is not None else asyncio.Queue()
        for event in self._history:
            if event.domain == domain and event.at >= since:
                queue.put_nowait(event)
        self._listeners.setdefault(domain, []).append(queue)
        return queue

    def unlisten(self, domain: str, queue: asyncio.Queue[GraphicsEvent]) -> None:
        queues = self._listeners.get(domain, [])
        if queue in queues:
            queues.remove(queue)

    async def close(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(BaseException):
            await self._pump
        await self.conn.close()
