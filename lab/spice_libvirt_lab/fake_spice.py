"""A scriptable SPICE server on loopback, honest by default and hostile on request.

The embedded client must survive any server: one that floods it, lies about sizes, sends
messages out of phase, or migrates it to a destination that never answers. spice-server
cannot be made to misbehave, so this server speaks just enough of the protocol to bring a
client session up and through a migration, the way spice-server 0.15 drives one
(``spice-protocol-facts.md``), and lets a test or benchmark replace any step with bytes of
its choosing:

* the link of every channel (any connection id; the ticket is not checked), mini headers;
* MAIN: INIT, then CHANNELS_LIST on ATTACH_CHANNELS; other channels greet with SET_ACK;
* a source's migration: :meth:`FakeSpiceServer.begin` (MIGRATE_BEGIN_SEAMLESS or BEGIN),
  the client's answer (:meth:`FakeSpiceServer.answer`), :meth:`FakeSpiceServer.handover`
  (MIGRATE on every channel, MIGRATE_DATA on each FLUSH_MARK);
* a destination (``destination=True``): answers DO_SEAMLESS with ACK and takes the data.

Hostile variants are constructor arguments (``greeting``, ``channels_list``, ``takeover``,
``migrate_data``, ``seamless_answer``, ``after_data``) and raw writes on a linked channel
(:meth:`ServerChannel.send_raw`). Not a product module:
it lives with the labs and never listens beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from spice_libvirt.errors import RemoteProtocolError
from spice_libvirt.spice.constants import (
    NO_MIGRATE_DATA_CHANNELS,
    ChannelType,
    CommonCap,
    MainCap,
    MigrateFlags,
)
from spice_libvirt.spice.framing import MINI_HEADER, FrameDecoder, encode_frame
from spice_libvirt.spice.link import LINK_HEADER, LinkMess, LinkReply
from spice_libvirt.spice.messages import (
    ClientMigrateData,
    DstInfo,
    MainAttachChannels,
    MainChannelsList,
    MainInit,
    MainMigrateBegin,
    MainMigrateBeginSeamless,
    MainMigrateCancel,
    MainMigrateConnected,
    MainMigrateConnectedSeamless,
    MainMigrateConnectError,
    MainMigrateDstDoSeamless,
    MainMigrateDstSeamlessAck,
    MainMigrateSwitchHost,
    Message,
    Migrate,
    MigrateData,
    MigrateFlushMark,
    Ping,
    Pong,
    SetAck,
    decode_client_message,
    message_name,
    message_type,
)
from spice_libvirt.spice.migrate_data import EXPECTED

ChannelKey = tuple[int, int]
MAIN: ChannelKey = (ChannelType.MAIN, 0)
COMMON_CAPS = frozenset(
    {CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.AUTH_SPICE, CommonCap.MINI_HEADER}
)
MAIN_CAPS = frozenset({MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE})
DEFAULT_CHANNELS: tuple[ChannelKey, ...] = (
    (ChannelType.DISPLAY, 0),
    (ChannelType.INPUTS, 0),
    (ChannelType.CURSOR, 0),
)

#: a raw takeover of one connection right after the client's link request
Takeover = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@functools.cache
def _public_key_der() -> bytes:
    """One RSA-1024 key per process (spice-server makes one per link; that costs time)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def link_reply(key: ChannelKey, error: int = 0) -> bytes:
    """The server's link reply for a channel of ``key``'s type (header included)."""
    caps = MAIN_CAPS if key[0] == ChannelType.MAIN else frozenset()
    return LinkReply(error, _public_key_der(), COMMON_CAPS, caps).encode()


def frame(message: Message) -> bytes:
    """A server message with the mini header."""
    return encode_frame(message_type(message), message.encode_body(), mini=True)


def raw_frame(msg_type: int, body: bytes) -> bytes:
    return MINI_HEADER.pack(msg_type, len(body)) + body


def header_only(msg_type: int, size: int) -> bytes:
    """A mini header that announces ``size`` body bytes (none follow)."""
    return MINI_HEADER.pack(msg_type, size)


def migrate_data_for(channel_type: int) -> bytes:
    """A MIGRATE_DATA body whose envelope the client accepts for ``channel_type``."""
    magic, size = EXPECTED.get(channel_type, (b"SVMD", 33))
    return magic + struct.pack("<I", 1) + bytes(max(0, size - 8))


def migrate_flags(channel_type: int) -> int:
    """What spice-server's MIGRATE carries per channel: flush and data, or nothing."""
    if channel_type in NO_MIGRATE_DATA_CHANNELS:
        return 0
    return int(MigrateFlags.NEED_FLUSH | MigrateFlags.NEED_DATA_TRANSFER)


@dataclass
class ServerChannel:
    """One linked channel on the server side."""

    key: ChannelKey
    connection_id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: list[tuple[float, str]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def send(self, *messages: Message) -> None:
        for message in messages:
            self.writer.write(frame(message))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def close(self) -> None:
        self.writer.close()

    def stop_reading(self) -> None:
        """Read nothing more from the client (its sends then back up)."""
        self.writer.transport.pause_reading()  # type: ignore[attr-defined]

    def seen(self, name: str) -> bool:
        return any(n == name for _, n in self.received)


class FakeSpiceServer:
    """See the module docstring. ``await start()`` returns the port."""

    def __init__(
        self,
        *,
        channels: tuple[ChannelKey, ...] = DEFAULT_CHANNELS,
        session_id: int = 0xABCD,
        destination: bool = False,
        greeting: Callable[[ChannelKey], bytes | None] | None = None,
        channels_list: bytes | None = None,
        takeover: Callable[[ChannelKey], Takeover | None] | None = None,
        migrate_data: Callable[[ServerChannel], Awaitable[bool]] | None = None,
        seamless_answer: Callable[[ServerChannel], Awaitable[None]] | None = None,
        after_data: Callable[[ServerChannel], Awaitable[None]] | None = None,
    ) -> None:
        self.listed = channels
        self.session_id = session_id
        self.destination = destination
        self._greeting = greeting
        self._channels_list = channels_list
        self._takeover = takeover
        self._migrate_data = migrate_data
        self._seamless_answer = seamless_answer
        self._after_data = after_data
        self.channels: dict[ChannelKey, ServerChannel] = {}
        self.links_seen: list[ChannelKey] = []
        #: monotonic time of the first link request (a set-up case's act starts there)
        self.first_link_at: float | None = None
        self.session_up = asyncio.Event()
        self.answers: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        self.pongs: asyncio.Queue[float] = asyncio.Queue()
        self.migrate_data_in: dict[ChannelKey, bytes] = {}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        #: set by close(): a scripted step that waits "forever" waits for this
        self.closing = asyncio.Event()
        self.port = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.closing.set()
        for writer in self._writers:
            writer.close()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2.0)
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()

    async def __aenter__(self) -> FakeSpiceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- the link

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # closed with the server, whatever the connection is doing
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self._writers.append(writer)
        # a cancelled handler ends normally: asyncio's start_server asks its task for an
        # exception, which a cancelled task raises instead of returning
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(LINK_HEADER.size)
            size = struct.unpack_from("<I", head, 12)[0]
            mess = LinkMess.decode(await reader.readexactly(size))
            key = (mess.channel_type, mess.channel_id)
            self.links_seen.append(key)
            self.first_link_at = self.first_link_at or time.monotonic()
            takeover = self._takeover(key) if self._takeover else None
            if takeover is not None:
                await takeover(reader, writer)
                return
            writer.write(link_reply(key))
            await writer.drain()
            await reader.readexactly(4 + 128)  # auth mechanism, encrypted ticket
            writer.write(struct.pack("<I", 0))
            await writer.drain()
            ch = ServerChannel(key, mess.connection_id, reader, writer)
            self.channels[key] = ch
            self._greet(ch)
            await ch.drain()
            if set(self.listed) | {MAIN} <= set(self.channels):
                self.session_up.set()
            await self._read(ch)
        except (asyncio.IncompleteReadError, ConnectionError, RemoteProtocolError):
            pass
        finally:
            writer.close()

    def _greet(self, ch: ServerChannel) -> None:
        """INIT on MAIN, SET_ACK elsewhere (or the bytes ``greeting`` gives for the channel)."""
        if self.destination:
            return  # a migration target speaks once the client's data came in
        special = self._greeting(ch.key) if self._greeting else None
        if special is not None:
            ch.send_raw(special)
        elif ch.key == MAIN:
            ch.send(MainInit(self.session_id, 1, 3, 2, 0, 10, 0, 0))
        else:
            ch.send(SetAck(1, 20))

    # ---------------------------------------------------------------- the client's messages

    async def _read(self, ch: ServerChannel) -> None:
        decoder = FrameDecoder(mini=True, max_body=1 << 20)
        while data := await ch.reader.read(65536):
            decoder.feed(data)
            while (raw := decoder.next_raw()) is not None:
                _, msg_type, body = raw
                message = decode_client_message(ch.key[0], msg_type, body)
                ch.received.append((time.monotonic(), message_name(message)))
                await self._on_message(ch, message)

    async def _on_message(self, ch: ServerChannel, message: Message) -> None:
        now = time.monotonic()
        if isinstance(message, MainAttachChannels):
            listed = MainChannelsList(tuple(self.listed))
            ch.send_raw(self._channels_list if self._channels_list is not None else frame(listed))
        elif isinstance(
            message, MainMigrateConnectedSeamless | MainMigrateConnected | MainMigrateConnectError
        ):
            self.answers.put_nowait((now, message.NAME))
        elif isinstance(message, MainMigrateDstDoSeamless):
            if self._seamless_answer is not None:
                await self._seamless_answer(ch)
            else:
                ch.send(MainMigrateDstSeamlessAck())
        elif isinstance(message, MigrateFlushMark) and self._sends_data(ch.key):
            # ``migrate_data`` may send something else (and says so with True)
            if self._migrate_data is None or not await self._migrate_data(ch):
                ch.send_raw(raw_frame(MigrateData.TYPE, migrate_data_for(ch.key[0])))
        elif isinstance(message, Pong):
            self.pongs.put_nowait(now)
        elif isinstance(message, ClientMigrateData):
            self.migrate_data_in[ch.key] = message.data
            if self._after_data is not None:
                await self._after_data(ch)
        # no drain here: a flood being written on this channel must not stop its reading

    def _sends_data(self, key: ChannelKey) -> bool:
        flags = migrate_flags(key[0])
        return not self.destination and bool(flags & MigrateFlags.NEED_DATA_TRANSFER)

    # ---------------------------------------------------------------- acts

    def main(self) -> ServerChannel:
        return self.channels[MAIN]

    async def begin(self, dst: DstInfo, *, seamless: bool = True) -> float:
        """MIGRATE_BEGIN_SEAMLESS (or BEGIN) on MAIN; the monotonic time it was sent."""
        main = self.main()
        main.send(MainMigrateBeginSeamless(dst, 1) if seamless else MainMigrateBegin(dst))
        await main.drain()
        return time.monotonic()

    async def answer(self, timeout: float) -> tuple[float, str]:
        """The client's answer to BEGIN: (when, CONNECTED_SEAMLESS/CONNECTED/CONNECT_ERROR)."""
        async with asyncio.timeout(timeout):
            return await self.answers.get()

    async def handover(self) -> None:
        """MIGRATE on every channel, MAIN last (the data follows each FLUSH_MARK)."""
        for key in sorted(self.channels, key=lambda k: k == MAIN):
            ch = self.channels[key]
            ch.send(Migrate(migrate_flags(key[0])))
            await ch.drain()

    async def switch_host(self, dst: DstInfo) -> None:
        main = self.main()
        main.send(MainMigrateSwitchHost(dst))
        await main.drain()

    async def cancel(self) -> None:
        main = self.main()
        main.send(MainMigrateCancel())
        await main.drain()

    async def ping(self, key: ChannelKey = MAIN, timeout: float = 5.0) -> float:
        """PING on ``key``; seconds until the client's PONG (the session still answers)."""
        ch = self.channels[key]
        while not self.pongs.empty():
            self.pongs.get_nowait()
        sent = time.monotonic()
        ch.send(Ping(7, 0, b""))
        await ch.drain()
        async with asyncio.timeout(timeout):
            return await self.pongs.get() - sent
