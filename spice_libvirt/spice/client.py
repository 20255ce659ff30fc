"""The embedded SPICE client: one session, every channel, every migration path.

It links MAIN, reads INIT, attaches and links every listed channel with the session id, and
keeps them alive as a passive client (acks, pongs, display init, port open). When the
server migrates the session it follows whatever path the server chooses and writes down,
message by message, what happened (:class:`~spice_libvirt.spice.record.ClientMigrationRecord`).

The protocol lives in :mod:`spice_libvirt.spice.session` (read it first: the paths, their
order and the rules the real server taught us). This module is its driver: it feeds the
machine what the channels said and executes the actions it returns, I/O only. Linking and
reading are in :mod:`spice_libvirt.spice.channels`.

Unlike spice-gtk, the source MAIN channel keeps being read while the destination links are
made, so a SWITCH_HOST or CANCEL that races the pre-link is seen and recorded at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import ParamSpec

from spice_libvirt.errors import (
    ConnectError,
    LocalProtocolError,
    RemoteProtocolError,
    SpiceLibvirtError,
)
from spice_libvirt.spice import actions as act
from spice_libvirt.spice.channels import Channel, ChannelSet
from spice_libvirt.spice.constants import channel_label
from spice_libvirt.spice.messages import (
    MainInit,
    MainMigrateBegin,
    MainMigrateBeginSeamless,
    MainMigrateCancel,
    MainMigrateDstSeamlessAck,
    MainMigrateDstSeamlessNack,
    MainMigrateEnd,
    MainMigrateSwitchHost,
    Message,
    Migrate,
    MigrateData,
    message_name,
)
from spice_libvirt.spice.options import (
    CLOSE_TIMEOUT,
    DISPLAY_INIT,
    GREETING_CHANNELS,
    ClientEvent,
    ClientOptions,
    PortStream,
)
from spice_libvirt.spice.record import ClientMigrationRecord, StreamStats
from spice_libvirt.spice.session import MAIN_KEY, SWITCH_DRAIN_TIMEOUT, ChannelKey
from spice_libvirt.spice.transport import ChannelLink

__all__ = [
    "CLOSE_TIMEOUT",
    "DISPLAY_INIT",
    "GREETING_CHANNELS",
    "MAIN_KEY",
    "SWITCH_DRAIN_TIMEOUT",
    "ChannelKey",
    "ClientEvent",
    "ClientOptions",
    "PortStream",
    "SpiceClient",
]

log = logging.getLogger(__name__)

_P = ParamSpec("_P")

#: migrations remembered (history, finished records not handed out yet)
KEPT_MIGRATIONS = 32
#: events a subscriber may leave unread before the oldest are dropped
EVENT_QUEUE = 4096


@dataclass
class _Migration:
    """The I/O resources of one migration; its protocol state is the machine's."""

    number: int
    record: ClientMigrationRecord
    #: monotonic time by which the source must have the client's answer (see
    #: ``ClientOptions.migrate_connect_timeout``)
    deadline: float = 0.0
    dst_links: dict[ChannelKey, ChannelLink] = field(default_factory=dict)
    connect_task: asyncio.Task[None] | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    connected_ok: bool = False
    #: source sockets of swapped channels, closed together once the last one swapped
    old_links: list[ChannelLink] = field(default_factory=list)
    done: bool = False

    def holds(self) -> bool:
        """Something of this migration is still open (a pre-link task, a socket)."""
        task = self.connect_task
        return bool(self.dst_links or self.old_links or (task is not None and not task.done()))


class SpiceClient(ChannelSet):
    """An embedded SPICE client session. See the module docstring for what it follows."""

    def __init__(self, options: ClientOptions) -> None:
        if options.port is None and options.tls_port is None:
            raise LocalProtocolError("a SPICE client needs a port or a tls-port")
        super().__init__(options)
        #: the latest migrations (a server that floods BEGINs cannot grow this)
        self._history: list[_Migration] = []
        self._by_number: dict[int, _Migration] = {}
        self._migration_added = asyncio.Event()
        self._finished: asyncio.Queue[ClientMigrationRecord] = asyncio.Queue()

    # ------------------------------------------------------------------ public API

    @property
    def migration_count(self) -> int:
        """How many migrations the server has started so far (read before client_migrate_info)."""
        return self._session.migrations_started

    @property
    def last_link_error(self) -> str | None:
        """The error the latest migration recorded, finished or not (e.g. a destination
        whose certificate the client refused): after a CONNECT_ERROR spice-server sends no
        MIGRATE_CANCEL, so that migration's record may never be handed out."""
        return self._history[-1].record.error if self._history else None

    @property
    def rtt_estimate(self) -> float:
        """Round-trip time to the current server in seconds (fastest TCP connect seen).

        A TCP handshake costs one round trip (a TLS one more): the smallest connect time
        among the session's channels is a fair, cheap estimate.
        """
        times = [ch.link.connect_seconds for ch in self._channels.values() if not ch.link.tls]
        times = times or [ch.link.connect_seconds / 2 for ch in self._channels.values()]
        return min(times, default=0.0)

    async def connect(self, timeout: float | None = None) -> None:
        """Link MAIN and every channel the server lists; returns when all are up.

        :raise ConnectError: unreachable, or no SPICE link in time
        :raise AuthenticationError: wrong ticket ("permission denied")
        :raise TLSVerificationError: certificate did not verify
        :raise RemoteProtocolError: the peer is not SPICE or broke the protocol
        """
        deadline = timeout or self.options.session_timeout
        try:
            async with asyncio.timeout(deadline):
                await self._establish(self._initial_target())
        except TimeoutError as exc:
            late = ConnectError(f"SPICE session with {self.host} not established in time", exc)
            error = self._fail(late)
        except asyncio.CancelledError:
            await self.close()
            raise
        except Exception as exc:
            error = self._fail(exc)
        else:
            return
        await self.close()
        raise error

    async def close(self) -> None:
        """Disconnect every channel and every destination link; idempotent."""
        self._closing = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):  # a migration's links and tasks
                await self._run(self._session.close())
        except (TimeoutError, SpiceLibvirtError, OSError) as exc:
            log.debug("releasing the migration on close: %s", exc)
        tasks = [t for t in self._background if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            # bounded: a task that does not end on cancellation must not hang the caller
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in stuck:
                log.info("task %s did not end on cancellation", task.get_name())
        # non-main channels first, as spice-gtk does: the server then tears the session
        # down from MAIN's disconnect with every other channel already gone
        channels = sorted(self._channels.values(), key=lambda c: c.key == MAIN_KEY)
        if self.failure is not None:  # a broken session: no goodbye to wait for
            for ch in channels:
                ch.link.abort()
            channels = []
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                for ch in channels:
                    await ch.link.close(drain_timeout=0.5)
        except TimeoutError:
            log.info("channels did not close within %s s: aborted", CLOSE_TIMEOUT)
            for ch in channels:
                ch.link.abort()
        self._channels.clear()
        self._emit("closed")

    async def __aenter__(self) -> SpiceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def port_stream(self, name: str, timeout: float = 10.0) -> PortStream:
        """The byte stream of the port channel called ``name`` (waits for its PORT_INIT)."""
        if name not in self._ports:
            waiter = self._port_waiters.setdefault(name, asyncio.Event())
            async with asyncio.timeout(timeout):
                await self._unless_failed(waiter.wait())
        stream = self._ports[name]
        stream.wanted = True
        return stream

    def stream_stats(self) -> StreamStats:
        """Continuity of the guest's record stream so far."""
        return self._stream.snapshot() if self._stream else StreamStats()

    async def wait_migration_connected(
        self, timeout: float, after: int | None = None
    ) -> float | None:
        """Wait until the client has answered the source for a migration.

        ``after`` is a :attr:`migration_count` taken *before* the migration was requested;
        the call then waits for a later migration. Returns the monotonic time at which the
        client sent MIGRATE_CONNECTED(_SEAMLESS), or None if it sent CONNECT_ERROR.
        :raise TimeoutError: no answer in time
        :raise SpiceLibvirtError: the session's first error, once it failed
        """
        async with asyncio.timeout(timeout):
            while (mig := self._migration_after(after)) is None:
                await self._unless_failed(self._migration_added.wait())
            await self._unless_failed(mig.connected.wait())
            return mig.record.connected_reply_at if mig.connected_ok else None

    def _migration_after(self, after: int | None) -> _Migration | None:
        if after is None:
            return self._history[-1] if self._history else None
        return next((m for m in self._history if m.number > after), None)

    async def next_migration(self, timeout: float) -> ClientMigrationRecord:
        """The record of the next migration that finishes (in order).

        :raise TimeoutError: none finished in time
        :raise SpiceLibvirtError: the session's first error, once it failed and every
            record finished before it was handed out
        """
        if not self._finished.empty():
            return self._finished.get_nowait()
        async with asyncio.timeout(timeout):
            return await self._unless_failed(self._finished.get())

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Every :class:`ClientEvent` from now on, as an async iterator."""
        queue: asyncio.Queue[ClientEvent] = asyncio.Queue(EVENT_QUEUE)
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    # ------------------------------------------------------------------ feeding the machine

    def _server(
        self, ch: Channel, what: str, feed: Callable[[], list[act.Action]]
    ) -> list[act.Action]:
        """Feed a server message; one the machine rejects is the server's protocol error."""
        try:
            return feed()
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"{ch.link.where}: {what} out of order: {exc}") from exc

    def _ours(
        self, feed: Callable[_P, list[act.Action]], *args: _P.args, **kwargs: _P.kwargs
    ) -> list[act.Action]:
        """Feed the outcome of our own I/O (nothing once closing: the tasks are going)."""
        return [] if self._closing else feed(*args, **kwargs)

    def _track(self, number: int) -> _Migration:
        """The driver's side of migration ``number`` (created with its first action).

        A migration already forgotten (a server flooding BEGINs pushes old ones out of
        :data:`KEPT_MIGRATIONS`, never one still holding a task or a link) is an empty
        stand-in: releasing what it held has nothing left to do.
        """
        mig = self._by_number.get(number)
        if mig is not None:
            return mig
        state = self._session.migration
        if state is None or state.number != number:
            return _Migration(number, ClientMigrationRecord(path="none", connection_id_before=0))
        deadline = time.monotonic() + self.options.migrate_connect_timeout
        mig = self._by_number[number] = _Migration(number, state.record, deadline)
        self._history.append(mig)
        self._forget_old()
        # wake wait_migration_connected() callers; later ones wait on a fresh event
        added, self._migration_added = self._migration_added, asyncio.Event()
        added.set()
        return mig

    def _forget_old(self) -> None:
        """Keep :data:`KEPT_MIGRATIONS`: drop the oldest that are over and hold nothing."""
        excess = len(self._history) - KEPT_MIGRATIONS
        for old in [m for m in self._history if m.done and not m.holds()][: max(0, excess)]:
            self._history.remove(old)
            self._by_number.pop(old.number, None)

    async def _on_migration_message(self, ch: Channel, message: Message, now: float) -> bool:
        session = self._session
        name = message_name(message)
        actions: list[act.Action]
        if isinstance(message, Migrate):
            actions = self._server(ch, name, lambda: session.on_migrate(ch.key, message.flags, now))
        elif ch.key != MAIN_KEY:
            return False
        elif isinstance(message, MainMigrateBeginSeamless | MainMigrateBegin):
            if self._stream is not None:
                self._stream.reset_stall()
            version = (
                message.src_mig_version if isinstance(message, MainMigrateBeginSeamless) else None
            )
            actions = self._server(ch, name, lambda: session.on_begin(message.dst, version, now))
        elif isinstance(message, MainMigrateEnd):
            actions = self._server(ch, name, lambda: session.on_migrate_end(now))
        elif isinstance(message, MainMigrateSwitchHost):
            actions = self._server(ch, name, lambda: session.on_switch_host(message.dst, now))
        elif isinstance(message, MainMigrateCancel):
            actions = self._server(ch, name, lambda: session.on_cancel(now))
        elif isinstance(message, MainInit) and session.wants_dst_init:
            self.mouse_mode = message.current_mouse_mode
            self.agent_connected = bool(message.agent_connected)
            actions = self._server(ch, name, lambda: session.on_dst_init(message.session_id, now))
        else:
            return False
        await self._run(actions)
        return True

    # ------------------------------------------------------------------ executing actions

    async def _run(self, actions: Iterable[act.Action]) -> None:
        """Execute actions in order; pre-link jobs started on the way are awaited together.

        A job's error (each handles the destination's own failures itself, so one that
        escapes is the session's) is raised once every job ended; the task that runs this
        then ends with it, and :meth:`_fail` takes the first.
        """
        jobs: list[asyncio.Task[None]] = []
        try:
            for action in actions:
                jobs += await self._execute(action)
        finally:
            results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _execute(self, action: act.Action) -> list[asyncio.Task[None]]:
        match action:
            case act.StartPrelinks():
                mig = self._track(action.number)
                mig.connect_task = self._task(
                    self._migration_connect(mig, action), "spice-migrate-connect"
                )
            case act.LinkToDestination():
                return [
                    self._task(
                        self._link_dst(action.number, key, action.target, action.connection_id),
                        f"spice-prelink-{channel_label(*key)}",
                    )
                    for key in action.keys
                ]
            case act.AwaitSeamlessAnswer():
                return [
                    self._task(self._await_seamless_answer(action.number), "spice-seamless-answer")
                ]
            case act.SendToSource():
                await self._channels[action.key].link.send(action.message)
            case act.SendToDestination():
                await self._track(action.number).dst_links[action.key].send(action.message)
            case act.ReadMigrateData():
                await self._read_migrate_data(action.key)
            case act.SwapChannel():
                await self._swap(action)
            case act.LeaveSource():
                await self._leave_source(self._track(action.number))
            case act.StopPrelinks():
                await self._stop_prelinks(self._track(action.number))
            case act.LetPrelinksFinish():
                await self._let_prelinks_finish(self._track(action.number), action.timeout)
            case act.DropDestinationLinks():
                await self._close_dst_links(self._track(action.number), action.drain)
            case act.CloseSession():
                await self._close_session()
            case act.Relink():
                await self._relink(action.target, action.since)
            case act.Answered():
                mig = self._track(action.number)
                mig.connected_ok = mig.connected_ok or action.ok
                mig.connected.set()
            case act.Notice():
                self._emit(action.kind, "main:0", action.detail)
            case act.Finished():
                self._track(action.number).done = True
                if self._finished.qsize() >= KEPT_MIGRATIONS:
                    self._finished.get_nowait()  # nobody reads them: keep the latest
                self._finished.put_nowait(action.record)
            case act.InBackground():
                self._task(self._run(action.actions), action.name)
        return []

    # -- pre-links ------------------------------------------------------------------------

    async def _migration_connect(self, mig: _Migration, start: act.StartPrelinks) -> None:
        """Pre-link destination MAIN, then (through the machine) every other channel."""
        try:
            await self._link_dst(mig.number, MAIN_KEY, start.target, start.connection_id)
        finally:
            mig.connected.set()

    async def _link_dst(
        self, number: int, key: ChannelKey, target: act.LinkTarget, connection_id: int
    ) -> None:
        session = self._session
        mig = self._track(number)
        left = mig.deadline - time.monotonic()
        try:
            if left <= 0:
                raise ConnectError(self._too_late(key))
            timeout = min(self.options.link_timeout, left)
            try:
                link = await self._link(key, connection_id, target, timeout)
            except ConnectError as exc:
                if timeout < self.options.link_timeout and time.monotonic() >= mig.deadline:
                    raise ConnectError(f"{self._too_late(key)}: {exc}", exc) from exc
                raise
        except (SpiceLibvirtError, OSError) as exc:
            log.info("migration pre-link of %s failed: %s", key, exc)
            failed = str(exc)
            now = time.monotonic()
            await self._run(self._ours(session.on_prelink_failed, number, failed, now, key))
            return
        if mig.done or self._closing:
            await link.close()  # a late link of a migration that is over: nobody will use it
            return
        mig.dst_links[key] = link
        where = f"{target.host}:{link.port}"
        now = time.monotonic()
        await self._run(
            self._ours(session.on_dst_linked, number, key, link.channel_caps, where, now)
        )

    def _too_late(self, key: ChannelKey) -> str:
        return (
            f"{channel_label(*key)}: the destination did not link within "
            f"{self.options.migrate_connect_timeout:g} s of MIGRATE_BEGIN (spice-server waits "
            "10 s for the client's answer)"
        )

    async def _await_seamless_answer(self, number: int) -> None:
        """The destination's ACK/NACK, by the migration's deadline: a destination that never
        answers fails the pre-link (the source then gets CONNECT_ERROR) instead of holding it."""
        session = self._session
        mig = self._track(number)
        dst_main = mig.dst_links[MAIN_KEY]
        timeout = max(0.0, mig.deadline - time.monotonic())
        try:
            async with asyncio.timeout(timeout):
                actions = await self._read_seamless_answer(number, dst_main)
        except TimeoutError:
            failed = (
                "no MIGRATE_DST_SEAMLESS_ACK/NACK within "
                f"{self.options.migrate_connect_timeout:g} s of MIGRATE_BEGIN"
            )
            actions = self._ours(session.on_prelink_failed, number, failed, time.monotonic())
        except (SpiceLibvirtError, OSError) as exc:
            failed = str(exc)
            now = time.monotonic()
            actions = self._ours(session.on_prelink_failed, number, failed, now)
        await self._run(actions)

    async def _read_seamless_answer(self, number: int, dst_main: ChannelLink) -> list[act.Action]:
        """Destination MAIN until ACK/NACK; nothing else is expected before it."""
        session = self._session
        while True:
            message = (await dst_main.read()).message
            now = time.monotonic()
            if isinstance(message, MainMigrateDstSeamlessAck | MainMigrateDstSeamlessNack):
                ack = isinstance(message, MainMigrateDstSeamlessAck)
                return self._ours(session.on_seamless_answer, number, ack, now)
            self._ours(session.on_dst_message, number, message_name(message), now)

    async def _stop_prelinks(self, mig: _Migration) -> None:
        task = mig.connect_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _let_prelinks_finish(self, mig: _Migration, timeout: float) -> None:
        task = mig.connect_task
        if task is None or task.done():
            return
        _, pending = await asyncio.wait({task}, timeout=timeout)
        for late in pending:
            late.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await late

    async def _close_dst_links(self, mig: _Migration, drain_timeout: float = 0.0) -> None:
        """Drop the destination links no channel uses; non-MAIN first, as spice-gtk does."""
        in_use = {id(ch.link) for ch in self._channels.values()}
        unused = [(k, link) for k, link in mig.dst_links.items() if id(link) not in in_use]
        unused.sort(key=lambda item: item[0] == MAIN_KEY)
        for key, _link in unused:
            mig.dst_links.pop(key, None)  # a concurrent abort may have taken it already
        await asyncio.gather(
            *(link.close(drain_timeout=drain_timeout) for k, link in unused if k != MAIN_KEY)
        )
        for key, link in unused:
            if key == MAIN_KEY:
                await link.close(drain_timeout=drain_timeout)

    # -- hand-over ------------------------------------------------------------------------

    async def _read_migrate_data(self, key: ChannelKey) -> None:
        """MIGRATE_DATA is the source channel's very next message (the connection's state
        machine allows nothing else); it is read here, outside the keep-alive accounting."""
        ch = self._channels[key]
        event = await ch.link.read()
        assert isinstance(event.message, MigrateData)
        data = event.message.data
        now = time.monotonic()
        session = self._session
        await self._run(
            self._server(ch, "MIGRATE_DATA", lambda: session.on_migrate_data(key, data, now))
        )

    async def _swap(self, swap: act.SwapChannel) -> None:
        mig = self._track(swap.number)
        ch = self._channels[swap.key]
        dst = mig.dst_links[swap.key]
        if swap.restart_reader and ch.task is not None and ch.task is not asyncio.current_task():
            ch.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ch.task
        mig.old_links.append(ch.link)
        ch.link = dst
        ch.received = 0
        self._keepalives.pop(ch.key, None)
        if swap.restart_reader:
            self._start_reader(ch)
        if swap.channel_up:
            await self._channel_up(ch)
        now = time.monotonic()
        await self._run(self._session.on_swapped(swap.key, now))

    async def _leave_source(self, mig: _Migration) -> None:
        """Close the sockets the channels used before the swap (see actions.LeaveSource)."""
        old, mig.old_links = mig.old_links, []
        for link in old:
            await link.close()

    # -- switch-host ----------------------------------------------------------------------

    async def _close_session(self) -> None:
        old = sorted(self._channels.values(), key=lambda c: c.key == MAIN_KEY)
        self._channels.clear()
        for ch in old:
            if ch.task is not None:
                ch.task.cancel()
        for ch in old:
            await ch.link.close()
        self._keepalives.clear()

    async def _relink(self, target: act.LinkTarget, since: float) -> None:
        """The switch-host's new session; if it cannot be had, the session is lost (the
        record says so first, then the failure: ``next_migration`` hands out both)."""
        deadline = self.options.session_timeout  # as connect(): a drip cannot hold us
        left = deadline - (time.monotonic() - since) if since else deadline
        try:
            async with asyncio.timeout(max(0.0, left)):
                await self._establish(target)
        except (SpiceLibvirtError, OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                exc = ConnectError(f"no new session at {target.host} within {deadline:g} s")
            failed, channels = str(exc), list(self._channels)
            now = time.monotonic()
            await self._run(self._ours(self._session.on_relink_failed, failed, channels, now))
            self._fail(ConnectError(f"session lost in the switch-host: {failed}", exc))
            return
        now = time.monotonic()
        await self._run(self._ours(self._session.on_relinked, now))
