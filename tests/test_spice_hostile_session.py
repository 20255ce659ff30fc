"""The whole client (not only the link) against a hostile loopback server that links MAIN
properly and then floods: a CHANNELS_LIST of 4 million entries, a huge
INIT, endless PINGs, a slow drip. The client must fail with its typed error, within its
deadline, and stay far under ~200 MB (Python heap peak and process RSS are both checked)."""

from __future__ import annotations

import asyncio
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from spice_libvirt.errors import ConnectError, RemoteProtocolError, SpiceLibvirtError
from spice_libvirt.spice.client import ClientOptions, PortStream, SpiceClient
from spice_libvirt.spice.constants import MAIN_MAX_BODY, CommonCap, MainCap
from spice_libvirt.spice.messages import MainChannelsList, MainInit, Message, Ping
from tests.spice_helpers import link_reply_bytes, server_frame

Flood = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMIT_BYTES = 200 * 1024 * 1024
INIT = MainInit(0xABCD, 1, 3, 2, 0, 10, 0, 0)
COMMON = frozenset({CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.AUTH_SPICE, CommonCap.MINI_HEADER})


async def _link_main(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The server side of a correct link: header, link message, reply, mechanism, ticket."""
    _magic, _major, _minor, size = struct.unpack("<4sIII", await reader.readexactly(16))
    await reader.readexactly(size)
    writer.write(link_reply_bytes(COMMON, frozenset({MainCap.SEMI_SEAMLESS_MIGRATE})))
    await writer.drain()
    await reader.readexactly(4 + 128)  # auth mechanism (AUTH_SELECTION on both sides), ticket
    writer.write(struct.pack("<I", 0))
    await writer.drain()


def frame(message: Message) -> bytes:
    return server_frame(message, mini=True)


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[[Flood], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(flood: Flood) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await _link_main(reader, writer)
                await flood(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _bounded_connect(
    port: int, deadline: float, **options: object
) -> tuple[BaseException | None, float, int, SpiceClient]:
    """connect() under ``deadline``; returns (error, seconds, heap peak, client)."""
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=port, **options))  # type: ignore[arg-type]
    rss_before = _rss()
    tracemalloc.start()
    started = time.monotonic()
    error: BaseException | None = None
    try:
        await client.connect(timeout=deadline)
    except SpiceLibvirtError as exc:
        error = exc
    finally:
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert _rss() - rss_before < LIMIT_BYTES
    assert peak < LIMIT_BYTES
    return error, elapsed, peak, client


async def _init_then(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(frame(INIT))
    await writer.drain()
    await reader.readexactly(6)  # ATTACH_CHANNELS (mini header, empty body)


async def test_four_million_entry_channels_list(
    hostile: Callable[[Flood], Awaitable[int]],
) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _init_then(reader, writer)
        count = 4_000_000  # an 8 MiB body, far under the generic frame limit
        writer.write(struct.pack("<HI", MainChannelsList.TYPE, 4 + 2 * count))
        writer.write(struct.pack("<I", count))
        for _ in range(count // 500_000):
            writer.write(bytes([2, 0]) * 500_000)
            await writer.drain()
        await asyncio.sleep(10)

    error, elapsed, peak, _ = await _bounded_connect(await hostile(flood), 5.0)
    assert isinstance(error, RemoteProtocolError), error
    assert f"more than the {MAIN_MAX_BODY} allowed" in str(error)
    assert elapsed < 5.0
    assert peak < 20 * 1024 * 1024


async def test_channels_list_with_too_many_distinct_channels(
    hostile: Callable[[Flood], Awaitable[int]],
) -> None:
    pairs = [(t, i) for t in range(2, 12) for i in range(30)]  # 300 distinct, 600 bytes

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _init_then(reader, writer)
        writer.write(frame(MainChannelsList(tuple(pairs))))
        await writer.drain()
        await asyncio.sleep(10)

    error, elapsed, _, _ = await _bounded_connect(await hostile(flood), 5.0)
    assert isinstance(error, RemoteProtocolError)
    assert "more than 256 distinct" in str(error)
    assert elapsed < 5.0


async def test_duplicated_channels_are_listed_once(
    hostile: Callable[[Flood], Awaitable[int]],
) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _init_then(reader, writer)
        count = 100_000  # 200 KB of two channels, under the main-message limit
        body = struct.pack("<I", count) + bytes([2, 0, 3, 0]) * (count // 2)
        writer.write(struct.pack("<HI", MainChannelsList.TYPE, len(body)) + body)
        await writer.drain()
        await asyncio.sleep(10)

    # link nothing after MAIN: what matters is what the client would link
    error, _, _, client = await _bounded_connect(
        await hostile(flood), 5.0, channel_types=frozenset()
    )
    try:
        assert error is None
        assert client.listed_channels == [(2, 0), (3, 0)]
        assert client.session_id == INIT.session_id
    finally:
        await client.close()


async def test_huge_init_is_refused_at_its_header(
    hostile: Callable[[Flood], Awaitable[int]],
) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(struct.pack("<HI", MainInit.TYPE, 1 << 30))  # 1 GiB announced
        for _ in range(64):
            writer.write(bytes(1 << 20))
            await writer.drain()
        await asyncio.sleep(10)

    error, elapsed, peak, _ = await _bounded_connect(await hostile(flood), 5.0)
    assert isinstance(error, RemoteProtocolError), error
    assert f"more than the {MAIN_MAX_BODY} allowed" in str(error)
    assert elapsed < 5.0
    assert peak < 20 * 1024 * 1024


async def test_endless_pings_cannot_hold_the_client(
    hostile: Callable[[Flood], Awaitable[int]],
) -> None:
    ping = frame(Ping(1, 0, bytes(200 * 1024)))  # big, but under the main-message limit

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # never INIT, never read the pongs
            writer.write(ping)
            await writer.drain()

    error, elapsed, _, _ = await _bounded_connect(await hostile(flood), 2.0)
    assert isinstance(error, ConnectError), error
    assert "not established in time" in str(error)
    assert elapsed < 2.0 + 4.0  # the deadline, plus the bounded close


async def test_slow_drip_cannot_hold_the_client(
    hostile: Callable[[Flood], Awaitable[int]],
) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for byte in frame(INIT):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    error, elapsed, _, _ = await _bounded_connect(await hostile(flood), 1.5)
    assert isinstance(error, ConnectError), error
    assert elapsed < 1.5 + 4.0


async def test_port_queue_is_bounded_in_bytes_and_chunks() -> None:
    stream = PortStream("p", max_bytes=4 * 1024 * 1024, max_chunks=64)
    for n in range(100):  # 100 MiB into a port nobody reads
        stream._feed(bytes([n]) * (1 << 20))
    assert stream.buffered == 4 * 1024 * 1024
    assert stream.dropped == 96
    assert (await stream.read(1))[0] == 96  # the newest data is kept, in order
    for _ in range(10_000):  # tiny chunks: bounded in count too
        stream._feed(b"x")
    assert len(stream._chunks) == 64
    assert stream.buffered <= 4 * 1024 * 1024
