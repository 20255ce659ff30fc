"""A typed, bounded wrapper over :class:`qemu.qmp.QMPClient`.

Why a wrapper at all: the controller must never hang and must never leak a ``qemu.qmp``
exception into the CLI. Every call here has a timeout, connects are retried with
``tenacity`` (a freshly started QEMU creates its socket a few milliseconds after the
process appears), and every failure becomes one of the :class:`~spice_libvirt.errors.QMPError`
subclasses below, with the original exception kept in ``__cause__``.

Events are exposed the way ``qemu.qmp`` does it -- as async iterators over a listener --
but with a per-read timeout, because a migration controller that waits "until the next
event" without a bound is a controller that can wedge a host::

    async with QMPConnection.open("/run/vm.qmp") as qmp:
        async with qmp.events("SPICE_INITIALIZED") as stream:
            await qmp.execute("client_migrate_info", {...})
            event = await stream.get(timeout=5)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import tenacity
from pydantic import BaseModel, Field
from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp import QMPError as UpstreamQMPError
from qemu.qmp.error import ProtocolError
from qemu.qmp.message import Message
from qemu.qmp.models import Greeting
from qemu.qmp.protocol import ConnectError as UpstreamConnectError
from qemu.qmp.protocol import Runstate, StateError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from spice_libvirt import errors

log = logging.getLogger(__name__)

#: A unix socket path or a (host, port) pair, as qemu.qmp takes it.
QMPAddress = str | Path | tuple[str, int]


class QMPConnectError(errors.QMPError, errors.ConnectError):
    """The QMP socket could not be reached (or QEMU refused the handshake) in time.

    It is both a :class:`~spice_libvirt.errors.QMPError` and a
    :class:`~spice_libvirt.errors.ConnectError`: the exit-code mapping picks UNREACHABLE.
    """

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        errors.ConnectError.__init__(self, message, exc)


class QMPCommandError(errors.QMPError):
    """QEMU answered a command with an error response (``{"error": {...}}``)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPTimeoutError(errors.QMPError):
    """A command reply or an awaited event did not arrive within its timeout."""

    def __init__(self, what: str, timeout: float) -> None:
        super().__init__(f"{what}: no answer within {timeout:g} s")
        self.what = what
        self.timeout = timeout


class QMPDisconnectedError(errors.QMPError):
    """The QMP connection went away (QEMU exited or closed the socket)."""


class QMPEvent(BaseModel):
    """One QMP event, typed at the edge so callers do not index raw dicts blindly."""

    name: str
    data: dict[str, Any] = Field(default_factory=dict)
    #: QEMU's own timestamp of the event (seconds since the epoch, float)
    timestamp: float
    #: ``time.monotonic()`` when we read it: comparable with the controller's own clocks
    received: float

    @classmethod
    def from_message(cls, msg: Message) -> QMPEvent:
        ts: dict[str, Any] = msg.get("timestamp") or {}  # type: ignore[assignment]
        stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        data: dict[str, Any] = msg.get("data") or {}  # type: ignore[assignment]
        return cls(
            name=str(msg["event"]),
            data=dict(data),
            timestamp=stamp,
            received=time.monotonic(),
        )


EventPredicate = Callable[[QMPEvent], bool]


class EventStream:
    """An async iterator over selected events of one :class:`QMPConnection`.

    Created by :meth:`QMPConnection.events`; it records every event it accepted in
    :attr:`history` (like ``qemu.qmp``'s listener) so a caller can look back at what
    happened before it started reading.
    """

    def __init__(self, listener: EventListener, default_timeout: float | None) -> None:
        self._listener = listener
        self._default_timeout = default_timeout
        self.history: list[QMPEvent] = []

    async def get(self, timeout: float | None = None) -> QMPEvent:
        """The next event; :class:`QMPTimeoutError` if none arrives within ``timeout``."""
        bound = self._default_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(bound):
                msg = await self._listener.get()
        except TimeoutError as exc:
            raise QMPTimeoutError(f"event {sorted(self._listener.names)}", bound or 0) from exc
        event = QMPEvent.from_message(msg)
        self.history.append(event)
        return event

    def drain(self) -> list[QMPEvent]:
        """Every event already queued, without waiting."""
        out = [QMPEvent.from_message(m) for m in self._listener.clear()]
        self.history.extend(out)
        return out

    def __aiter__(self) -> AsyncIterator[QMPEvent]:
        return self

    async def __anext__(self) -> QMPEvent:
        return await self.get()


class NegotiatingClient(QMPClient):
    """:class:`qemu.qmp.QMPClient`, negotiating the way QEMU really answers.

    QEMU 7.2 leaves capabilities-negotiation mode *inside* ``qmp_capabilities``, which runs
    in a bottom half, and writes the reply only when its monitor dispatcher runs again; an
    event raised in between (a SPICE client connecting or leaving, a migration ending) goes
    out to the new session first. ``qemu.qmp`` 0.0.6 takes the first message after the
    command for the reply and fails the negotiation. Measured: 43 of 1000 negotiations saw
    an event first while a SPICE client came and went, at load 17 (docs/findings.md).

    Here every event that comes before the reply goes to the listeners, as it would once
    the session runs; anything else but a ``return`` still fails the negotiation.

    The socket serves one client at a time, and QEMU writes a reply or an event still in
    flight for the previous client to the next one, before its greeting (seen when a
    client hung up mid-negotiation). Up to :attr:`STALE_LIMIT` such messages are skipped.
    """

    STALE_LIMIT = 16

    async def _get_greeting(self) -> Greeting:
        try:
            for _ in range(self.STALE_LIMIT):
                msg = await self._recv()
                if "QMP" in msg:
                    return Greeting(msg)
                log.debug("%s: skipped before the greeting: %s", self.name, dict(msg))
        except (ProtocolError, KeyError, TypeError) as err:
            raise GreetingError("Did not understand Greeting", err) from err
        stale = ProtocolError(f"no greeting in the first {self.STALE_LIMIT} messages")
        raise GreetingError("Did not understand Greeting", stale)

    async def _negotiate(self) -> None:
        arguments: dict[str, list[str]] = {}
        if self._greeting and "oob" in self._greeting.QMP.capabilities:
            arguments["enable"] = ["oob"]
        msg = self.make_execute_msg("qmp_capabilities", arguments=arguments)
        try:
            await self._send(msg)
            while True:
                reply = await self._recv()
                if "event" not in reply:
                    break
                await self._event_dispatch(reply)
        except ProtocolError as err:
            raise NegotiationError("Negotiation failed", err) from err
        if "return" not in reply or "error" in reply:
            cause = ProtocolError(f"qmp_capabilities answered {dict(reply)!r}")
            raise NegotiationError("Negotiation failed", cause)


def _is_transient_connect(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamConnectError | OSError)


class QMPConnection:
    """One negotiated QMP session to one QEMU.

    Use :meth:`open` (an async context manager) or :meth:`connect` / :meth:`close`.
    """

    def __init__(self, name: str = "qmp", *, command_timeout: float = 10.0) -> None:
        self.name = name
        self.command_timeout = command_timeout
        self._client = NegotiatingClient(name)
        self.address: QMPAddress | None = None

    # -- connection -------------------------------------------------------------------

    async def connect(
        self, address: QMPAddress, *, timeout: float = 10.0, attempt_interval: float = 0.05
    ) -> None:
        """Connect and negotiate, retrying until ``timeout`` seconds have passed.

        :raise QMPConnectError: the socket never answered within ``timeout``.
        """
        addr: str | tuple[str, int] = str(address) if isinstance(address, Path) else address
        self.address = address
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_is_transient_connect),
            stop=tenacity.stop_after_delay(timeout),
            wait=tenacity.wait_exponential(multiplier=attempt_interval, max=0.5),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    async with asyncio.timeout(timeout):
                        await self._connect_once(addr)
        except (UpstreamConnectError, OSError, TimeoutError) as exc:
            raise QMPConnectError(
                f"QMP {address}: cannot connect within {timeout:g} s: {exc}", exc
            ) from exc
        log.debug("%s: connected to %s", self.name, address)

    async def _connect_once(self, addr: str | tuple[str, int]) -> None:
        """One attempt; a session that died as it was established is a transient failure.

        ``qemu.qmp`` asserts that the session runs when ``connect`` returns; a message QEMU
        still had for the socket's previous client (a reply without an id) ends the new
        session's reader at once and that assertion fails instead (seen once in 1000
        sessions, benchmarks/results/qmp-negotiation.jsonl).
        """
        try:
            await self._client.connect(addr)
        except (UpstreamConnectError, OSError):
            raise
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self._client.disconnect()
            raise UpstreamConnectError("the session ended as it was established", exc) from exc

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        address: QMPAddress,
        *,
        name: str = "qmp",
        timeout: float = 10.0,
        command_timeout: float = 10.0,
    ) -> AsyncIterator[QMPConnection]:
        """Connect, yield the connection, and always close it."""
        conn = cls(name, command_timeout=command_timeout)
        await conn.connect(address, timeout=timeout)
        try:
            yield conn
        finally:
            await conn.close()

    async def close(self) -> None:
        """Disconnect; never raises (a dead QEMU is a normal reason to close)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._client.disconnect()

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- commands ---------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one command and return its ``return`` value.

        :raise QMPCommandError: QEMU answered with an error.
        :raise QMPTimeoutError: no answer within ``timeout`` (default: ``command_timeout``).
        :raise QMPDisconnectedError: the connection is gone.
        """
        bound = self.command_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(bound):
                return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise QMPCommandError(command, exc.error_class, str(exc)) from exc
        except TimeoutError as exc:
            raise QMPTimeoutError(command, bound) from exc
        except (ExecInterruptedError, StateError, EOFError, OSError) as exc:
            raise QMPDisconnectedError(f"{command}: QMP connection lost: {exc}") from exc
        except UpstreamQMPError as exc:
            raise errors.QMPError(f"{command}: {exc}") from exc

    async def execute_retrying(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        attempts: int = 3,
        timeout: float | None = None,
    ) -> Any:
        """Like :meth:`execute`, retrying timeouts (a busy QEMU main loop) a few times.

        Only idempotent queries should use this; command errors are never retried.
        """
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(QMPTimeoutError),
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_fixed(0.1),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self.execute(command, arguments, timeout=timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- events -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def events(
        self,
        names: str | Iterable[str] | None = None,
        *,
        where: EventPredicate | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[EventStream]:
        """Listen for events while the block runs.

        :param names: event names to keep (all when ``None``).
        :param where: extra predicate over the typed event.
        :param timeout: default per-event timeout of the stream's reads.
        """

        def accept(msg: Message) -> bool:
            return where is None or where(QMPEvent.from_message(msg))

        listener = EventListener(
            [names] if isinstance(names, str) else names,
            event_filter=accept if where is not None else None,
        )
        with self._client.listen(listener):
            yield EventStream(listener, timeout)

    async def wait_event(
        self, stream: EventStream, predicate: EventPredicate, timeout: float
    ) -> QMPEvent:
        """Read ``stream`` until ``predicate`` holds, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeoutError("awaited event", timeout)
            event = await stream.get(timeout=left)
            if predicate(event):
                return event
