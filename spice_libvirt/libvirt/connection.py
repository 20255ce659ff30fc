"""libvirt connections with bounds, and libvirt's events as asyncio async iterators.

Why not ``libvirtaio`` directly: the migration itself is a blocking ``migrateToURI3`` that
must run in a worker thread, and libvirt's remote driver then updates its socket watches
*from that thread*; libvirtaio answers with ``loop.add_reader`` calls that asyncio does not
allow from a foreign thread, and it binds libvirt to one asyncio loop for the life of the
process (the CLI and the tests run many loops one after another). So libvirt's events are
dispatched by libvirt's own thread-safe default implementation, run by one daemon thread per
process (:func:`ensure_event_loop`), and each event is handed to the asyncio loop that
subscribed to it with ``call_soon_threadsafe``. Consumers see the same thing libvirtaio would
give them: callbacks turned into async iterators, in the caller's loop.

Every blocking libvirt call goes through :func:`call_blocking` (a daemon thread and a
timeout), so a libvirtd that stops answering cannot hang a migration or the process exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

from spice_libvirt.errors import LibvirtError
from spice_libvirt.libvirt.errors import (
    DomainNotFoundError,
    LibvirtConnectError,
    LibvirtOperationError,
    message_of,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E")

try:
    import libvirt

    # libvirt-python prints every error to stderr by default; we raise them instead
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
except ImportError:  # pragma: no cover - reported by require_libvirt()
    libvirt = None

_event_lock = threading.Lock()
#: the one thread per process that runs libvirt's default event loop
_event_threads: list[threading.Thread] = []

#: graphics event phases (virDomainEventGraphicsPhase)
GRAPHICS_PHASES = {0: "connect", 1: "initialize", 2: "disconnect"}


def require_libvirt() -> Any:
    """The ``libvirt`` module, or a :class:`LibvirtError` that says how to get it."""
    if libvirt is None:
        raise LibvirtError("libvirt-python is not installed: pip install 'spice-libvirt[libvirt]'")
    return libvirt


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread.

    Idempotent. Must run before a connection that wants events (or keepalive) is opened.
    """
    lv = require_libvirt()
    with _event_lock:
        if _event_threads and _event_threads[0].is_alive():
            return
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    lv.virEventRunDefaultImpl()
                except Exception:  # pragma: no cover - keep dispatching whatever happens
                    log.exception("libvirt event loop iteration failed")
                    time.sleep(0.1)

        thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        thread.start()
        _event_threads[:] = [thread]


async def call_blocking(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run a blocking libvirt call in a daemon thread, bounded by ``timeout``.

    libvirt errors come back as :class:`LibvirtOperationError` (the original in
    ``__cause__``); a timeout raises :class:`LibvirtOperationError` too (the thread is left
    to finish on its own; it is a daemon and cannot block the exit).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the loop below
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(deliver, False, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=run, name=f"libvirt: {what}", daemon=True).start()
    try:
        async with asyncio.timeout(timeout):
            return await future
    except TimeoutError as exc:
        raise LibvirtOperationError(f"{what}: no answer from libvirt in {timeout:.0f} s") from exc
    except LibvirtError:
        raise
    except Exception as exc:
        if libvirt is not None and isinstance(exc, libvirt.libvirtError):
            raise LibvirtOperationError(f"{what}: {message_of(exc)}", exc) from exc
        raise


@dataclasses.dataclass(frozen=True)
class GraphicsEvent:
    """One ``VIR_DOMAIN_EVENT_ID_GRAPHICS`` event (libvirt's relay of QEMU's SPICE_* events).

    libvirt drops QEMU's channel type and connection id; what identifies a channel is its
    TCP connection, i.e. the client's address and port (``remote``).
    """

    domain: str
    phase: str  # connect | initialize | disconnect
    local: str
    remote: str
    at: float  # time.monotonic() when libvirt's event thread dispatched it


@dataclasses.dataclass(frozen=True)
class MigrationEvent:
    """QEMU's ``MIGRATION`` event for one domain: its new status (``setup``, ``active``,
    ``pre-switchover``, ``device``, ``completed``, ``failed``, ``cancelled``)."""

    domain: str
    status: str
    at: float


def parse_migration_details(details: str | None) -> str | None:
    """The ``status`` of a MIGRATION event's JSON ``data``; None when it has none."""
    try:
        data = json.loads(details or "{}")
    except ValueError:
        return None
    status = data.get("status") if isinstance(data, dict) else None
    return status if isinstance(status, str) else None


@dataclasses.dataclass(frozen=True)
class JobCompletedEvent:
    """``VIR_DOMAIN_EVENT_ID_JOB_COMPLETED``: the finished job's statistics."""

    domain: str
    stats: dict[str, Any]
    at: float


#: events an :class:`EventStream` keeps in ``seen``
EVENTS_KEPT = 4096


class EventStream(Generic[E]):
    """Events of one libvirt registration, queued in the subscriber's loop.

    Iterate with ``async for``, or :meth:`get` with a timeout; :meth:`drain` takes whatever
    has arrived without waiting. :meth:`close` deregisters the callback.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[E] = asyncio.Queue()
        self._deregister: Callable[[], None] | None = None
        #: the latest events (a long-lived subscription, such as the agent's, must not
        #: keep every event a client -- or anyone reaching a SPICE port -- ever caused)
        self.seen: collections.deque[E] = collections.deque(maxlen=EVENTS_KEPT)
        self._arrived = asyncio.Event()

    def _push(self, event: E) -> None:
        def put() -> None:
            self.seen.append(event)
            self._queue.put_nowait(event)
            self._arrived.set()

        with contextlib.suppress(RuntimeError):  # the loop is gone: drop it
            self._loop.call_soon_threadsafe(put)

    async def get(self, timeout: float) -> E:
        """The next event; :class:`TimeoutError` if none arrives within ``timeout``."""
        async with asyncio.timeout(timeout):
            return await self._queue.get()

    def pending(self) -> bool:
        """An event is queued (:meth:`get` would not wait)."""
        return not self._queue.empty()

    async def wait_pending(self) -> None:
        """Until an event is queued, without taking it (to wait on several streams)."""
        while self._queue.empty():
            self._arrived.clear()
            await self._arrived.wait()

    def drain(self) -> list[E]:
        out: list[E] = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    def __aiter__(self) -> AsyncIterator[E]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[E]:
        while True:
            yield await self._queue.get()

    def close(self) -> None:
        if self._deregister is not None:
            with contextlib.suppress(Exception):
                self._deregister()
            self._deregister = None


def _address(addr: dict[str, Any] | None) -> str:
    if not addr:
        return "?"
    node, service = addr.get("node", "?"), addr.get("service", "?")
    return f"[{node}]:{service}" if ":" in str(node) else f"{node}:{service}"


def endpoint(text: str) -> tuple[str, int]:
    """``"10.0.0.1:40000"``, ``"[::1]:40000"``, ``"::ffff:10.0.0.1:40000"`` -> (address,
    port), an IPv4-mapped address as IPv4: the kernel's and libvirt's spellings compared."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, int(port) if port.isdigit() else -1
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port) if port.isdigit() else -1


class Connection:
    """One libvirt connection: open with a timeout, typed errors, events as iterators.

    Use :meth:`open` (async) and ``async with``; blocking calls go through :meth:`call`.
    """

    def __init__(self, uri: str, conn: Any, call_timeout: float) -> None:
        self.uri = uri
        self.conn = conn
        self.call_timeout = call_timeout
        self._streams: list[EventStream[Any]] = []

    @classmethod
    async def open(
        cls, uri: str, *, timeout: float = 15.0, call_timeout: float = 30.0, read_only: bool = False
    ) -> Connection:
        """Open ``uri`` (``read_only``: a connection libvirtd refuses every change on, which
        still gets events); :class:`LibvirtConnectError` if libvirtd is not there in time."""
        lv = require_libvirt()
        ensure_event_loop()
        opener = lv.openReadOnly if read_only else lv.open
        try:
            conn = await call_blocking(lambda: opener(uri), timeout, f"connect to {uri}")
        except LibvirtOperationError as exc:
            raise LibvirtConnectError(
                f"libvirt at {uri} is unreachable: {exc}", exc.exc or exc
            ) from exc
        if conn is None:  # pragma: no cover - old bindings returned None on failure
            raise LibvirtConnectError(f"libvirt at {uri} is unreachable")
        with contextlib.suppress(Exception):  # notice a dead peer instead of hanging on it
            conn.setKeepAlive(5, 3)
        return cls(uri, conn, call_timeout)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams.clear()
        with contextlib.suppress(Exception):
            await call_blocking(self.conn.close, 10.0, f"close {self.uri}")

    async def call(self, fn: Callable[[], T], what: str, timeout: float | None = None) -> T:
        return await call_blocking(fn, timeout or self.call_timeout, f"{self.uri}: {what}")

    async def lookup(self, name: str) -> Any:
        """The domain called ``name`` (a UUID string works too)."""
        lv = require_libvirt()

        def find() -> Any:
            try:
                return self.conn.lookupByName(name)
            except lv.libvirtError as exc:
                if exc.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                    raise
            try:
                return self.conn.lookupByUUIDString(name)
            except lv.libvirtError as exc:
                if exc.get_error_code() in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_INVALID_ARG):
                    return None
                raise

        dom = await self.call(find, f"look up domain {name}")
        if dom is None:
            raise DomainNotFoundError(f"no domain {name!r} on {self.uri}")
        return dom

    async def qemu_monitor(self, dom: Any, command: dict[str, Any]) -> Any:
        """A QMP command through libvirt's passthrough; the parsed reply.

        It *taints* the domain (``custom-monitor``): callers say so in their report.
        """
        import libvirt_qemu  # type: ignore[import-untyped]

        text = json.dumps(command)
        reply = await self.call(
            lambda: libvirt_qemu.qemuMonitorCommand(dom, text, 0), f"qemu-monitor {text}"
        )
        return json.loads(reply)

    def _register(self, dom: Any, event_id: int, callback: Any, stream: EventStream[Any]) -> None:
        handle = self.conn.domainEventRegisterAny(dom, event_id, callback, None)
        stream._deregister = lambda: self.conn.domainEventDeregisterAny(handle)
        self._streams.append(stream)

    async def graphics_events(self, dom: Any = None) -> EventStream[GraphicsEvent]:
        """SPICE/VNC client connects, initializations and disconnects as they happen.

        ``dom=None`` subscribes for every domain, including one that does not exist yet (an
        incoming migration), which is what the destination of a migration needs.
        """
        lv = require_libvirt()
        stream: EventStream[GraphicsEvent] = EventStream(asyncio.get_running_loop())

        def callback(
            _conn: Any,
            domain: Any,
            phase: int,
            local: dict[str, Any],
            remote: dict[str, Any],
            _scheme: str,
            _subject: Any,
            _opaque: Any,
        ) -> None:
            stream._push(
                GraphicsEvent(
                    domain=domain.name(),
                    phase=GRAPHICS_PHASES.get(phase, str(phase)),
                    local=_address(local),
                    remote=_address(remote),
                    at=time.monotonic(),
                )
            )

        await self.call(
            lambda: self._register(dom, lv.VIR_DOMAIN_EVENT_ID_GRAPHICS, callback, stream),
            "register graphics events",
        )
        return stream

    async def migration_events(self, dom: Any = None) -> EventStream[MigrationEvent]:
        """QEMU's own MIGRATION status events (of ``dom``, or of every domain).

        They come through libvirt-qemu's monitor-*event* API: within milliseconds of
        ``setup`` (libvirt relays no event of its own for a migration that starts) and,
        unlike the monitor *command* passthrough, without tainting the domain (the lab
        tests read the domain's log).
        """
        import libvirt_qemu

        stream: EventStream[MigrationEvent] = EventStream(asyncio.get_running_loop())

        def callback(
            _conn: Any, domain: Any, _event: str, _s: int, _us: int, details: str, _opaque: Any
        ) -> None:
            status = parse_migration_details(details)
            if status is not None:
                stream._push(MigrationEvent(domain.name(), status, time.monotonic()))

        def register() -> None:
            handle = libvirt_qemu.qemuMonitorEventRegister(
                self.conn, dom, "MIGRATION", callback, None, 0
            )
            stream._deregister = lambda: libvirt_qemu.qemuMonitorEventDeregister(self.conn, handle)
            self._streams.append(stream)

        await self.call(register, "register QEMU MIGRATION events")
        return stream

    async def job_completed_events(self, dom: Any) -> EventStream[JobCompletedEvent]:
        """The statistics of ``dom``'s jobs as each one completes (migration figures)."""
        lv = require_libvirt()
        stream: EventStream[JobCompletedEvent] = EventStream(asyncio.get_running_loop())

        def callback(_conn: Any, domain: Any, stats: dict[str, Any], _opaque: Any) -> None:
            stream._push(JobCompletedEvent(domain.name(), dict(stats), time.monotonic()))

        await self.call(
            lambda: self._register(dom, lv.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, callback, stream),
            "register job-completed events",
        )
        return stream


__all__ = [
    "Connection",
    "EventStream",
    "GraphicsEvent",
    "JobCompletedEvent",
    "MigrationEvent",
    "call_blocking",
    "ensure_event_loop",
    "parse_migration_details",
    "require_libvirt",
]
