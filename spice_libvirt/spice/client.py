"""The embedded SPICE client: one session, every channel, every migration path.

It links MAIN, reads INIT, attaches and links every listed channel with the session id, and
keeps them alive as a passive client (acks, pongs, display init, port open). When the
server migrates the session it follows whatever path the server chooses and writes down,
message by message, what happened (:class:`~spice_libvirt.spice.record.ClientMigrationRecord`):

* **seamless** -- BEGIN_SEAMLESS: link MAIN then every channel to the destination with the
  same connection id, DST_DO_SEAMLESS, wait ACK/NACK, tell the source CONNECTED_SEAMLESS;
  later each source channel gets MIGRATE: flush mark where flagged, forward MIGRATE_DATA
  byte for byte to the destination, swap sockets. The session and its id survive.
* **semi-seamless** -- BEGIN (or NACK): same pre-link, CONNECTED; on MIGRATE_END swap MAIN,
  send MIGRATE_END to the destination, wait for its INIT, swap the other channels.
* **switch-host** -- SWITCH_HOST: drop everything, connect afresh (connection id 0).
* **cancel** -- MIGRATE_CANCEL: drop the destination links, stay on the source.

Unlike spice-gtk, the source MAIN channel keeps being read while the destination links are
made, so a SWITCH_HOST or CANCEL that races the pre-link is seen and recorded at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from spice_libvirt.errors import (
    ConnectError,
    LinkError,
    LocalProtocolError,
    RemoteProtocolError,
    SpiceLibvirtError,
)
from spice_libvirt.spice.connection import KeepAlive
from spice_libvirt.spice.constants import (
    ChannelType,
    CommonCap,
    LinkErr,
    MainCap,
    MigrateFlags,
    PortEvent,
    channel_label,
)
from spice_libvirt.spice.link import LinkMess
from spice_libvirt.spice.messages import (
    ClientMigrateData,
    ClientPortEvent,
    Disconnecting,
    DisplayInit,
    DstInfo,
    MainAgentConnected,
    MainAgentConnectedTokens,
    MainAgentDisconnected,
    MainAttachChannels,
    MainChannelsList,
    MainClientMigrateEnd,
    MainInit,
    MainMigrateBegin,
    MainMigrateBeginSeamless,
    MainMigrateCancel,
    MainMigrateConnected,
    MainMigrateConnectedSeamless,
    MainMigrateConnectError,
    MainMigrateDstDoSeamless,
    MainMigrateDstSeamlessAck,
    MainMigrateDstSeamlessNack,
    MainMigrateEnd,
    MainMigrateSwitchHost,
    MainMouseMode,
    MainName,
    MainUuid,
    Message,
    Migrate,
    MigrateData,
    MigrateFlushMark,
    Notify,
    PortEventMessage,
    PortInit,
    VmcData,
    message_name,
)
from spice_libvirt.spice.migrate_data import check_migrate_data
from spice_libvirt.spice.record import ClientMigrationRecord, ClientPath, PathStep, StreamStats
from spice_libvirt.spice.stream import StreamChecker
from spice_libvirt.spice.transport import ChannelLink, TLSSettings, open_link

log = logging.getLogger(__name__)

ChannelKey = tuple[int, int]
MAIN_KEY: ChannelKey = (ChannelType.MAIN, 0)

#: channels on which spice-server always sends a first message once the channel client
#: exists (SET_ACK, INPUTS_INIT, PORT_INIT)
GREETING_CHANNELS = frozenset(
    {
        ChannelType.DISPLAY,
        ChannelType.CURSOR,
        ChannelType.INPUTS,
        ChannelType.PORT,
        ChannelType.WEBDAV,
    }
)

#: how long close() waits for the client's tasks to end
CLOSE_TIMEOUT = 3.0

#: how long a switch-host waits for the destination to drop the pre-linked session
SWITCH_DRAIN_TIMEOUT = 2.0

#: spice-gtk's display cache announcement (ids 1, 20 MiB of pixels, 16 MiB GLZ window).
DISPLAY_INIT = DisplayInit(1, 20 * 1024 * 1024 // 4, 1, 16 * 1024 * 1024 // 4)


class ClientOptions(BaseModel):
    """Where and how to connect, and which capabilities to announce.

    The capability switches exist so that tests can act as old clients (no SEAMLESS, no
    SEMI_SEAMLESS) and check that spice-server's fallback is reported truthfully.
    """

    model_config = ConfigDict(frozen=True)

    host: str
    port: int | None = None
    tls_port: int | None = None
    ticket: SecretStr | None = None
    ca_file: Path | None = None
    host_subject: str | None = None
    #: check record continuity on the port channel of this name (None: no stream check)
    stream_port_name: str | None = "org.spice-libvirt.stream"
    #: open (send PORT_EVENT OPENED on) every port channel, not only the stream port
    open_all_ports: bool = False
    seamless: bool = True
    semi_seamless: bool = True
    agent_connected_tokens: bool = True
    name_and_uuid: bool = True
    link_timeout: float = Field(default=10.0, gt=0)
    #: limit the channels linked after MAIN (None: every channel the server lists)
    channel_types: frozenset[int] | None = None

    def main_caps(self) -> frozenset[int]:
        caps = set()
        if self.semi_seamless:
            caps.add(MainCap.SEMI_SEAMLESS_MIGRATE)
        if self.name_and_uuid:
            caps.add(MainCap.NAME_AND_UUID)
        if self.agent_connected_tokens:
            caps.add(MainCap.AGENT_CONNECTED_TOKENS)
        if self.seamless:
            caps.add(MainCap.SEAMLESS_MIGRATE)
        return frozenset(caps)

    def password(self) -> str | None:
        return self.ticket.get_secret_value() if self.ticket else None


@dataclass(frozen=True)
class ClientEvent:
    """Something the client saw or did, for :meth:`SpiceClient.events` subscribers."""

    kind: str
    channel: str = ""
    detail: str = ""
    at: float = field(default_factory=time.monotonic)


class PortStream:
    """The byte stream of one port channel, as an async iterator of chunks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.opened = asyncio.Event()
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4096)
        self.dropped = 0

    def _feed(self, data: bytes) -> None:
        try:
            self._chunks.put_nowait(data)
        except asyncio.QueueFull:
            # nobody reads: keep the newest data flowing rather than stall the channel
            self.dropped += 1
            self._chunks.get_nowait()
            self._chunks.put_nowait(data)

    async def read(self, timeout: float | None = None) -> bytes:
        async with asyncio.timeout(timeout):
            return await self._chunks.get()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            yield await self._chunks.get()


@dataclass
class _Channel:
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


@dataclass
class _Migration:
    """One migration in progress, from the first migration message to its end."""

    number: int
    kind: Literal["seamless", "semi-seamless"]
    dst: DstInfo
    record: ClientMigrationRecord
    started: float
    dst_links: dict[ChannelKey, ChannelLink] = field(default_factory=dict)
    connect_task: asyncio.Task[None] | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    connected_ok: bool = False
    do_seamless: bool = False
    #: MIGRATE received per channel, for blackout accounting
    cut_at: dict[ChannelKey, float] = field(default_factory=dict)
    swapped: set[ChannelKey] = field(default_factory=set)
    #: source sockets of swapped channels, closed together once the last one swapped
    old_links: list[ChannelLink] = field(default_factory=list)
    awaiting_init: bool = False
    #: SWITCH_HOST arrived: the session is being rebuilt on the destination
    switching: bool = False
    done: bool = False


class SpiceClient:
    """An embedded SPICE client session. See the module docstring for what it follows."""

    def __init__(self, options: ClientOptions) -> None:
        if options.port is None and options.tls_port is None:
            raise LocalProtocolError("a SPICE client needs a port or a tls-port")
        self.options = options
        self.host = options.host
        self.port = options.port
        self.tls_port = options.tls_port
        self.session_id = 0
        self.name: str | None = None
        self.uuid: str | None = None
        self.mouse_mode: int | None = None
        self.agent_connected = False
        self.server_common_caps: frozenset[int] = frozenset()
        self.server_main_caps: frozenset[int] = frozenset()
        self.listed_channels: list[ChannelKey] = []
        self._channels: dict[ChannelKey, _Channel] = {}
        self._keepalives: dict[ChannelKey, KeepAlive] = {}
        self._ports: dict[str, PortStream] = {}
        self._port_waiters: dict[str, asyncio.Event] = {}
        self._subscribers: list[asyncio.Queue[ClientEvent]] = []
        self._migration: _Migration | None = None
        self._migrations_started = 0
        self._history: list[_Migration] = []
        self._finished: asyncio.Queue[ClientMigrationRecord] = asyncio.Queue()
        self._stream = StreamChecker() if options.stream_port_name else None
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        self._init_waiter: asyncio.Future[MainInit] | None = None
        self._list_waiter: asyncio.Future[MainChannelsList] | None = None
        self.failure: SpiceLibvirtError | None = None

    # ------------------------------------------------------------------ public API

    @property
    def channels(self) -> list[str]:
        """Labels of the channels currently linked, e.g. ``["main:0", "display:0"]``."""
        return [channel_label(*key) for key in sorted(self._channels)]

    @property
    def migration_count(self) -> int:
        """How many migrations the server has started so far (read before client_migrate_info)."""
        return self._migrations_started

    @property
    def rtt_estimate(self) -> float:
        """Round-trip time to the current server in seconds (fastest TCP connect seen).

        A TCP handshake costs one round trip (a TLS one more): the smallest connect time
        among the session's channels is a fair, cheap estimate.
        """
        times = [ch.link.connect_seconds for ch in self._channels.values() if not ch.link.tls]
        times = times or [ch.link.connect_seconds / 2 for ch in self._channels.values()]
        return min(times, default=0.0)

    @property
    def tls_in_use(self) -> bool:
        main = self._channels.get(MAIN_KEY)
        return bool(main and main.link.tls)

    async def connect(self, timeout: float | None = None) -> None:
        """Link MAIN and every channel the server lists; returns when all are up.

        :raise ConnectError: unreachable, or no SPICE link in time
        :raise AuthenticationError: wrong ticket ("permission denied")
        :raise TLSVerificationError: certificate did not verify
        :raise RemoteProtocolError: the peer is not SPICE or broke the protocol
        """
        try:
            async with asyncio.timeout(timeout or self.options.link_timeout * 2):
                await self._establish(
                    self.host, self.port, self.tls_port, self.options.host_subject
                )
        except TimeoutError as exc:
            await self.close()
            raise ConnectError(
                f"SPICE session with {self.host} not established in time", exc
            ) from exc
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Disconnect every channel and every destination link; idempotent."""
        self._closing = True
        if self._migration is not None:
            await self._abort_migration(self._migration, "client closed")
        tasks = [t for t in self._background if t is not asyncio.current_task()]
        tasks += [
            ch.task
            for ch in self._channels.values()
            if ch.task and ch.task is not asyncio.current_task()
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            # bounded: a task that does not end on cancellation must not hang the caller
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in stuck:
                log.warning("task %s did not end on cancellation", task.get_name())
        # non-main channels first, as spice-gtk does: the server then tears the session
        # down from MAIN's disconnect with every other channel already gone
        for ch in sorted(self._channels.values(), key=lambda c: c.key == MAIN_KEY):
            await ch.link.close(drain_timeout=0.5)
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
                await waiter.wait()
        return self._ports[name]

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
        """
        async with asyncio.timeout(timeout):
            while True:
                mig = self._migration_after(after)
                if mig is not None:
                    await mig.connected.wait()
                    return mig.record.connected_reply_at if mig.connected_ok else None
                await asyncio.sleep(0.002)

    def _migration_after(self, after: int | None) -> _Migration | None:
        if after is None:
            return self._migration
        return next((m for m in self._history if m.number > after), None)

    async def next_migration(self, timeout: float) -> ClientMigrationRecord:
        """The record of the next migration that finishes (in order).

        :raise TimeoutError: none finished in time
        """
        async with asyncio.timeout(timeout):
            return await self._finished.get()

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Every :class:`ClientEvent` from now on, as an async iterator."""
        queue: asyncio.Queue[ClientEvent] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    # ------------------------------------------------------------------ linking

    def _link_mess(self, key: ChannelKey, connection_id: int) -> LinkMess:
        common = {CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER}
        caps = self.options.main_caps() if key[0] == ChannelType.MAIN else frozenset()
        return LinkMess(connection_id, key[0], key[1], frozenset(common), caps)

    def _tls(self, subject: str | None) -> TLSSettings:
        return TLSSettings(ca_file=self.options.ca_file, host_subject=subject)

    async def _link(
        self,
        key: ChannelKey,
        connection_id: int,
        host: str,
        port: int | None,
        tls_port: int | None,
        subject: str | None,
    ) -> ChannelLink:
        """Link one channel: plain port first if there is one, TLS when told NEED_SECURED."""
        mess = self._link_mess(key, connection_id)
        password = self.options.password()
        timeout = self.options.link_timeout
        if port is not None:
            try:
                return await open_link(host, port, mess, password=password, timeout=timeout)
            except LinkError as exc:
                if exc.code != LinkErr.NEED_SECURED:
                    raise
                if tls_port is None:
                    raise LinkError(
                        exc.code,
                        f"{channel_label(*key)}: the server requires TLS (NEED_SECURED) and no "
                        "tls-port is known (add ?tls-port=N to the URI)",
                    ) from exc
                log.debug("%s: server wants TLS, retrying on %s", channel_label(*key), tls_port)
        if tls_port is None:
            raise ConnectError(
                f"{channel_label(*key)}: the server needs TLS but no tls-port is known"
            )
        return await open_link(
            host, tls_port, mess, password=password, tls=self._tls(subject), timeout=timeout
        )

    async def _establish(
        self, host: str, port: int | None, tls_port: int | None, subject: str | None
    ) -> None:
        """A brand-new session (connection id 0): MAIN, INIT, attach, link the rest."""
        main_link = await self._link(MAIN_KEY, 0, host, port, tls_port, subject)
        self.host, self.port, self.tls_port = host, port, tls_port
        self.server_common_caps = main_link.common_caps
        self.server_main_caps = main_link.channel_caps
        loop = asyncio.get_running_loop()
        self._init_waiter = loop.create_future()
        self._list_waiter = loop.create_future()
        main = self._add_channel(MAIN_KEY, main_link)
        self._start_reader(main)
        init = await self._init_waiter
        self.session_id = init.session_id
        await main.link.send(MainAttachChannels())
        listed = await self._list_waiter
        self.listed_channels = [k for k in listed.channels if k != MAIN_KEY]
        wanted = [
            k
            for k in self.listed_channels
            if self.options.channel_types is None or k[0] in self.options.channel_types
        ]
        links = await asyncio.gather(
            *(self._link(k, self.session_id, host, port, tls_port, subject) for k in wanted),
            return_exceptions=True,
        )
        errors = [r for r in links if isinstance(r, BaseException)]
        for key, result in zip(wanted, links, strict=True):
            if isinstance(result, ChannelLink):
                ch = self._add_channel(key, result)
                await self._channel_up(ch)
                self._start_reader(ch)
        if errors:
            err = errors[0]
            raise err if isinstance(err, SpiceLibvirtError) else ConnectError(str(err), err)
        await self._wait_channels_created()
        self.failure = None
        self._emit(
            "session-up", "main:0", f"session {self.session_id}, {len(self._channels)} channels"
        )

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
            log.warning("channels without a first message after the link: %s", ", ".join(silent))

    def _add_channel(self, key: ChannelKey, link: ChannelLink) -> _Channel:
        ch = _Channel(key, link, last_rx=time.monotonic())
        self._channels[key] = ch
        self._emit("linked", ch.label, f"{link.host}:{link.port}{' tls' if link.tls else ''}")
        return ch

    async def _channel_up(self, ch: _Channel) -> None:
        """What a fresh channel needs before the server talks (spice-gtk's channel_up)."""
        if ch.key[0] == ChannelType.DISPLAY:
            await ch.link.send(DISPLAY_INIT)

    def _start_reader(self, ch: _Channel) -> None:
        ch.task = asyncio.create_task(self._read_channel(ch), name=f"spice-{ch.label}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ reading

    async def _read_channel(self, ch: _Channel) -> None:
        try:
            while True:
                link = ch.link
                event = await link.read()
                now = time.monotonic()
                ch.last_rx = now
                ch.received += 1
                ch.first_rx.set()
                message = event.message
                replies = self._keepalive(ch, message)
                if replies:
                    await link.send(*replies)
                await self._dispatch(ch, message, now)
        except asyncio.CancelledError:
            raise
        except SpiceLibvirtError as exc:
            self._on_channel_error(ch, exc)
        except (ConnectionError, OSError) as exc:
            self._on_channel_error(ch, ConnectError(f"{ch.label}: {exc}", exc))

    def _keepalive(self, ch: _Channel, message: Message) -> list[Message]:
        keepalive = self._keepalives.get(ch.key)
        if keepalive is None:
            keepalive = self._keepalives[ch.key] = KeepAlive()
        return keepalive.on_message(message)

    def _on_channel_error(self, ch: _Channel, exc: SpiceLibvirtError) -> None:
        if self._closing or self._channels.get(ch.key) is not ch:
            return
        log.info("%s: %s", ch.label, exc)
        self._emit("channel-error", ch.label, str(exc))
        mig = self._migration
        if mig is not None and not mig.done:
            self._step(mig, ch.key, "src", "event", "SOURCE_LOST", str(exc))
            if mig.switching:
                return  # the source drops us after SWITCH_HOST; the session moves on
        if ch.key == MAIN_KEY:
            self.failure = exc
            for waiter in (self._init_waiter, self._list_waiter):
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)

    async def _dispatch(self, ch: _Channel, message: Message, now: float) -> None:
        if isinstance(message, Migrate):
            await self._on_migrate(ch, message, now)
        elif isinstance(message, Notify):
            self._emit("notify", ch.label, message.message)
        elif isinstance(message, Disconnecting):
            self._emit("disconnecting", ch.label, f"reason {message.reason}")
        elif ch.key[0] == ChannelType.MAIN:
            await self._on_main(ch, message, now)
        elif ch.key[0] in (ChannelType.PORT, ChannelType.WEBDAV, ChannelType.USBREDIR):
            await self._on_port(ch, message, now)

    async def _on_main(self, ch: _Channel, message: Message, now: float) -> None:
        if isinstance(message, MainInit):
            self.mouse_mode = message.current_mouse_mode
            self.agent_connected = bool(message.agent_connected)
            mig = self._migration
            if mig is not None and mig.awaiting_init:
                await self._semi_seamless_init(mig, message, now)
            elif self._init_waiter is not None and not self._init_waiter.done():
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
        elif isinstance(message, MainMigrateBeginSeamless):
            self._begin_migration("seamless", message.dst, message, now, message.src_mig_version)
        elif isinstance(message, MainMigrateBegin):
            self._begin_migration("semi-seamless", message.dst, message, now, None)
        elif isinstance(message, MainMigrateEnd):
            await self._semi_seamless_end(ch, now)
        elif isinstance(message, MainMigrateSwitchHost):
            await self._switch_host(message.dst, now)
        elif isinstance(message, MainMigrateCancel):
            await self._cancel(now)

    async def _on_port(self, ch: _Channel, message: Message, now: float) -> None:
        if isinstance(message, PortInit):
            ch.port_name = message.name
            stream = self._ports.setdefault(message.name, PortStream(message.name))
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
            if reader is not None:
                reader._feed(message.data)

    # ------------------------------------------------------------------ migration

    def _step(
        self,
        mig: _Migration,
        key: ChannelKey,
        side: Literal["src", "dst"],
        direction: Literal["rx", "tx", "event"],
        name: str,
        detail: str = "",
    ) -> None:
        t_ms = round((time.monotonic() - mig.started) * 1000.0, 3)
        mig.record.steps.append(
            PathStep(
                t_ms=t_ms,
                channel=channel_label(*key),
                side=side,
                direction=direction,
                message=name,
                detail=detail,
            )
        )

    def _begin_migration(
        self,
        kind: Literal["seamless", "semi-seamless"],
        dst: DstInfo,
        message: Message,
        now: float,
        src_version: int | None,
    ) -> None:
        old = self._migration
        if old is not None and not old.done:
            self._spawn(self._abort_migration(old, "superseded by a new migration"), "spice-abort")
            self._finish(old, "cancelled", now, error="superseded by a new migration")
        mig = self._new_migration(kind, dst, now)
        if self._stream is not None:
            self._stream.reset_stall()
        self._step(
            mig,
            MAIN_KEY,
            "src",
            "rx",
            message_name(message),
            f"{dst.host} port={dst.port} tls-port={dst.tls_port}",
        )
        self._emit("migration-begin", "main:0", f"{kind} to {mig.record.destination}")
        mig.connect_task = asyncio.create_task(
            self._migration_connect(mig, src_version), name="spice-migrate-connect"
        )

    async def _migration_connect(self, mig: _Migration, src_version: int | None) -> None:
        """Pre-link every channel to the destination, then answer the source."""
        dst = mig.dst
        host = dst.host or self.host
        use_tls = self.tls_in_use or dst.port is None
        port = None if use_tls else dst.port
        main_src = self._channels[MAIN_KEY]
        try:
            dst_main = await self._link(
                MAIN_KEY, self.session_id, host, port, dst.tls_port, dst.cert_subject
            )
            mig.dst_links[MAIN_KEY] = dst_main
            self._step(mig, MAIN_KEY, "dst", "event", "LINKED", f"{host}:{dst_main.port}")
            others = [k for k in self._channels if k != MAIN_KEY]
            do_seamless = (
                mig.kind == "seamless"
                and src_version is not None
                and MainCap.SEAMLESS_MIGRATE in dst_main.channel_caps
            )
            jobs: list[asyncio.Future[object]] = [
                asyncio.ensure_future(self._link_dst(mig, k, host, port)) for k in others
            ]
            if do_seamless:
                assert src_version is not None
                await dst_main.send(MainMigrateDstDoSeamless(src_version))
                self._step(
                    mig, MAIN_KEY, "dst", "tx", "MIGRATE_DST_DO_SEAMLESS", f"version {src_version}"
                )
                jobs.append(asyncio.ensure_future(self._await_seamless_answer(mig, dst_main)))
            results = await asyncio.gather(*jobs, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if failures:
                raise failures[0]
            mig.do_seamless = do_seamless and mig.do_seamless
            reply: Message = (
                MainMigrateConnectedSeamless() if mig.do_seamless else MainMigrateConnected()
            )
            await main_src.link.send(reply)
            mig.record.connected_reply_at = time.monotonic()
            mig.connected_ok = True
            self._step(mig, MAIN_KEY, "src", "tx", message_name(reply))
            self._emit("migration-connected", "main:0", message_name(reply))
        except asyncio.CancelledError:
            raise
        except (SpiceLibvirtError, OSError) as exc:
            log.info("migration pre-link failed: %s", exc)
            self._step(mig, MAIN_KEY, "dst", "event", "LINK_FAILED", str(exc))
            mig.record.error = f"destination link failed: {exc}"
            await self._close_dst_links(mig)
            with contextlib.suppress(SpiceLibvirtError):
                await main_src.link.send(MainMigrateConnectError())
                self._step(mig, MAIN_KEY, "src", "tx", "MIGRATE_CONNECT_ERROR")
        finally:
            mig.connected.set()

    async def _link_dst(
        self, mig: _Migration, key: ChannelKey, host: str, port: int | None
    ) -> None:
        link = await self._link(
            key, self.session_id, host, port, mig.dst.tls_port, mig.dst.cert_subject
        )
        mig.dst_links[key] = link
        self._step(mig, key, "dst", "event", "LINKED", f"{host}:{link.port}")

    async def _await_seamless_answer(self, mig: _Migration, dst_main: ChannelLink) -> None:
        """Read the destination MAIN until ACK/NACK; nothing else is expected before it."""
        while True:
            event = await dst_main.read()
            message = event.message
            if isinstance(message, MainMigrateDstSeamlessAck):
                mig.do_seamless = True
                self._step(mig, MAIN_KEY, "dst", "rx", message.NAME)
                return
            if isinstance(message, MainMigrateDstSeamlessNack):
                mig.do_seamless = False
                self._step(mig, MAIN_KEY, "dst", "rx", message.NAME)
                return
            self._step(mig, MAIN_KEY, "dst", "rx", message_name(message), "before seamless answer")

    async def _on_migrate(self, ch: _Channel, message: Migrate, now: float) -> None:
        """Seamless hand-over of one channel (SPICE_MSG_MIGRATE on the source)."""
        mig = self._migration
        src = ch.link
        flags = MigrateFlags(message.flags)
        if mig is None or mig.done or ch.key not in mig.dst_links:
            raise RemoteProtocolError(f"{ch.label}: MIGRATE without a prepared destination link")
        mig.cut_at[ch.key] = now
        self._step(mig, ch.key, "src", "rx", "MIGRATE", f"flags {int(flags)}")
        if flags & MigrateFlags.NEED_FLUSH:
            await src.send(MigrateFlushMark())
            self._step(mig, ch.key, "src", "tx", "MIGRATE_FLUSH_MARK")
        data: bytes | None = None
        if flags & MigrateFlags.NEED_DATA_TRANSFER:
            event = await src.read()  # the connection state machine allows only MIGRATE_DATA
            assert isinstance(event.message, MigrateData)
            data = event.message.data
            try:
                detail = check_migrate_data(ch.key[0], data).describe()
            except RemoteProtocolError as exc:
                # forwarded all the same: the destination server is the judge of its state
                detail = f"{len(data)} bytes, envelope invalid: {exc}"
            self._step(mig, ch.key, "src", "rx", "MIGRATE_DATA", detail)
        dst = mig.dst_links[ch.key]
        if data is not None:
            await dst.send(ClientMigrateData(data))
            self._step(mig, ch.key, "dst", "tx", "MIGRATE_DATA", f"{len(data)} bytes")
        ch.link = dst
        ch.received = 0
        self._keepalives.pop(ch.key, None)
        mig.swapped.add(ch.key)
        mig.record.blackout_ms[ch.label] = round((time.monotonic() - now) * 1000.0, 3)
        self._step(mig, ch.key, "dst", "event", "SWAPPED")
        # keep the source socket open until every channel has swapped: closing the source
        # MAIN makes spice-server drop the whole client, and channels still waiting for their
        # MIGRATE_DATA would lose it (spice-gtk also closes the old session only at the end)
        mig.old_links.append(src)
        if mig.swapped >= set(self._channels):
            self._finish(mig, "seamless", time.monotonic())
            self._spawn(self._close_old_links(mig), "spice-leave-source")

    async def _semi_seamless_end(self, ch: _Channel, now: float) -> None:
        mig = self._migration
        if mig is None or mig.done or MAIN_KEY not in mig.dst_links:
            # spice-server only sends MIGRATE_END to clients that reported connected
            raise RemoteProtocolError("MIGRATE_END without a connected migration")
        self._step(mig, MAIN_KEY, "src", "rx", "MIGRATE_END")
        mig.cut_at[MAIN_KEY] = now
        src = ch.link
        ch.link = mig.dst_links[MAIN_KEY]
        self._keepalives.pop(MAIN_KEY, None)
        mig.awaiting_init = True
        await ch.link.send(MainClientMigrateEnd())
        self._step(mig, MAIN_KEY, "dst", "tx", "MIGRATE_END")
        mig.old_links.append(src)

    async def _semi_seamless_init(self, mig: _Migration, init: MainInit, now: float) -> None:
        mig.awaiting_init = False
        self._step(mig, MAIN_KEY, "dst", "rx", "INIT", f"session {init.session_id}")
        mig.record.blackout_ms["main:0"] = round((now - mig.cut_at[MAIN_KEY]) * 1000.0, 3)
        self.session_id = init.session_id
        for key, ch in list(self._channels.items()):
            if key == MAIN_KEY:
                continue
            dst = mig.dst_links.get(key)
            if dst is None:
                continue
            await self._replace_link(ch, dst, close_old=False, old_links=mig.old_links)
            await self._channel_up(ch)
            mig.record.blackout_ms[ch.label] = round((time.monotonic() - now) * 1000.0, 3)
            self._step(mig, key, "dst", "event", "SWAPPED")
        self.host = mig.dst.host or self.host
        self._finish(mig, "semi-seamless", time.monotonic())
        self._spawn(self._close_old_links(mig), "spice-leave-source")

    async def _replace_link(
        self,
        ch: _Channel,
        link: ChannelLink,
        *,
        close_old: bool = True,
        old_links: list[ChannelLink] | None = None,
    ) -> None:
        """Move a channel to another socket from outside its reader task."""
        if ch.task is not None and ch.task is not asyncio.current_task():
            ch.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ch.task
        old = ch.link
        ch.link = link
        ch.received = 0
        self._keepalives.pop(ch.key, None)
        if close_old:
            await old.close()
        elif old_links is not None:
            old_links.append(old)
        self._start_reader(ch)

    async def _close_old_links(self, mig: _Migration) -> None:
        """Leave the source: close the sockets the channels used before the swap."""
        old, mig.old_links = mig.old_links, []
        for link in old:
            await link.close()

    async def _switch_host(self, dst: DstInfo, now: float) -> None:
        mig = self._migration
        if mig is None or mig.done:
            # an old client never got BEGIN: the switch is the whole migration
            self._begin_record_only(dst, now)
            mig = self._migration
            assert mig is not None
        self._step(
            mig,
            MAIN_KEY,
            "src",
            "rx",
            "MIGRATE_SWITCH_HOST",
            f"{dst.host} port={dst.port} tls-port={dst.tls_port}",
        )
        if mig.switching:
            return
        mig.switching = True
        # the main reader is the task running this: reconnect from a task of its own
        self._spawn(self._do_switch_host(mig, dst, now), "spice-switch-host")

    def _begin_record_only(self, dst: DstInfo, now: float) -> None:
        mig = self._new_migration("semi-seamless", dst, now)
        mig.connected.set()

    def _new_migration(
        self, kind: Literal["seamless", "semi-seamless"], dst: DstInfo, now: float
    ) -> _Migration:
        """Open the record of a migration that starts now; it becomes the current one."""
        self._migrations_started += 1
        record = ClientMigrationRecord(
            path="none",
            connection_id_before=self.session_id,
            channels_before=self.channels,
            started_at=now,
            destination=f"{dst.host}:{dst.port or dst.tls_port}",
        )
        mig = _Migration(self._migrations_started, kind, dst, record, now)
        self._migration = mig
        self._history.append(mig)
        return mig

    async def _do_switch_host(self, mig: _Migration, dst: DstInfo, now: float) -> None:
        task = mig.connect_task
        if task is not None and not task.done():
            # Let the pre-links in flight finish instead of cutting them mid-handshake:
            # aborting a destination link between link reply and link result, then linking
            # MAIN afresh, segfaulted spice-server 0.15.1 (~1 in 6 forced switch-hosts here;
            # spice-gtk, which handles SWITCH_HOST only after its connect, never hit it).
            _, pending = await asyncio.wait({task}, timeout=self.options.link_timeout)
            for late in pending:
                late.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await late
        # the destination must have torn the pre-linked session down before a fresh MAIN
        # link arrives there (see ChannelLink.close)
        await self._close_dst_links(mig, drain_timeout=SWITCH_DRAIN_TIMEOUT)
        old = sorted(self._channels.values(), key=lambda c: c.key == MAIN_KEY)
        self._channels.clear()
        for ch in old:
            if ch.task is not None:
                ch.task.cancel()
        for ch in old:
            await ch.link.close()
        self._keepalives.clear()
        self.session_id = 0
        host = dst.host or self.host
        try:
            await self._establish(
                host, dst.port, dst.tls_port, dst.cert_subject or self.options.host_subject
            )
        except (SpiceLibvirtError, OSError) as exc:
            self._step(mig, MAIN_KEY, "dst", "event", "RECONNECT_FAILED", str(exc))
            self._finish(
                mig, "failed", time.monotonic(), error=f"switch-host reconnect failed: {exc}"
            )
            return
        done = time.monotonic()
        self._step(mig, MAIN_KEY, "dst", "event", "RECONNECTED", f"session {self.session_id}")
        for label in self.channels:
            mig.record.blackout_ms[label] = round((done - now) * 1000.0, 3)
        self._finish(mig, "switch-host", done)

    async def _cancel(self, now: float) -> None:
        mig = self._migration
        if mig is None or mig.done:
            return
        self._step(mig, MAIN_KEY, "src", "rx", "MIGRATE_CANCEL")
        if mig.switching:
            # spice-server answers a late CONNECTED_SEAMLESS with MIGRATE_CANCEL even after
            # it sent SWITCH_HOST: the switch is what happens, the cancel is noise
            return
        await self._abort_migration(mig, "cancelled by the server")
        self._finish(mig, "cancelled", now)

    async def _abort_migration(self, mig: _Migration, why: str) -> None:
        task = mig.connect_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        mig.connected.set()
        await self._close_dst_links(mig)
        await self._close_old_links(mig)

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

    def _finish(
        self, mig: _Migration, path: ClientPath, at: float, error: str | None = None
    ) -> None:
        if mig.done:
            return
        mig.done = True
        record = mig.record
        record.path = path
        record.finished_at = at
        record.connection_id_after = self.session_id if path != "failed" else None
        record.connection_id_kept = path in ("seamless", "semi-seamless") and (
            self.session_id == record.connection_id_before
        )
        if path == "cancelled":
            record.connection_id_after = record.connection_id_before
            record.connection_id_kept = True
        record.channels_after = self.channels
        if error:
            record.error = error
        self._step(mig, MAIN_KEY, "dst" if path != "cancelled" else "src", "event", f"DONE:{path}")
        self._emit("migration-done", "main:0", path)
        self._finished.put_nowait(record)

    # ------------------------------------------------------------------ events

    def _emit(self, kind: str, channel: str = "", detail: str = "") -> None:
        event = ClientEvent(kind, channel, detail)
        log.debug("event %s %s %s", kind, channel, detail)
        for queue in self._subscribers:
            queue.put_nowait(event)
