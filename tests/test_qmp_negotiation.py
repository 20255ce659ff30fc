"""QMP negotiation when QEMU sends an event before its reply to ``qmp_capabilities``.

QEMU 7.2 leaves negotiation mode inside the command and writes the reply later, so an
event raised in between reaches the new session first (measured on real QEMU by
``benchmarks/bench_qmp_negotiation.py``; docs/findings.md). A stand-in QMP server on a unix
socket plays exactly that order here -- the real QEMU only does it now and then, under
load -- and the real QEMU is then negotiated with while a SPICE client comes and goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, QMPClient
from qemu.qmp.protocol import ConnectError

from spice_libvirt.qemu.qmp import NegotiatingClient, QMPConnectError, QMPConnection
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt_lab.qemu_process import QemuGroup

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
        "capabilities": [],
    }
}
EVENT = {
    "event": "SPICE_CONNECTED",
    "data": {"server": {}, "client": {}},
    "timestamp": {"seconds": 1, "microseconds": 2},
}


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


@contextlib.asynccontextmanager
async def stand_in_qmp(
    path: Path,
    replies: list[dict[str, Any]],
    stale: tuple[dict[str, Any], ...] = (),
    first_replies: list[dict[str, Any]] | None = None,
) -> AsyncIterator[None]:
    """A stand-in for QEMU's QMP socket (not QEMU): sends ``stale`` (what was in flight for
    a previous client), greets, answers ``qmp_capabilities`` with ``replies`` in that order
    (the first session with ``first_replies`` if given), then answers every command with
    an empty return."""
    sessions = 0

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sessions
        sessions += 1
        answers = first_replies if first_replies is not None and sessions == 1 else replies
        for message in stale:
            _send(writer, message)
        _send(writer, GREETING)
        decoder, buffer = json.JSONDecoder(), ""
        try:
            while chunk := await reader.read(4096):  # commands come without a newline
                buffer = (buffer + chunk.decode()).lstrip()
                while buffer:
                    try:
                        command, end = decoder.raw_decode(buffer)
                    except json.JSONDecodeError:
                        break  # the rest of it is still on the way
                    buffer = buffer[end:].lstrip()
                    if command["execute"] == "qmp_capabilities":
                        for reply in answers:
                            _send(writer, reply)
                    else:
                        _send(writer, {"return": {}, "id": command.get("id")})
                await writer.drain()
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()

    server = await asyncio.start_unix_server(session, path=str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


async def test_an_event_before_the_reply_is_delivered_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    async with stand_in_qmp(path, [EVENT, {"return": {}}]):
        # what qemu.qmp 0.0.6 alone makes of it: the event taken for the reply
        with pytest.raises(ConnectError, match="Negotiation failed"):
            await QMPClient("upstream").connect(str(path))
        client = NegotiatingClient("ours")
        listener = EventListener("SPICE_CONNECTED")
        with client.listen(listener):
            await client.connect(str(path))
            try:
                assert await client.execute("query-status") == {}
                event = await asyncio.wait_for(listener.get(), 1)
            finally:
                await client.disconnect()
        assert event["event"] == "SPICE_CONNECTED"


async def test_what_was_in_flight_for_the_previous_client_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    async with stand_in_qmp(path, [{"return": {}}], stale=({"return": {}}, EVENT)):
        with pytest.raises(ConnectError, match="Did not understand Greeting"):
            await QMPClient("upstream").connect(str(path))
        async with QMPConnection.open(path, timeout=2) as qmp:
            assert await qmp.execute("query-status") == {}


async def test_a_session_that_dies_as_it_is_established_is_tried_again(tmp_path: Path) -> None:
    """A reply without an id right after the negotiation (QEMU's answer to a previous
    client's command) ends qemu.qmp's session at once; the connection tries again."""
    path = tmp_path / "qmp.sock"
    stray = {"error": {"class": "CommandNotFound", "desc": "negotiation is already complete"}}
    first: list[dict[str, Any]] = [{"return": {}}, stray]
    async with (
        stand_in_qmp(path, [{"return": {}}], first_replies=first),
        QMPConnection.open(path, timeout=5) as qmp,
    ):
        assert await qmp.execute("query-status") == {}


async def test_a_refused_negotiation_is_still_a_connect_error(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    refused = {"error": {"class": "CommandNotFound", "desc": "no"}}
    async with stand_in_qmp(path, [EVENT, refused]):
        with pytest.raises(QMPConnectError, match="qmp_capabilities answered"):
            async with QMPConnection.open(path, timeout=0.5):
                pass


@pytest.mark.qemu
async def test_real_qemu_negotiates_while_a_spice_client_comes_and_goes(
    qemu_factory: QemuGroup,
) -> None:
    """Each QMP session is negotiated once, no retry, while SPICE events keep coming."""
    vm = await qemu_factory("negotiate")
    stop = threading.Event()

    def churn() -> None:
        async def loop() -> None:
            while not stop.is_set():
                client = SpiceClient(ClientOptions(host="127.0.0.1", port=vm.spice_port))
                try:
                    await client.connect(timeout=10)
                finally:
                    await client.close()

        asyncio.run(loop())

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        for _ in range(100):
            client = NegotiatingClient("negotiate")
            await client.connect(str(vm.qmp_path))
            await client.disconnect()
    finally:
        stop.set()
        await asyncio.to_thread(churner.join, 30)
    assert not churner.is_alive()
