"""The embedded client's one rule for failures: the first error wins.

In-process, against the loopback stand-in server of :mod:`spice_libvirt_lab.fake_spice`:
whatever breaks first is the error every wait raises, nothing after it is reported in its
place, and no task or future is left with an exception nobody retrieves. The bounds that
keep a hostile server from growing the client (the session's receive budget, the reply
rate, the gathered frame) are checked here on their own.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from spice_libvirt.errors import ConnectError, RemoteProtocolError, SpiceLibvirtError
from spice_libvirt.spice import messages as m
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.connection import REPLY_BURST, KeepAlive
from spice_libvirt.spice.constants import MAIN_MAX_BODY, ChannelType, channel_label
from spice_libvirt.spice.framing import FrameDecoder, ReceiveBudget
from spice_libvirt.spice.session import MAIN_KEY, ClientSession, Phase
from spice_libvirt_lab.fake_spice import (
    FakeSpiceServer,
    ServerChannel,
    frame,
    header_only,
    raw_frame,
)

DISPLAY = (2, 0)
INIT = m.MainInit(0xABCD, 1, 3, 2, 0, 10, 0, 0)


@pytest.fixture
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What asyncio would log as unhandled (a task or future exception nobody retrieved);
    collected after the test, with a garbage collection so that it is reported."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_event_loop_policy().get_event_loop()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    gc.collect()


async def _settle_gc(loop_errors: list[dict[str, Any]]) -> None:
    await asyncio.sleep(0.1)
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == [], [c.get("message") for c in loop_errors]


@pytest.fixture
async def servers() -> AsyncIterator[list[FakeSpiceServer]]:
    started: list[FakeSpiceServer] = []
    yield started
    for server in started:
        await server.close()


async def _serve(servers: list[FakeSpiceServer], **kwargs: Any) -> FakeSpiceServer:
    server = FakeSpiceServer(**kwargs)
    await server.start()
    servers.append(server)
    return server


def _client(port: int, **options: Any) -> SpiceClient:
    return SpiceClient(ClientOptions(host="127.0.0.1", port=port, **options))


async def test_init_then_oversized_list_is_one_error(
    servers: list[FakeSpiceServer], loop_errors: list[dict[str, Any]]
) -> None:
    """The issue's case: INIT, then a CHANNELS_LIST too big for MAIN in the same read. The
    client must not report a follow-on ("cannot send ATTACH_CHANNELS in state error")
    and leave the real reason in an unretrieved future."""
    greeting = frame(INIT) + header_only(m.MainChannelsList.TYPE, 8_000_004) + bytes(4096)
    server = await _serve(servers, greeting=lambda k: greeting if k == MAIN_KEY else None)
    client = _client(server.port)
    with pytest.raises(RemoteProtocolError, match="announces 8000004 bytes") as info:
        await client.connect()
    assert "main:0 (127.0.0.1:" in str(info.value)
    assert client.failure is info.value
    await _settle_gc(loop_errors)


async def test_every_channel_breaking_at_once_reports_the_first(
    servers: list[FakeSpiceServer], loop_errors: list[dict[str, Any]]
) -> None:
    server = await _serve(servers)
    client = _client(server.port)
    await client.connect()
    waiter = asyncio.create_task(client.next_migration(timeout=10))
    connected = asyncio.create_task(client.wait_migration_connected(timeout=10))
    await asyncio.sleep(0.05)
    broken = header_only(999, 1 << 30)
    for ch in server.channels.values():  # display first: dicts keep link order, MAIN first
        ch.send_raw(broken)
    for ch in server.channels.values():
        await ch.drain()
    with pytest.raises(RemoteProtocolError) as info:
        await waiter
    first = client.failure
    assert info.value is first
    with pytest.raises(RemoteProtocolError) as again:
        await connected
    assert again.value is first
    with pytest.raises(RemoteProtocolError) as third:
        await client.port_stream("anything", timeout=5)
    assert third.value is first
    await client.close()
    assert client.failure is first  # closing records nothing new
    await _settle_gc(loop_errors)


async def test_a_bug_in_a_task_is_the_session_failure_in_one_line(
    servers: list[FakeSpiceServer], loop_errors: list[dict[str, Any]]
) -> None:
    server = await _serve(servers)
    client = _client(server.port)
    await client.connect()

    async def broken() -> None:
        raise KeyError("no such channel")

    client._task(broken(), "broken")
    with pytest.raises(SpiceLibvirtError, match="internal error in the SPICE client: KeyError"):
        await client.next_migration(timeout=5)
    await client.close()
    await _settle_gc(loop_errors)


async def test_unanswered_destination_gets_connect_error_by_the_deadline(
    servers: list[FakeSpiceServer], loop_errors: list[dict[str, Any]]
) -> None:
    source = await _serve(servers)
    box: list[FakeSpiceServer] = []

    async def never(ch: ServerChannel) -> None:
        await box[0].closing.wait()

    box.append(await _serve(servers, destination=True, seamless_answer=never))
    client = _client(source.port, migrate_connect_timeout=0.5)
    await client.connect()
    sent = await source.begin(m.DstInfo("127.0.0.1", box[0].port, None))
    at, answer = await source.answer(5)
    assert answer == "MIGRATE_CONNECT_ERROR"
    assert 0.4 < at - sent < 2.0
    assert await client.wait_migration_connected(1) is None
    assert "no MIGRATE_DST_SEAMLESS_ACK/NACK within 0.5 s" in (client.last_link_error or "")
    assert await source.ping() < 1.0  # the session is kept
    await client.close()
    await _settle_gc(loop_errors)


async def test_failed_switch_host_hands_out_the_record_then_the_failure(
    servers: list[FakeSpiceServer], loop_errors: list[dict[str, Any]]
) -> None:
    source = await _serve(servers)
    client = _client(source.port)
    await client.connect()
    await source.switch_host(m.DstInfo("127.0.0.1", 9, None))  # the discard port: refused
    record = await client.next_migration(timeout=10)
    assert record.path == "lost"
    with pytest.raises(ConnectError, match="session lost in the switch-host"):
        await client.next_migration(timeout=10)
    await client.close()
    await _settle_gc(loop_errors)


# ------------------------------------------------------------------------- the bounds


def test_session_budget_is_one_bound_for_every_channel() -> None:
    budget = ReceiveBudget(1000)
    owners = [object() for _ in range(4)]
    for owner in owners[:3]:
        budget.report(owner, 300)
    budget.report(owners[0], 0)  # its message completed
    budget.report(owners[3], 400)  # 0 + 300 + 300 + 400: at the limit, not over
    assert budget.total == 1000
    with pytest.raises(RemoteProtocolError, match="1300 bytes of unfinished messages on 4"):
        budget.report(owners[0], 300)
    budget.forget(owners[3])
    assert budget.total == 900


def test_partial_frame_costs_what_was_received() -> None:
    decoder = FrameDecoder(mini=True, max_body=MAIN_MAX_BODY)
    decoder.feed(header_only(999, 200_000) + bytes(1000))
    for _ in range(9):
        decoder.feed(bytes(10_000))
    assert decoder.buffered == 6 + 1000 + 90_000
    assert decoder.next_raw() is None
    decoder.feed(bytes(200_000 - 91_000) + raw_frame(998, b"next"))
    first, second = decoder.next_raw(), decoder.next_raw()
    assert first is not None
    assert second is not None
    assert (first[1], len(first[2])) == (999, 200_000)
    assert (second[1], second[2]) == (998, b"next")
    assert decoder.buffered == 0


def test_oversized_header_is_judged_inside_a_gathered_frame() -> None:
    decoder = FrameDecoder(mini=True, max_body=100)
    decoder.feed(b"\x01\x00")  # half a header
    decoder.feed(b"\xff\xff\xff\x7f")  # the rest: 2 GiB announced
    with pytest.raises(RemoteProtocolError, match="more than the 100 allowed"):
        decoder.next_raw()


def test_ping_and_set_ack_floods_go_unanswered_beyond_the_rate() -> None:
    keep = KeepAlive()
    now = 100.0
    answered = sum(bool(keep.on_message(m.Ping(i, 0, b""), now)) for i in range(1000))
    assert answered == int(REPLY_BURST)
    assert keep.unanswered == 1000 - int(REPLY_BURST)
    assert keep.on_message(m.Ping(1, 0, b""), now + 1.0) == [m.Pong(1, 0)]  # refilled
    # the ACK window is not rate-limited: acks follow what the server sent
    keep = KeepAlive()
    keep.on_message(m.SetAck(1, 1), 0.0)
    assert all(keep.on_message(m.MainMultiMediaTime(1), 0.0) == [m.Ack()] for _ in range(500))


def test_source_lost_is_a_failure_unless_the_source_lets_us_go() -> None:
    s = ClientSession()
    s.session_up(7, [MAIN_KEY, DISPLAY], "src", tls=False)
    assert s.on_source_lost(DISPLAY, "closed", 0.0, closed=True) is False  # no migration
    s.on_begin(m.DstInfo("dst", 1, None), None, 0.0)
    s.on_dst_linked(1, MAIN_KEY, frozenset(), "d", 0.1)
    s.on_dst_linked(1, DISPLAY, frozenset(), "d", 0.1)
    s.on_migrate_end(0.2)
    assert s.phase is Phase.AWAIT_DST_INIT
    # semi-seamless, the VM moved: a channel the source closes is on its way out ...
    assert s.on_source_lost(DISPLAY, "closed", 0.3, closed=True) is True
    # ... but a protocol violation on it is not
    assert s.on_source_lost(DISPLAY, "oversized", 0.3, closed=False) is False


async def test_reader_yields_to_other_channels_during_a_flood(
    servers: list[FakeSpiceServer],
) -> None:
    server = await _serve(servers)
    client = _client(server.port)
    await client.connect()
    display = server.channels[DISPLAY]
    chunk = raw_frame(999, bytes(16)) * 20_000
    started = time.monotonic()
    for _ in range(20):
        display.send_raw(chunk)
    pong = asyncio.create_task(server.ping(MAIN_KEY))
    await display.drain()
    assert await pong < 5.0
    assert time.monotonic() - started < 30
    await client.close()


EVERY_CHANNEL = tuple(
    (int(t), 0) for t in ChannelType if t not in (ChannelType.MAIN, ChannelType.TUNNEL)
)


@pytest.mark.parametrize("key", EVERY_CHANNEL, ids=[channel_label(*k) for k in EVERY_CHANNEL])
async def test_every_channel_type_ends_in_its_first_error_or_keeps_the_session(
    servers: list[FakeSpiceServer], loop_errors: list[dict[str, Any]], key: tuple[int, int]
) -> None:
    """An unknown message on any channel is ignored; an oversized one is the session's one
    error, naming the channel."""
    server = await _serve(servers, channels=EVERY_CHANNEL)
    client = _client(server.port)
    await client.connect()
    ch = server.channels[key]
    ch.send_raw(raw_frame(999, bytes(100)))
    await ch.drain()
    assert await server.ping(MAIN_KEY) < 5.0
    ch.send_raw(header_only(999, 1 << 30))
    await ch.drain()
    with pytest.raises(RemoteProtocolError, match=f"{channel_label(*key)} .*announces") as info:
        await client.next_migration(timeout=5)
    assert client.failure is info.value
    await client.close()
    await _settle_gc(loop_errors)
