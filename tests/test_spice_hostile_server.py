"""The asyncio link against a hostile in-test server on loopback: every failure is typed."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from spice_libvirt.errors import (
    AuthenticationError,
    ConnectError,
    LinkError,
    RemoteProtocolError,
)
from spice_libvirt.spice.constants import ChannelType, LinkErr
from spice_libvirt.spice.link import LinkMess
from spice_libvirt.spice.transport import open_link
from tests.spice_helpers import link_reply_bytes

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[[Behaviour], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(behaviour: Behaviour) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readexactly(16 + 18)  # the client's link request
                await behaviour(reader, writer)
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


async def link(port: int, timeout: float = 2.0) -> None:
    await open_link(
        "127.0.0.1", port, LinkMess(0, ChannelType.MAIN, 0), password=None, timeout=timeout
    )


def reply(data: bytes) -> Behaviour:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.2)

    return behaviour


async def test_bad_magic(hostile: Callable[[Behaviour], Awaitable[int]]) -> None:
    port = await hostile(reply(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    with pytest.raises(RemoteProtocolError, match="not a SPICE server"):
        await link(port)


async def test_version_mismatch(hostile: Callable[[Behaviour], Awaitable[int]]) -> None:
    port = await hostile(reply(b"REDQ" + struct.pack("<III", 1, 3, 4) + bytes(4)))
    with pytest.raises(RemoteProtocolError, match="version mismatch"):
        await link(port)


async def test_oversized_reply_size(hostile: Callable[[Behaviour], Awaitable[int]]) -> None:
    port = await hostile(reply(b"REDQ" + struct.pack("<III", 2, 2, 0x7FFFFFFF)))
    with pytest.raises(RemoteProtocolError, match="outside"):
        await link(port)


async def test_truncated_reply(hostile: Callable[[Behaviour], Awaitable[int]]) -> None:
    port = await hostile(reply(link_reply_bytes()[:100]))
    with pytest.raises(RemoteProtocolError, match="closed the connection during the link"):
        await link(port)


@pytest.mark.parametrize("code", [c for c in LinkErr if c != LinkErr.OK])
async def test_each_link_error_code(
    hostile: Callable[[Behaviour], Awaitable[int]], code: LinkErr
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(link_reply_bytes())
        await writer.drain()
        await reader.readexactly(128)  # no AUTH_SELECTION from this client: ticket only
        writer.write(struct.pack("<I", code))
        await writer.drain()
        await asyncio.sleep(0.2)

    port = await hostile(behaviour)
    expected = AuthenticationError if code == LinkErr.PERMISSION_DENIED else LinkError
    with pytest.raises(expected) as info:
        await link(port)
    assert info.value.code == code


async def test_peer_that_never_answers_times_out(
    hostile: Callable[[Behaviour], Awaitable[int]],
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    port = await hostile(silent)
    with pytest.raises(ConnectError, match=r"within 0\.3 s"):
        await link(port, timeout=0.3)


async def test_refused_port_is_a_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectError, match="cannot connect"):
        await link(port)
