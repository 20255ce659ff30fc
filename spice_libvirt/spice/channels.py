"""The I/O half of a client session: link channels, keep them alive, read and route messages.

:class:`ChannelSet` is the base of :class:`~spice_libvirt.spice.client.SpiceClient`. It makes
no migration decision: migration messages are handed to ``_on_migration_message``, which the
client implements by feeding :class:`~spice_libvirt.spice.session.ClientSession`.

It also owns the session's failure (:meth:`ChannelSet._fail`): whatever breaks first -- a
channel's reader, a migration job, a step of the set-up -- is *the* error, every public wait
raises it, every other task is cancelled, and nothing that breaks afterwards (a send on a
connection that already failed, a waiter nobody awaits any more) is reported in its place.
Every task the client starts goes through :meth:`ChannelSet._task`, so none ends with an
exception nobody retrieves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuidlib
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from spice_libvirt.errors import ConnectError, LinkError, SpiceLibvirtError
from spice_libvirt.spice.actions import LinkTarget
from spice_libvirt.spice.connection import KeepAlive
from spice_libvirt.spice.constants import ChannelType, CommonCap, LinkErr, PortEvent, channel_label
from spice_libvirt.spice.framing import ReceiveBudget
from spice_libvirt.spice.link import LinkMess
from spice_libvirt.spice.messages import (
    ClientPortEvent,
    Disconnecting,
    MainAgentConnected,
    MainAgentConnectedTokens,
    MainAgentDisconnected,
    MainAttachChannels,
    MainChannelsList,
    MainInit,
    MainMouseMode,
    MainName,
    MainUuid,
    Message,
    Notify,
    PortEventMessage,
    PortInit,
    VmcData,
)
from spice_libvirt.spice.options import (
    DISPLAY_INIT,
    GREETING_CHANNELS,
    ClientEvent,
    ClientOptions,
    PortStream,
)
from spice_libvirt.spice.session import MAIN_KEY, ChannelKey, ClientSession
from spice_libvirt.spice.stream import StreamChecker
from spice_libvirt.spice.transport import ChannelLink, TLSSettings, open_link

log = logging.getLogger(__name__)

T = TypeVar("T")

#: messages a channel's reader handles in a row before it lets the other channels run (a
#: read of buffered bytes does not yield to the event loop)
FAIR_SHARE = 64


def as_error(exc: BaseException) -> SpiceLibvirtError:
    """Any exception as one of ours: socket errors are connect errors, anything else a bug
    (its type named, so that the one line still says what happened)."""
    if isinstance(exc, SpiceLibvirtError):
        return exc
    if isinstance(exc, ConnectionError | OSError | TimeoutError):
        error: SpiceLibvirtError = ConnectError(str(exc) or type(exc).__name__, exc)
    else:
        error = SpiceLibvirtError(
            f"internal error in the SPICE client: {type(exc).__name__}: {exc}"
        )
    error.__cause__ = exc
    return error


@dataclass
class Channel:
    key: ChannelKey
    link: ChannelLink
    task: asyncio.Task[None] | None = None
    last_rx: float = 0.0
    received: int = 0
    port_name: str | None = None
    first_rx: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def label(self) -> str:
        return channel_label(*self.key)


class ChannelSet:
    """Every channel of one session, linked and read; see the module docstring."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self.port = options.port
        self.tls_port = options.tls_port
        self.name: str | None = None
        self.uuid: str | None = None
        self.mouse_mode: int | None = None
        self.agent_connected = False
        self.server_common_caps: frozenset[int] = frozenset()
        self.server_main_caps: frozenset[int] = frozenset()
        self.listed_channels: list[ChannelKey] = []
        self._session = ClientSession(
            tls_required=options.tls_configured,
            host_subject=options.host_subject,
            link_timeout=options.link_timeout,
        )
        self._session.host = options.host
        self._channels: dict[ChannelKey, Channel] = {}
        self._keepalives: dict[ChannelKey, KeepAlive] = {}
        self._ports: dict[str, PortStream] = {}
        self._port_waiters: dict[str, asyncio.Event] = {}
        self._subscribers: list[asyncio.Queue[ClientEvent]] = []
        self._stream = StreamChecker() if options.stream_port_name else None
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()
        #: the set-up of a session (connect, switch-host relink) under way, and its first
        #: error: MAIN's INIT and CHANNELS_LIST resolve to the message or to that error
        self._establishing = False
        self._setup_error: SpiceLibvirtError | None = None
        self._setup_failed = asyncio.Event()
        self._init_waiter: asyncio.Future[MainInit | SpiceLibvirtError] | None = None
        self._list_waiter: asyncio.Future[MainChannelsList | SpiceLibvirtError] | None = None
        #: what every link of the session may hold of unfinished messages, together
        self._budget = ReceiveBudget(options.receive_budget)
        #: the session's first error (see _fail); None while it works
        self.failure: SpiceLibvirtError | None = None
        self._failed = asyncio.Event()

    @property
    def session_id(self) -> int:
        """The SPICE connection id of the session (0 while none is linked)."""
        return self._session.session_id

    @property
    def host(self) -> str:
        """The host the session is linked to (it changes with a migration)."""
        return self._session.host

    @property
    def channels(self) -> list[str]:
        """Labels of the channels currently linked, e.g. ``["main:0", "display:0"]``."""
        return [channel_label(*key) for key in sorted(self._channels)]

    @property
    def tls_in_use(self) -> bool:
        main = self._channels.get(MAIN_KEY)
        return bool(main and main.link.tls)

    def _initial_target(self) -> LinkTarget:
        options = self.options
        tls_only = options.tls_configured and options.tls_port is not None
        return LinkTarget(
            options.host,
            None if tls_only else options.port,
            options.tls_port,
            options.host_subject,
        )

    # ------------------------------------------------------------------ linking

    def _link_mess(self, key: ChannelKey, connection_id: int) -> LinkMess:
        common = {CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER}
        caps = self.options.main_caps() if key[0] == ChannelType.MAIN else frozenset()
        return LinkMess(connection_id, key[0], key[1], frozenset(common), caps)

    async def _link(
        self,
        key: ChannelKey,
        connection_id: int,
        target: LinkTarget,
        timeout: float | None = None,
    ) -> ChannelLink:
        """Link one channel. Plain first only when the target allows it (``port`` set), then
        TLS when told NEED_SECURED; with ``port`` None, TLS only: never a downgrade."""
        label = channel_label(*key)
        mess = self._link_mess(key, connection_id)
        password = self.options.password()
        timeout = self.options.link_timeout if timeout is None else timeout
        budget = self._budget
        if target.port is not None:
            try:
                return await open_link(
                    target.host,
                    target.port,
                    mess,
                    password=password,
                    timeout=timeout,
                    budget=budget,
                )
            except LinkError as exc:
                if exc.code != LinkErr.NEED_SECURED:
                    raise
                if target.tls_port is None:
                    raise LinkError(
                        exc.code,
                        f"{label}: the server requires TLS (NEED_SECURED) and no "
                        "tls-port is known (add ?tls-port=N to the URI)",
                    ) from exc
                log.debug("%s: server wants TLS, retrying on %s", label, target.tls_port)
        elif target.tls_port is None:
            raise ConnectError(
                f"{label}: TLS is configured or in use and {target.host} names no tls-port; "
                "the plain port is not tried"
            )
        if target.tls_port is None:
            raise ConnectError(f"{label}: the server needs TLS but no tls-port is known")
        tls = TLSSettings(ca_file=self.options.ca_file, host_subject=target.subject)
        return await open_link(
            target.host,
            target.tls_port,
            mess,
            password=password,
            tls=tls,
            timeout=timeout,
            budget=budget,
        )

    async def _establish(self, target: LinkTarget) -> None:
        """A brand-new session (connection id 0): MAIN, INIT, attach, link the rest.

        Its first error is the one raised (see :meth:`_setup_step`): a channel that broke
        while the set-up awaited something else is the reason, not the follow-on (a send on
        MAIN after MAIN failed).
        """
        self._establishing = True
        self._setup_error = None
        self._setup_failed = asyncio.Event()
        try:
            await self._establish_steps(target)
        except Exception as exc:
            raise self._setup_error or as_error(exc) from exc
        finally:
            self._establishing = False
        if self._setup_error is not None:
            raise self._setup_error

    async def _establish_steps(self, target: LinkTarget) -> None:
        main_link = await self._link(MAIN_KEY, 0, target)
        self.port, self.tls_port = target.port, target.tls_port
        self.server_common_caps = main_link.common_caps
        self.server_main_caps = main_link.channel_caps
        loop = asyncio.get_running_loop()
        self._init_waiter = loop.create_future()
        self._list_waiter = loop.create_future()
        main = self._add_channel(MAIN_KEY, main_link)
        self._start_reader(main)
        init = await self._setup_step(self._init_waiter)
        session_id = init.session_id
        await main.link.send(MainAttachChannels())
        listed = await self._setup_step(self._list_waiter)
        self.listed_channels = [k for k in listed.channels if k != MAIN_KEY]
        wanted = [
            k
            for k in self.listed_channels
            if self.options.channel_types is None or k[0] in self.options.channel_types
        ]
        links = await self._setup_step(
            asyncio.gather(
                *(self._link(k, session_id, target) for k in wanted), return_exceptions=True
            )
        )
        errors = [r for r in links if isinstance(r, BaseException)]
        for key, result in zip(wanted, links, strict=True):
            if isinstance(result, ChannelLink):
                ch = self._add_channel(key, result)
                await self._channel_up(ch)
                self._start_reader(ch)
        if errors:
            raise as_error(errors[0])
        await self._setup_step(self._wait_channels_created())
        self._session.session_up(session_id, list(self._channels), target.host, tls=main_link.tls)
        self._emit("session-up", "main:0", f"session {session_id}, {len(self._channels)} channels")

    async def _setup_step(self, aw: Awaitable[T | SpiceLibvirtError]) -> T:
        """One wait of the set-up, ended by the set-up's first error if one comes first."""
        result = await _first_of(aw, self._setup_failed)
        if self._setup_error is not None:
            raise self._setup_error
        if isinstance(result, SpiceLibvirtError):
            raise result
        return result  # type: ignore[return-value]

    async def _wait_channels_created(self) -> None:
        """Wait for the first message on the channels whose server side always greets.

        spice-server creates display/cursor channel clients in its worker thread after the
        link result; a client that disconnects in that window crashed spice-server 0.15.1
        (segfault in the SPICE worker, QEMU gone) in our tests. A channel counts as up only
        once the server has spoken on it, so a probe that connects and leaves at once is
        safe for the VM.
        """
        greeting = [
            ch.first_rx.wait() for ch in self._channels.values() if ch.key[0] in GREETING_CHANNELS
        ]
        try:
            async with asyncio.timeout(self.options.link_timeout):
                await asyncio.gather(*greeting)
        except TimeoutError:
            silent = [ch.label for ch in self._channels.values() if not ch.first_rx.is_set()]
            log.info("channels without a first message after the link: %s", ", ".join(silent))

    def _add_channel(self, key: ChannelKey, link: ChannelLink) -> Channel:
        ch = Channel(key, link, last_rx=time.monotonic())
        self._channels[key] = ch
        self._emit("linked", ch.label, f"{link.host}:{link.port}{' tls' if link.tls else ''}")
        return ch

    async def _channel_up(self, ch: Channel) -> None:
        """What a fresh channel needs before the server talks (spice-gtk's channel_up)."""
        if ch.key[0] == ChannelType.DISPLAY:
            await ch.link.send(DISPLAY_INIT)

    def _start_reader(self, ch: Channel) -> None:
        ch.task = self._task(self._read_channel(ch), f"spice-{ch.label}")

    def _task(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Every task of the client: kept until it ends, cancelled with the session, and
        its exception -- if it ends with one nobody handled -- is the session's failure."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._fail(exc)

    # ------------------------------------------------------------------ the first error

    def _fail(self, exc: BaseException) -> SpiceLibvirtError:
        """The one place a session failure is decided: the first error wins.

        It becomes :attr:`failure`, every wait of the public API raises it, and every other
        task is cancelled (their errors, follow-ons of this one, are not reported). A later
        call returns the first error. While the client closes, nothing is recorded.
        """
        if self.failure is not None:
            if exc is not self.failure:
                log.debug("after the session's first error: %s", exc)
            return self.failure
        error = as_error(exc)
        if self._closing:
            return error
        self.failure = error
        self._failed.set()
        log.info("session failed: %s", error)
        self._emit("failed", "", str(error))
        current = asyncio.current_task()
        for task in list(self._background):
            if task is not current:
                task.cancel()
        return error

    async def _unless_failed(self, aw: Awaitable[T]) -> T:
        """``aw``'s result, or the session's first error as soon as there is one."""
        if self.failure is not None:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise self.failure
        result = await _first_of(aw, self._failed)
        if result is _FAILED:
            assert self.failure is not None
            raise self.failure
        return result  # type: ignore[return-value]

    # ------------------------------------------------------------------ reading

    async def _read_channel(self, ch: Channel) -> None:
        try:
            while True:
                link = ch.link
                event = await link.read()
                now = time.monotonic()
                ch.last_rx = now
                ch.received += 1
                ch.first_rx.set()
                message = event.message
                replies = self._keepalive(ch, message, now)
                if replies:
                    await link.send(*replies)
                await self._dispatch(ch, message, now)
                # the next read may take a while: hold no message (a body of up to
                # max_body) while it gathers the next one
                event = message = None  # type: ignore[assignment]
                if not ch.received % FAIR_SHARE:
                    await asyncio.sleep(0)  # a flood on one channel must not starve the rest
        except asyncio.CancelledError:
            raise
        except (ConnectionError, OSError) as exc:
            self._on_channel_error(ch, ConnectError(f"{ch.link.where}: {exc}", exc))
        except Exception as exc:  # ours, or a bug: either way this channel's end
            self._on_channel_error(ch, as_error(exc))

    def _keepalive(self, ch: Channel, message: Message, now: float) -> list[Message]:
        keepalive = self._keepalives.get(ch.key)
        if keepalive is None:
            keepalive = self._keepalives[ch.key] = KeepAlive()
        return keepalive.on_message(message, now)

    def _on_channel_error(self, ch: Channel, exc: SpiceLibvirtError) -> None:
        """A channel's reader ended with ``exc``: a set-up's failure while one is under way,
        the source letting us go during a migration, or else the session's failure."""
        if self._closing or self._channels.get(ch.key) is not ch:
            log.debug("%s (no longer in use): %s", ch.label, exc)
            return
        log.info("%s: %s", ch.label, exc)
        self._emit("channel-error", ch.label, str(exc))
        if self._establishing:
            if self._setup_error is None:
                self._setup_error = exc
                self._setup_failed.set()
            for waiter in (self._init_waiter, self._list_waiter):
                if waiter is not None and not waiter.done():
                    waiter.set_result(exc)
            return
        closed = isinstance(exc, ConnectError)
        if self._session.on_source_lost(ch.key, str(exc), time.monotonic(), closed=closed):
            return  # the source lets us go (switch-host, a hand-over): the session moves on
        self._fail(exc)

    async def _dispatch(self, ch: Channel, message: Message, now: float) -> None:
        if await self._on_migration_message(ch, message, now):
            return
        if isinstance(message, Notify):
            self._emit("notify", ch.label, message.message)
        elif isinstance(message, Disconnecting):
            self._emit("disconnecting", ch.label, f"reason {message.reason}")
        elif ch.key[0] == ChannelType.MAIN:
            self._on_main(message)
        elif ch.key[0] in (ChannelType.PORT, ChannelType.WEBDAV, ChannelType.USBREDIR):
            await self._on_port(ch, message, now)

    async def _on_migration_message(self, ch: Channel, message: Message, now: float) -> bool:
        """Handle a migration message (the client feeds its machine); False: not one."""
        raise NotImplementedError

    def _on_main(self, message: Message) -> None:
        if isinstance(message, MainInit):
            self.mouse_mode = message.current_mouse_mode
            self.agent_connected = bool(message.agent_connected)
            if self._init_waiter is not None and not self._init_waiter.done():
                self._init_waiter.set_result(message)
        elif isinstance(message, MainChannelsList):
            if self._list_waiter is not None and not self._list_waiter.done():
                self._list_waiter.set_result(message)
        elif isinstance(message, MainName):
            self.name = message.name
        elif isinstance(message, MainUuid):
            self.uuid = str(uuidlib.UUID(bytes=message.uuid))
        elif isinstance(message, MainMouseMode):
            self.mouse_mode = message.current_mode
        elif isinstance(message, MainAgentConnected | MainAgentConnectedTokens):
            self.agent_connected = True
        elif isinstance(message, MainAgentDisconnected):
            self.agent_connected = False

    async def _on_port(self, ch: Channel, message: Message, now: float) -> None:
        if isinstance(message, PortInit):
            ch.port_name = message.name
            stream = self._ports.setdefault(message.name, PortStream(message.name))
            # kept from the start for the checked stream and for a caller already waiting
            wanted = message.name == self.options.stream_port_name
            stream.wanted = stream.wanted or wanted or message.name in self._port_waiters
            if message.name == self.options.stream_port_name or self.options.open_all_ports:
                await ch.link.send(ClientPortEvent(PortEvent.OPENED))
            if message.opened:
                stream.opened.set()
            self._emit("port-init", ch.label, f"{message.name} opened={message.opened}")
            waiter = self._port_waiters.pop(message.name, None)
            if waiter is not None:
                waiter.set()
        elif isinstance(message, PortEventMessage):
            known = self._ports.get(ch.port_name or "")
            if known is not None and message.event == PortEvent.OPENED:
                known.opened.set()
            elif known is not None and message.event == PortEvent.CLOSED:
                known.opened.clear()
            self._emit("port-event", ch.label, f"{ch.port_name} event={message.event}")
        elif isinstance(message, VmcData) and ch.port_name is not None:
            if self._stream is not None and ch.port_name == self.options.stream_port_name:
                self._stream.feed(message.data, now)
            reader = self._ports.get(ch.port_name)
            if reader is not None and reader.wanted:
                reader._feed(message.data)

    def _emit(self, kind: str, channel: str = "", detail: str = "") -> None:
        event = ClientEvent(kind, channel, detail)
        log.debug("event %s %s %s", kind, channel, detail)
        for queue in self._subscribers:
            if queue.full():  # a subscriber that does not keep up loses the oldest
                queue.get_nowait()
            queue.put_nowait(event)


class _Failed:
    """The result :func:`_first_of` gives when the event came first."""


_FAILED = _Failed()


async def _first_of(aw: Awaitable[T], event: asyncio.Event) -> T | _Failed:
    """``aw``'s result, or :data:`_FAILED` once ``event`` is set (``aw`` is then cancelled).
    ``aw`` wins a tie: what it produced is not thrown away."""
    if event.is_set():
        if asyncio.iscoroutine(aw):
            aw.close()
        return _FAILED
    work = asyncio.ensure_future(aw)
    flag = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({work, flag}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (work, flag):
            if not fut.done():
                fut.cancel()
    if work.done():
        return work.result()
    return _FAILED
