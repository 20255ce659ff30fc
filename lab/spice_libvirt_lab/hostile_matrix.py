"""The hostile-server matrix: every client phase against a server that misbehaves.

Each :class:`Case` builds one or more :class:`~spice_libvirt_lab.fake_spice.FakeSpiceServer`
on loopback, lets ``spice-libvirt watch`` (the embedded client, as a user runs it) connect,
and commits one hostile act in one phase on one channel: an oversized, truncated, unknown or
out-of-phase message, a flood, a migration to a destination that never answers, refuses or
speaks garbage, an oversized MIGRATE_DATA. :func:`run_case` measures what the client did:

* a case the protocol cannot survive must end the client with **one** line on stderr naming
  the first real error, and the documented exit code -- no follow-on error, no traceback,
  no "exception was never retrieved";
* a case it can survive must leave the session up (the server's PING is answered after the
  act) and, for a destination that cannot be linked, the source must get
  MIGRATE_CONNECT_ERROR inside spice-server's 10 s window;
* either way within :data:`SETTLE_LIMIT_S` of the act, and the client process's peak RSS
  (``ru_maxrss`` of the child) under :data:`RSS_LIMIT_MB`.

The rows feed ``tests/test_spice_hostile_matrix.py`` and ``benchmarks/bench_hostile.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.spice.constants import MAIN_MAX_BODY, ChannelType
from spice_libvirt.spice.framing import DEFAULT_MAX_BODY
from spice_libvirt.spice.messages import (
    DstInfo,
    MainChannelsList,
    MainInit,
    MainMigrateEnd,
    MainMouseMode,
    Migrate,
    MigrateData,
    Notify,
    Ping,
    PortInit,
    SetAck,
    VmcData,
)
from spice_libvirt.spice.options import RECEIVE_BUDGET, SERVER_MIGRATE_WINDOW
from spice_libvirt_lab.fake_spice import (
    MAIN,
    ChannelKey,
    FakeSpiceServer,
    ServerChannel,
    Takeover,
    frame,
    header_only,
    link_reply,
    raw_frame,
)
from spice_libvirt_lab.measured_cli import HWM_ENV

#: a hostile act must be settled (the client ended, or its session shown alive) within this
SETTLE_LIMIT_S = 10.0
#: the client process's peak resident set, whatever the server does (MB = 10^6 bytes)
RSS_LIMIT_MB = 100.0

DISPLAY: ChannelKey = (ChannelType.DISPLAY, 0)
INPUTS: ChannelKey = (ChannelType.INPUTS, 0)
CURSOR: ChannelKey = (ChannelType.CURSOR, 0)
#: a message type no channel knows
UNKNOWN_TYPE = 999

Phase = Literal["set-up", "session", "pre-link", "hand-over", "after the switch", "switch-host"]


@dataclass(frozen=True)
class Expect:
    """What the client must do: survive (``kept``) or end with ``exit_code`` and a line
    containing ``reason``. ``answer``: the source must get this reply to MIGRATE_BEGIN."""

    kept: bool
    exit_code: int = 0
    reason: str = ""
    answer: str | None = None


def ends(code: ExitCode, reason: str) -> Expect:
    return Expect(False, int(code), reason)


KEPT = Expect(True)
CONNECT_ERROR = Expect(True, answer="MIGRATE_CONNECT_ERROR")


@dataclass
class Scenario:
    """The servers of one case and its act. ``act`` returns the monotonic time of the act;
    ``evidence`` (kept cases) the time the session was shown alive after it."""

    source: FakeSpiceServer
    others: list[FakeSpiceServer] = field(default_factory=list)
    act: Callable[[Scenario], Awaitable[float]] | None = None
    #: extra closers (raw listeners, sockets)
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: what the act handed the destination, e.g. a refused port
    dst: DstInfo | None = None
    #: the PING that shows the session alive: on which channel, how long after the act
    evidence_key: ChannelKey = MAIN
    ping_after: float = 0.0

    async def start(self) -> None:
        await self.source.start()
        for other in self.others:
            await other.start()

    async def close(self) -> None:
        for server in (self.source, *self.others):
            await server.close()
        for closer in self.cleanup:
            await closer()


@dataclass(frozen=True)
class Case:
    name: str
    phase: Phase
    channel: str
    what: str
    expect: Expect
    build: Callable[[], Awaitable[Scenario]]


class Row(BaseModel):
    """One case's measurement (a benchmark row, a test's evidence)."""

    case: str
    phase: str
    channel: str
    what: str
    expected: str
    exit_code: int | None
    stderr_lines: list[str]
    settle_s: float | None
    peak_rss_mb: float
    kept: bool
    answer: str | None = None
    answer_after_s: float | None = None
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- raw peers


async def _hold_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A peer that accepts and never says a word (it reads until the client gives up)."""
    with contextlib.suppress(ConnectionError):
        await reader.read()


def _says(data: bytes, *, then_close: bool = False) -> Takeover:
    async def takeover(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            if not then_close:
                await reader.read()

    return takeover


def _links_then(data: bytes) -> Takeover:
    """A proper link, then ``data``, then the connection closed."""

    async def takeover(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(link_reply(MAIN))
        await writer.drain()
        await reader.readexactly(4 + 128)
        writer.write(struct.pack("<I", 0) + data)
        await writer.drain()
        writer.close()

    return takeover


def refused_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dst(server: FakeSpiceServer) -> DstInfo:
    return DstInfo("127.0.0.1", server.port, None)


# --------------------------------------------------------------------------- acts


def _on(
    key: ChannelKey, data: bytes, *, close: bool = False
) -> Callable[[Scenario], Awaitable[float]]:
    """Write ``data`` on the source's channel ``key`` (and close it)."""

    async def act(sc: Scenario) -> float:
        at = time.monotonic()
        await _write(sc.source.channels[key], data, close=close)
        return at

    return act


async def _write(ch: ServerChannel, data: bytes, *, close: bool) -> None:
    ch.send_raw(data)
    await ch.drain()
    if close:
        ch.close()


def _flood(
    key: ChannelKey, data: bytes, seconds: float = 3.0, *, read: bool = True
) -> Callable[[Scenario], Awaitable[float]]:
    """``data`` repeated on ``key`` for ``seconds``, as fast as the client takes it, in the
    background (the session's PING is sent meanwhile); ``read=False``: the client's replies
    on that channel are never read."""

    async def act(sc: Scenario) -> float:
        ch = sc.source.channels[key]
        if not read:
            ch.stop_reading()
        chunk = data * max(1, (1 << 20) // len(data))
        until = time.monotonic() + seconds

        async def pour() -> None:
            with contextlib.suppress(ConnectionError):
                while not ch.writer.is_closing() and time.monotonic() < until:
                    ch.writer.write(chunk)
                    await ch.writer.drain()

        sc.cleanup.append(_cancel(asyncio.create_task(pour())))
        sc.ping_after = 1.0
        if key == MAIN:
            sc.evidence_key = INPUTS  # MAIN's own PING would queue behind the flood
        return time.monotonic()

    return act


def _cancel(task: asyncio.Task[None]) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task

    return close


def _begin(seamless: bool = True) -> Callable[[Scenario], Awaitable[float]]:
    async def act(sc: Scenario) -> float:
        assert sc.dst is not None
        return await sc.source.begin(sc.dst, seamless=seamless)

    return act


def _migrate() -> Callable[[Scenario], Awaitable[float]]:
    """BEGIN_SEAMLESS to the first other server, the client's answer, then the hand-over:
    the hostile part is in the servers' ``migrate_data``/``after_data``."""

    async def act(sc: Scenario) -> float:
        assert sc.dst is not None
        await sc.source.begin(sc.dst)
        _, answer = await sc.source.answer(SERVER_MIGRATE_WINDOW)
        if answer != "MIGRATE_CONNECTED_SEAMLESS":
            raise AssertionError(f"the client answered {answer}")
        at = time.monotonic()
        await sc.source.handover()
        return at

    return act


def _switch_host() -> Callable[[Scenario], Awaitable[float]]:
    async def act(sc: Scenario) -> float:
        assert sc.dst is not None
        at = time.monotonic()
        await sc.source.switch_host(sc.dst)
        return at

    return act


def _begin_flood(count: int) -> Callable[[Scenario], Awaitable[float]]:
    async def act(sc: Scenario) -> float:
        assert sc.dst is not None
        at = time.monotonic()
        for _ in range(count):
            await sc.source.begin(sc.dst)
        return at

    return act


# --------------------------------------------------------------------------- builders


def _source(**kwargs: object) -> Callable[[], Awaitable[Scenario]]:
    async def build() -> Scenario:
        return Scenario(FakeSpiceServer(**kwargs))  # type: ignore[arg-type]

    return build


def _with_act(
    act: Callable[[Scenario], Awaitable[float]], **kwargs: object
) -> Callable[[], Awaitable[Scenario]]:
    async def build() -> Scenario:
        return Scenario(FakeSpiceServer(**kwargs), act=act)  # type: ignore[arg-type]

    return build


def _to_destination(
    act: Callable[[Scenario], Awaitable[float]],
    *,
    dst: Callable[[], FakeSpiceServer] | None = None,
    refused: bool = False,
    **source: object,
) -> Callable[[], Awaitable[Scenario]]:
    """A source and a destination (a FakeSpiceServer, or a refused port)."""

    async def build() -> Scenario:
        sc = Scenario(FakeSpiceServer(**source), act=act)  # type: ignore[arg-type]
        if refused:
            sc.dst = DstInfo("127.0.0.1", refused_port(), None)
        else:
            server = dst() if dst is not None else FakeSpiceServer(destination=True)
            sc.others.append(server)
        return sc

    return build


def _takes_over(
    takeover: Takeover, only: ChannelKey | None = None
) -> Callable[[], FakeSpiceServer]:
    """A destination whose links (or only ``only``'s) are ``takeover``'s."""

    def make() -> FakeSpiceServer:
        return FakeSpiceServer(
            destination=True,
            takeover=lambda key: takeover if only is None or key == only else None,
        )

    return make


def _greets(key: ChannelKey, data: bytes) -> dict[str, object]:
    return {"greeting": lambda k: data if k == key else None}


def _never(server: list[FakeSpiceServer]) -> Callable[[ServerChannel], Awaitable[None]]:
    """A destination that never answers DO_SEAMLESS (until the server closes)."""

    async def wait(ch: ServerChannel) -> None:
        await server[0].closing.wait()

    return wait


def _silent_destination() -> FakeSpiceServer:
    box: list[FakeSpiceServer] = []
    box.append(FakeSpiceServer(destination=True, seamless_answer=_never(box)))
    return box[0]


async def _oversized_answer(ch: ServerChannel) -> None:
    ch.send_raw(header_only(UNKNOWN_TYPE, MAIN_MAX_BODY + 1) + bytes(4096))


def _after_swap(
    data: bytes, key: ChannelKey = DISPLAY
) -> Callable[[ServerChannel], Awaitable[None]]:
    async def after(ch: ServerChannel) -> None:
        if ch.key == key:
            ch.send_raw(data)
            await ch.drain()

    return after


def _migration_frame(
    key: ChannelKey, data: bytes, *, close: bool = False
) -> Callable[[ServerChannel], Awaitable[bool]]:
    """MIGRATE_DATA on ``key`` replaced by ``data`` (and the channel closed after it)."""

    async def send(ch: ServerChannel) -> bool:
        if ch.key != key:
            return False
        await _write(ch, data, close=close)
        return True

    return send


def _many_displays(count: int) -> tuple[ChannelKey, ...]:
    return tuple((ChannelType.DISPLAY, i) for i in range(count))


def _unfinished_everywhere(count: int, each: int) -> Callable[[Scenario], Awaitable[float]]:
    """On ``count`` display channels, a message of the largest allowed size, begun with
    ``each`` bytes and never finished: the session's budget, not a channel's, is hit."""

    async def act(sc: Scenario) -> float:
        at = time.monotonic()
        for key in _many_displays(count):
            ch = sc.source.channels[key]
            ch.send_raw(header_only(UNKNOWN_TYPE, DEFAULT_MAX_BODY) + bytes(each))
        for key in _many_displays(count):
            await sc.source.channels[key].drain()
        return at

    return act


def _ports(count: int) -> tuple[ChannelKey, ...]:
    return tuple((ChannelType.PORT, i) for i in range(count))


def _port_flood(count: int, total: int) -> Callable[[Scenario], Awaitable[float]]:
    """``count`` port channels announce themselves and stream ``total`` bytes each into
    ports the client never reads."""

    async def act(sc: Scenario) -> float:
        at = time.monotonic()
        chunk = frame(VmcData(bytes(60_000)))
        for i, key in enumerate(_ports(count)):
            sc.source.channels[key].send(PortInit(f"org.example.port{i}", True))
        for _ in range(total // 60_000):
            for key in _ports(count):
                sc.source.channels[key].send_raw(chunk)
            for key in _ports(count):
                await sc.source.channels[key].drain()
        return at

    return act


MIB = 1 << 20
HUGE = 1 << 30
LIST_4M = struct.pack("<HI", MainChannelsList.TYPE, 4 + 2 * 4_000_000) + struct.pack(
    "<I", 4_000_000
)
TRUNCATED_INIT = raw_frame(MainInit.TYPE, bytes(5))


def cases() -> list[Case]:
    """The matrix (names are stable: benchmark rows and tests refer to them)."""
    protocol, closed = ExitCode.PROTOCOL, ExitCode.UNREACHABLE
    displays, ports = 40, 16
    each = (RECEIVE_BUDGET // 24) + 1  # 40 x this passes the session's budget
    return [
        # -- set-up: before the session is up (the act is the server's first words)
        Case("init-oversized", "set-up", "main", "oversized", ends(protocol, "announces"),
             _source(**_greets(MAIN, header_only(MainInit.TYPE, HUGE) + bytes(MIB)))),
        Case("init-truncated-body", "set-up", "main", "truncated", ends(protocol, "INIT needs"),
             _source(**_greets(MAIN, TRUNCATED_INIT))),
        Case("init-truncated-frame", "set-up", "main", "truncated",
             ends(closed, "closed the connection"),
             _source(takeover=lambda k: _links_then(
                 header_only(MainInit.TYPE, 40) + bytes(10)) if k == MAIN else None)),
        Case("init-stalled", "set-up", "main", "truncated, never finished",
             ends(closed, "not established"),
             _source(**_greets(MAIN, header_only(MainInit.TYPE, 40) + bytes(10)))),
        Case("init-unknown-first", "set-up", "main", "unknown", KEPT,
             _source(**_greets(MAIN, raw_frame(UNKNOWN_TYPE, bytes(64)) + frame(MainInit(0xABCD, 1, 3, 2, 0, 10, 0, 0))))),
        Case("init-out-of-phase", "set-up", "main", "out-of-phase",
             ends(protocol, "MIGRATE_END out of order"),
             _source(**_greets(MAIN, frame(MainMigrateEnd())))),
        Case("channels-list-4M", "set-up", "main", "flood (CHANNELS_LIST)",
             ends(protocol, "announces 8000004 bytes"),
             _source(channels_list=LIST_4M + bytes([2, 0]) * 200_000)),
        Case("display-link-garbage", "set-up", "display", "garbage link",
             ends(protocol, "not a SPICE server"),
             _source(takeover=lambda k: _says(b"HTTP/1.1 400 Bad Request\r\n\r\n") if k == DISPLAY else None)),
        Case("display-greeting-oversized", "set-up", "display", "oversized",
             ends(protocol, "announces"),
             _source(**_greets(DISPLAY, header_only(UNKNOWN_TYPE, HUGE) + bytes(MIB)))),
        # -- session: linked and idle
        Case("main-oversized", "session", "main", "oversized", ends(protocol, "main:0"),
             _with_act(_on(MAIN, header_only(UNKNOWN_TYPE, MAIN_MAX_BODY + 1) + bytes(MIB)))),
        Case("display-oversized", "session", "display", "oversized", ends(protocol, "display:0"),
             _with_act(_on(DISPLAY, header_only(UNKNOWN_TYPE, DEFAULT_MAX_BODY + 1) + bytes(MIB)))),
        Case("main-truncated-body", "session", "main", "truncated",
             ends(protocol, "MOUSE_MODE needs"),
             _with_act(_on(MAIN, raw_frame(MainMouseMode.TYPE, bytes(2))))),
        Case("inputs-truncated-body", "session", "inputs", "truncated",
             ends(protocol, "SET_ACK needs"),
             _with_act(_on(INPUTS, raw_frame(SetAck.TYPE, bytes(3))))),
        Case("display-truncated-frame", "session", "display", "truncated",
             ends(closed, "display:0"),
             _with_act(_on(DISPLAY, header_only(UNKNOWN_TYPE, 4 * MIB) + bytes(MIB), close=True))),
        Case("main-unknown", "session", "main", "unknown", KEPT,
             _with_act(_on(MAIN, raw_frame(UNKNOWN_TYPE, bytes(1000))))),
        Case("cursor-unknown", "session", "cursor", "unknown", KEPT,
             _with_act(_on(CURSOR, raw_frame(UNKNOWN_TYPE, bytes(1000))))),
        Case("display-migrate-out-of-phase", "session", "display", "out-of-phase",
             ends(protocol, "MIGRATE out of order"),
             _with_act(_on(DISPLAY, frame(Migrate(3))))),
        Case("main-migrate-end-out-of-phase", "session", "main", "out-of-phase",
             ends(protocol, "MIGRATE_END out of order"),
             _with_act(_on(MAIN, frame(MainMigrateEnd())))),
        Case("inputs-migrate-data-unasked", "session", "inputs", "out-of-phase", KEPT,
             _with_act(_on(INPUTS, raw_frame(MigrateData.TYPE, b"ICMD" + bytes(20))))),
        Case("ping-flood", "session", "main", "flood (pings)", KEPT,
             _with_act(_flood(MAIN, frame(Ping(1, 0, bytes(64)))))),
        Case("ping-flood-unread", "session", "display", "flood (pings), replies never read",
             KEPT, _with_act(_flood(DISPLAY, frame(Ping(1, 0, b"")), read=False))),
        Case("ack-flood", "session", "display", "flood (SET_ACK window 1)", KEPT,
             _with_act(_flood(DISPLAY, frame(SetAck(1, 1))))),
        Case("ack-window-flood", "session", "cursor", "flood (ACK every message)", KEPT,
             _with_act(_flood(CURSOR, frame(SetAck(1, 1)) + raw_frame(UNKNOWN_TYPE, bytes(8)) * 50))),
        Case("notify-flood", "session", "main", "flood (NOTIFY)", KEPT,
             _with_act(_flood(MAIN, frame(Notify(0, 0, 0, 0, "x" * 4000))))),
        Case("display-data-flood", "session", "display", "flood (display data)", KEPT,
             _with_act(_flood(DISPLAY, raw_frame(UNKNOWN_TYPE, bytes(MIB))))),
        Case("display-largest-messages", "session", "display", "flood (largest messages)", KEPT,
             _with_act(_flood(DISPLAY, raw_frame(UNKNOWN_TYPE, bytes(DEFAULT_MAX_BODY))))),
        Case("unfinished-on-40-channels", "session", f"{displays} displays",
             "oversized in total", ends(protocol, "unfinished messages"),
             _with_act(_unfinished_everywhere(displays, each), channels=_many_displays(displays))),
        Case("port-flood", "session", f"{ports} ports", "flood (unread ports)", KEPT,
             _with_act(_port_flood(ports, 16 * MIB), channels=_ports(ports))),
        # -- pre-link: MIGRATE_BEGIN(_SEAMLESS) to a destination that cannot be linked
        Case("dst-never-answers", "pre-link", "destination", "never answers", CONNECT_ERROR,
             _to_destination(_begin(), dst=_takes_over(_hold_open))),
        Case("dst-refuses", "pre-link", "destination", "refuses", CONNECT_ERROR,
             _to_destination(_begin(), refused=True)),
        Case("dst-refuses-semi", "pre-link", "destination", "refuses (MIGRATE_BEGIN)",
             CONNECT_ERROR, _to_destination(_begin(seamless=False), refused=True)),
        Case("dst-garbage", "pre-link", "destination", "garbage", CONNECT_ERROR,
             _to_destination(_begin(), dst=_takes_over(_says(b"SSH-2.0-OpenSSH_9.2\r\n")))),
        Case("dst-truncated-reply", "pre-link", "destination", "truncated", CONNECT_ERROR,
             _to_destination(_begin(), dst=_takes_over(_says(link_reply(MAIN)[:100], then_close=True)))),
        Case("dst-display-never-answers", "pre-link", "destination display", "never answers",
             CONNECT_ERROR, _to_destination(_begin(), dst=_takes_over(_hold_open, DISPLAY))),
        Case("dst-no-seamless-answer", "pre-link", "destination main", "never answers",
             CONNECT_ERROR,
             _to_destination(_begin(), dst=_silent_destination)),
        Case("dst-oversized-answer", "pre-link", "destination main", "oversized",
             CONNECT_ERROR,
             _to_destination(_begin(), dst=lambda: FakeSpiceServer(destination=True, seamless_answer=_oversized_answer))),
        Case("begin-flood", "pre-link", "main", "flood (MIGRATE_BEGIN_SEAMLESS)", CONNECT_ERROR,
             _to_destination(_begin_flood(500), refused=True)),
        # -- hand-over: the source's MIGRATE_DATA
        Case("migrate-data-oversized", "hand-over", "display", "oversized MIGRATE_DATA",
             ends(protocol, "announces"),
             _to_destination(_migrate(), migrate_data=_migration_frame(
                 DISPLAY, header_only(MigrateData.TYPE, DEFAULT_MAX_BODY + 1) + bytes(MIB)))),
        Case("main-migrate-data-oversized", "hand-over", "main", "oversized MIGRATE_DATA",
             ends(protocol, "announces"),
             _to_destination(_migrate(), migrate_data=_migration_frame(
                 MAIN, header_only(MigrateData.TYPE, MAIN_MAX_BODY + 1) + bytes(MIB)))),
        Case("migrate-data-replaced", "hand-over", "inputs", "out-of-phase",
             ends(protocol, "expected MIGRATE_DATA"),
             _to_destination(_migrate(), migrate_data=_migration_frame(INPUTS, frame(Ping(1, 0, b""))))),
        Case("migrate-data-truncated", "hand-over", "display", "truncated",
             ends(closed, "display:0"),
             _to_destination(_migrate(), migrate_data=_migration_frame(
                 DISPLAY, header_only(MigrateData.TYPE, 4 * MIB) + bytes(1000), close=True))),
        # -- after the switch: the destination is the one that misbehaves
        Case("dst-oversized-after-swap", "after the switch", "destination display", "oversized",
             ends(protocol, "display:0"),
             _to_destination(_migrate(), dst=lambda: FakeSpiceServer(
                 destination=True,
                 after_data=_after_swap(header_only(UNKNOWN_TYPE, DEFAULT_MAX_BODY + 1) + bytes(MIB))))),
        # -- switch-host to a destination that never answers
        Case("switch-host-never-answers", "switch-host", "destination", "never answers",
             ends(closed, "session lost in the switch-host"),
             _to_destination(_switch_host(), dst=_takes_over(_hold_open))),
        Case("switch-host-refused", "switch-host", "destination", "refuses",
             ends(closed, "session lost in the switch-host"),
             _to_destination(_switch_host(), refused=True)),
    ]  # fmt: skip


def case(name: str) -> Case:
    found = [c for c in cases() if c.name == name]
    if not found:
        raise KeyError(name)
    return found[0]


# --------------------------------------------------------------------------- running


def client_argv(port: int) -> list[str]:
    """``spice-libvirt watch`` against the fake source, as a user would run it (through
    :mod:`~spice_libvirt_lab.measured_cli`, which writes down its peak memory)."""
    return [
        sys.executable,
        "-m",
        "spice_libvirt_lab.measured_cli",
        "watch",
        f"spice://127.0.0.1:{port}",
        "--stream-port",
        "",
    ]


async def _lines(stream: asyncio.StreamReader) -> tuple[float | None, list[str]]:
    """Every non-empty line of ``stream`` until EOF, and when the first one came."""
    first: float | None = None
    lines: list[str] = []
    while raw := await stream.readline():
        if line := raw.decode(errors="replace").rstrip("\n"):
            first = first or time.monotonic()
            lines.append(line)
    return first, lines


async def _first_session(server: FakeSpiceServer, exited: asyncio.Future[int]) -> bool:
    """The client linked every channel the server lists and the channels greeted it back:
    its session is up (or it exited first: False)."""
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline and not exited.done():
        if server.session_up.is_set():
            await asyncio.sleep(0.2)  # the client's own set-up ends with the greetings
            return not exited.done()
        await asyncio.sleep(0.02)
    return False


async def run_case(c: Case) -> Row:
    """Run one case against a fresh ``watch`` process; the measured row."""
    problems: list[str] = []
    sc = await c.build()
    await sc.start()
    if sc.dst is None and sc.others:
        sc.dst = _dst(sc.others[0])
    with tempfile.TemporaryDirectory(prefix="sl-hostile-") as tmp:
        hwm = Path(tmp) / "hwm"
        env = {**os.environ, HWM_ENV: str(hwm)}
        proc = await asyncio.create_subprocess_exec(
            *client_argv(sc.source.port),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )
        act_at: float | None = None
        answer: tuple[float, str] | None = None
        evidence_at: float | None = None
        exited = asyncio.ensure_future(proc.wait())
        assert proc.stderr is not None
        said = asyncio.ensure_future(_lines(proc.stderr))
        try:
            if c.phase != "set-up" or c.expect.kept:
                if not await _first_session(sc.source, exited):
                    problems.append("the client did not come up")
                elif sc.act is not None:
                    act_at = await sc.act(sc)
            if c.expect.answer is not None:
                with contextlib.suppress(TimeoutError):
                    answer = await sc.source.answer(SERVER_MIGRATE_WINDOW + 5)
            if c.expect.kept and not exited.done():
                await asyncio.sleep(sc.ping_after)
                with contextlib.suppress(TimeoutError, KeyError):
                    await sc.source.ping(sc.evidence_key, timeout=SETTLE_LIMIT_S + 5)
                    evidence_at = time.monotonic()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SETTLE_LIMIT_S + 10):
                        await asyncio.shield(exited)
                evidence_at = time.monotonic() if exited.done() else None
                if exited.done():  # the outcome is told by its line (the exit follows)
                    evidence_at = (await said)[0] or evidence_at
        finally:
            if not exited.done():
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(10):
                        await asyncio.shield(exited)
                except TimeoutError:
                    proc.kill()
            code = await exited
            _, stderr = await said
            await sc.close()
        rss_mb = int(hwm.read_text() or 0) * 1024 / 1e6 if hwm.exists() else -1.0
    if c.phase == "set-up":  # the server's first words are the act
        act_at = sc.source.first_link_at
    started = act_at if act_at is not None else evidence_at
    settle = None
    if evidence_at is not None and started is not None:
        settle = round(evidence_at - started, 3)
    expect = c.expect
    if settle is None or settle > SETTLE_LIMIT_S:
        problems.append(f"not settled within {SETTLE_LIMIT_S:g} s of the act ({settle})")
    if not 0 < rss_mb <= RSS_LIMIT_MB:
        problems.append(f"peak RSS {rss_mb:.1f} MB, not within {RSS_LIMIT_MB:g} MB")
    if expect.kept:
        # watch's own verdict: 8 once a migration (cancelled, superseded) was not seamless
        if code not in (0, int(ExitCode.NOT_SEAMLESS)) or stderr:
            problems.append(f"session not kept: exit {code}, stderr {stderr}")
    else:
        if code != expect.exit_code:
            problems.append(f"exit {code}, expected {expect.exit_code}")
        if len(stderr) != 1 or expect.reason not in stderr[0]:
            problems.append(f"expected one line naming {expect.reason!r}, got {stderr}")
    answer_after = None
    if expect.answer is not None:
        if answer is None or answer[1] != expect.answer:
            problems.append(f"the source got {answer}, expected {expect.answer}")
        else:
            answer_after = round(answer[0] - (started or answer[0]), 3)
            if answer_after > SERVER_MIGRATE_WINDOW:
                problems.append(f"{expect.answer} after {answer_after} s, past the server's window")
    return Row(
        case=c.name,
        phase=c.phase,
        channel=c.channel,
        what=c.what,
        expected="kept" if expect.kept else f"exit {expect.exit_code}",
        exit_code=code,
        stderr_lines=stderr,
        settle_s=settle,
        peak_rss_mb=round(rss_mb, 1),
        kept=code in (0, int(ExitCode.NOT_SEAMLESS)) and not stderr,
        answer=answer[1] if answer else None,
        answer_after_s=answer_after,
        problems=problems,
    )


async def run_all(selected: list[Case], parallel: int = 3) -> list[Row]:
    """Every case, ``parallel`` at a time (each its own client process and servers)."""
    gate = asyncio.Semaphore(parallel)

    async def one(c: Case) -> Row:
        async with gate:
            return await run_case(c)

    return list(await asyncio.gather(*(one(c) for c in selected)))


__all__ = ["Case", "Expect", "Row", "case", "cases", "run_all", "run_case"]
