"""The client's migration machine without sockets: every legal path step by step, every
illegal (phase, event) refused with the local protocol error. Runs in milliseconds."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from spice_libvirt.errors import LocalProtocolError
from spice_libvirt.spice import actions as act
from spice_libvirt.spice.constants import ChannelType, MainCap, MigrateFlags
from spice_libvirt.spice.messages import (
    ClientMigrateData,
    DstInfo,
    MainClientMigrateEnd,
    MainMigrateConnected,
    MainMigrateConnectedSeamless,
    MainMigrateConnectError,
    MainMigrateDstDoSeamless,
    MigrateFlushMark,
)
from spice_libvirt.spice.session import (
    MAIN_KEY,
    SWITCH_DRAIN_TIMEOUT,
    TRANSITIONS,
    ClientSession,
    Ev,
    Phase,
)

DISPLAY = (ChannelType.DISPLAY, 0)
INPUTS = (ChannelType.INPUTS, 0)
CURSOR = (ChannelType.CURSOR, 0)
CHANNELS = [MAIN_KEY, DISPLAY, INPUTS, CURSOR]
LABELS = ["main:0", "display:0", "inputs:0", "cursor:0"]
DST = DstInfo("10.0.0.9", 5901, None)
TLS_DST = DstInfo("10.0.0.9", 5901, 5902, "CN=dst")
SEAMLESS_CAPS = frozenset({MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE})
MAIN_DATA = b"MNMD" + (1).to_bytes(4, "little") + bytes(60)
DISPLAY_DATA = b"DCMD" + (1).to_bytes(4, "little") + bytes(8)
SID = 0x1234
TARGET = act.LinkTarget("10.0.0.9", 5901, None, None)


def session(*, tls_required: bool = False, tls: bool = False) -> ClientSession:
    s = ClientSession(tls_required=tls_required, host_subject="CN=src", link_timeout=7.0)
    s.session_up(SID, CHANNELS, "10.0.0.1", tls=tls)
    return s


def phase_of(s: ClientSession) -> Phase:
    """The phase, read through a call (mypy would narrow ``s.phase`` across calls)."""
    return s.phase


def steps(s: ClientSession | act.Finished) -> list[tuple[str, str, str, str]]:
    record = s.record if isinstance(s, act.Finished) else s.migration.record  # type: ignore[union-attr]
    return [(x.channel, x.side, x.direction, x.message) for x in record.steps]


def finished(actions: list[act.Action]) -> act.Finished:
    done = [a for a in actions if isinstance(a, act.Finished)]
    assert len(done) == 1
    return done[0]


# ----------------------------------------------------------------------------- paths


def prelink(s: ClientSession, *, seamless: bool = True, ack: bool = True) -> None:
    """BEGIN(_SEAMLESS) -> pre-link MAIN and the rest -> (ACK/NACK) -> CONNECTED*."""
    actions = s.on_begin(DST, 1 if seamless else None, 0.0)
    assert actions == [
        act.Notice("migration-begin", f"{'seamless' if seamless else 'semi-seamless'} to 10.0.0.9:5901"),
        act.StartPrelinks(1, SID, TARGET),
    ]  # fmt: skip
    assert phase_of(s) is Phase.LINKING_MAIN
    actions = s.on_dst_linked(1, MAIN_KEY, SEAMLESS_CAPS, "10.0.0.9:5901", 0.010)
    others = act.LinkToDestination(1, (DISPLAY, INPUTS, CURSOR), SID, TARGET)
    if seamless:
        assert actions == [
            act.SendToDestination(1, MAIN_KEY, MainMigrateDstDoSeamless(1)),
            others,
            act.AwaitSeamlessAnswer(1),
        ]
    else:
        assert actions == [others]
    assert phase_of(s) is Phase.PRE_LINKING
    for n, key in enumerate((DISPLAY, INPUTS)):
        assert s.on_dst_linked(1, key, frozenset(), "10.0.0.9:5901", 0.02 + n / 100) == []
    if seamless:
        assert s.on_dst_message(1, "MULTI_MEDIA_TIME", 0.035) == []
        assert s.on_seamless_answer(1, ack, 0.040) == []  # cursor still linking
    actions = s.on_dst_linked(1, CURSOR, frozenset(), "10.0.0.9:5901", 0.050)
    reply = MainMigrateConnectedSeamless() if seamless and ack else MainMigrateConnected()
    assert actions == [
        act.SendToSource(MAIN_KEY, reply),
        act.Answered(1, ok=True),
        act.Notice("migration-connected", reply.NAME),
    ]
    assert phase_of(s) is Phase.CONNECTED
    assert s.migration is not None
    assert s.migration.record.connected_reply_at == 0.050


def test_seamless_path_step_by_step() -> None:
    s = session()
    prelink(s)
    need_all = MigrateFlags.NEED_FLUSH | MigrateFlags.NEED_DATA_TRANSFER
    assert s.on_migrate(MAIN_KEY, need_all, 1.0) == [
        act.SendToSource(MAIN_KEY, MigrateFlushMark()),
        act.ReadMigrateData(MAIN_KEY),
    ]
    assert phase_of(s) is Phase.HANDOVER
    assert s.on_migrate_data(MAIN_KEY, MAIN_DATA, 1.002) == [
        act.SendToDestination(1, MAIN_KEY, ClientMigrateData(MAIN_DATA)),
        act.SwapChannel(1, MAIN_KEY),
    ]
    # MAIN swapped first: its source socket must stay open (leave the source last)
    assert s.on_swapped(MAIN_KEY, 1.003) == []
    assert s.on_migrate(CURSOR, 0, 1.010) == [act.SwapChannel(1, CURSOR)]
    assert s.on_swapped(CURSOR, 1.010) == []
    assert s.on_migrate(INPUTS, MigrateFlags.NEED_DATA_TRANSFER, 1.020) == [
        act.ReadMigrateData(INPUTS)
    ]
    assert s.on_migrate(DISPLAY, need_all, 1.020)[0] == act.SendToSource(
        DISPLAY, MigrateFlushMark()
    )
    s.on_migrate_data(DISPLAY, DISPLAY_DATA, 1.030)
    assert s.on_swapped(DISPLAY, 1.031) == []
    s.on_migrate_data(INPUTS, b"junk", 1.040)
    actions = s.on_swapped(INPUTS, 1.041)
    done = finished(actions)
    assert actions == [
        act.Notice("migration-done", "seamless"),
        done,
        act.InBackground((act.LeaveSource(1),), "spice-leave-source"),
    ]
    assert phase_of(s) is Phase.IDLE
    record = done.record
    assert record.path == "seamless"
    assert record.connection_id_before == record.connection_id_after == SID
    assert record.connection_id_kept
    assert record.channels_before == record.channels_after == LABELS
    assert record.blackout_ms == {
        "main:0": 3.0,
        "cursor:0": 0.0,
        "display:0": 11.0,
        "inputs:0": 21.0,
    }
    assert steps(done)[:8] == [
        ("main:0", "src", "rx", "MIGRATE_BEGIN_SEAMLESS"),
        ("main:0", "dst", "event", "LINKED"),
        ("main:0", "dst", "tx", "MIGRATE_DST_DO_SEAMLESS"),
        ("display:0", "dst", "event", "LINKED"),
        ("inputs:0", "dst", "event", "LINKED"),
        ("main:0", "dst", "rx", "MULTI_MEDIA_TIME"),
        ("main:0", "dst", "rx", "MIGRATE_DST_SEAMLESS_ACK"),
        ("cursor:0", "dst", "event", "LINKED"),
    ]
    assert steps(done)[8] == ("main:0", "src", "tx", "MIGRATE_CONNECTED_SEAMLESS")
    assert steps(done)[-1] == ("main:0", "dst", "event", "DONE:seamless")
    data = {x.channel: x.detail for x in record.steps if x.message == "MIGRATE_DATA"}
    assert data["main:0"] == f"{len(MAIN_DATA)} bytes"  # the dst tx (last written)
    rx = [x.detail for x in record.steps if x.message == "MIGRATE_DATA" and x.side == "src"]
    assert rx[0].startswith("MNMD v1")
    assert "envelope invalid" in rx[-1]  # forwarded all the same


def semi_end(s: ClientSession, number: int = 1) -> act.Finished:
    """MIGRATE_END -> MAIN to dst, dst MIGRATE_END -> dst INIT -> swap the rest."""
    assert s.on_migrate_end(2.0) == [
        act.SwapChannel(number, MAIN_KEY),
        act.SendToDestination(number, MAIN_KEY, MainClientMigrateEnd()),
    ]
    assert s.on_swapped(MAIN_KEY, 2.0) == []  # MAIN's blackout ends with INIT
    assert s.wants_dst_init
    swaps = s.on_dst_init(0x9999, 2.1)
    assert swaps == [
        act.SwapChannel(number, key, restart_reader=True, channel_up=True)
        for key in (DISPLAY, INPUTS, CURSOR)
    ]
    assert phase_of(s) is Phase.SWAPPING
    assert s.on_swapped(DISPLAY, 2.15) == []
    assert s.on_swapped(INPUTS, 2.16) == []
    actions = s.on_swapped(CURSOR, 2.17)
    assert actions[-1] == act.InBackground((act.LeaveSource(number),), "spice-leave-source")
    assert phase_of(s) is Phase.IDLE
    return finished(actions)


def test_semi_seamless_path_from_begin() -> None:
    s = session()
    prelink(s, seamless=False)
    done = semi_end(s)
    record = done.record
    assert record.path == "semi-seamless"
    assert record.connection_id_after == 0x9999
    assert not record.connection_id_kept
    assert record.blackout_ms["main:0"] == 100.0
    assert record.blackout_ms["cursor:0"] == 70.0
    assert s.session_id == 0x9999
    assert s.host == "10.0.0.9"
    messages = [m for _c, _s, _d, m in steps(done)]
    assert messages[0] == "MIGRATE_BEGIN"
    assert "MIGRATE_DST_DO_SEAMLESS" not in messages
    assert messages[messages.index("MIGRATE_END") :][:3] == ["MIGRATE_END", "MIGRATE_END", "INIT"]


def test_nack_falls_back_to_semi_seamless() -> None:
    s = session()
    prelink(s, seamless=True, ack=False)
    done = semi_end(s)
    assert done.record.path == "semi-seamless"
    messages = [m for _c, _s, _d, m in steps(done)]
    assert "MIGRATE_DST_SEAMLESS_NACK" in messages
    assert "MIGRATE_CONNECTED" in messages
    assert "MIGRATE_CONNECTED_SEAMLESS" not in messages


def test_destination_without_seamless_cap_is_not_asked() -> None:
    s = session()
    s.on_begin(DST, 1, 0.0)
    actions = s.on_dst_linked(1, MAIN_KEY, frozenset({MainCap.SEMI_SEAMLESS_MIGRATE}), "d", 0.1)
    assert actions == [act.LinkToDestination(1, (DISPLAY, INPUTS, CURSOR), SID, TARGET)]
    for key in (DISPLAY, INPUTS):
        s.on_dst_linked(1, key, frozenset(), "d", 0.2)
    assert s.on_dst_linked(1, CURSOR, frozenset(), "d", 0.2)[0] == act.SendToSource(
        MAIN_KEY, MainMigrateConnected()
    )


def test_link_failure_answers_connect_error_once_everything_settled() -> None:
    s = session()
    s.on_begin(DST, 1, 0.0)
    s.on_dst_linked(1, MAIN_KEY, SEAMLESS_CAPS, "d", 0.1)
    assert s.on_prelink_failed(1, "refused", 0.2, DISPLAY) == []  # others still pending
    s.on_dst_linked(1, INPUTS, frozenset(), "d", 0.2)
    s.on_dst_linked(1, CURSOR, frozenset(), "d", 0.2)
    actions = s.on_seamless_answer(1, True, 0.3)
    assert actions == [
        act.DropDestinationLinks(1),
        act.SendToSource(MAIN_KEY, MainMigrateConnectError()),
        act.Answered(1, ok=False),
    ]
    assert phase_of(s) is Phase.CONNECT_FAILED
    assert s.migration is not None
    assert s.migration.record.error == "destination link failed: refused"
    with pytest.raises(LocalProtocolError, match="MIGRATE without a prepared"):
        s.on_migrate(MAIN_KEY, 0, 1.0)
    # the server gives up on us: SWITCH_HOST (or a cancel); here the switch
    switch = s.on_switch_host(DST, 2.0)
    assert isinstance(switch[0], act.InBackground)


def test_main_prelink_failure_and_answer_read_failure() -> None:
    s = session()
    s.on_begin(DST, 1, 0.0)
    assert s.on_prelink_failed(1, "no route", 0.1, MAIN_KEY)[1] == act.SendToSource(
        MAIN_KEY, MainMigrateConnectError()
    )
    assert phase_of(s) is Phase.CONNECT_FAILED
    s = session()
    s.on_begin(DST, 1, 0.0)
    s.on_dst_linked(1, MAIN_KEY, SEAMLESS_CAPS, "d", 0.1)
    for key in (DISPLAY, INPUTS, CURSOR):
        s.on_dst_linked(1, key, frozenset(), "d", 0.2)
    assert phase_of(s) is Phase.PRE_LINKING  # the ACK is still missing
    actions = s.on_prelink_failed(1, "destination MAIN closed", 0.3)
    assert act.Answered(1, ok=False) in actions


SWITCH_STEPS = (
    act.DropDestinationLinks(1, drain=SWITCH_DRAIN_TIMEOUT),
    act.CloseSession(),
    act.Relink(act.LinkTarget("10.0.0.9", 5901, None, "CN=src")),
)


def test_switch_host_during_prelink_lets_prelinks_finish_then_relinks() -> None:
    s = session()
    s.on_begin(DST, 1, 0.0)
    s.on_dst_linked(1, MAIN_KEY, SEAMLESS_CAPS, "d", 0.1)
    actions = s.on_switch_host(DST, 0.5)
    # spice-server 0.15.1 segfaulted when a pre-link was cut mid-handshake and MAIN
    # relinked: the relink waits for the pre-links in flight
    assert actions == [
        act.InBackground((act.LetPrelinksFinish(1, 7.0), *SWITCH_STEPS), "spice-switch-host")
    ]
    assert phase_of(s) is Phase.SWITCHING
    # the pre-links go on and answer the source (too late: it already chose switch-host)
    for key in (DISPLAY, INPUTS, CURSOR):
        s.on_dst_linked(1, key, frozenset(), "d", 0.6)
    assert s.on_seamless_answer(1, True, 0.7)[0] == act.SendToSource(
        MAIN_KEY, MainMigrateConnectedSeamless()
    )
    # ... which the source answers with MIGRATE_CANCEL: not a cancel
    assert s.on_cancel(0.8) == []
    assert phase_of(s) is Phase.SWITCHING
    assert s.on_switch_host(DST, 0.85) == []  # a repeat is recorded, nothing more
    # the source drops us: expected now
    assert s.on_source_lost(MAIN_KEY, "server closed", 0.9, closed=True) is True
    s.session_up(0x5555, [MAIN_KEY, DISPLAY], "10.0.0.9", tls=False)
    done = finished(s.on_relinked(1.5))
    record = done.record
    assert record.path == "switch-host"
    assert record.connection_id_after == 0x5555
    assert not record.connection_id_kept
    assert record.channels_after == ["main:0", "display:0"]
    assert record.blackout_ms == {"main:0": 1000.0, "display:0": 1000.0}
    assert record.error is None
    messages = [m for _c, _s, _d, m in steps(done)]
    assert messages.count("MIGRATE_CANCEL") == 1
    assert messages.count("MIGRATE_SWITCH_HOST") == 2
    assert messages[-2:] == ["RECONNECTED", "DONE:switch-host"]


def test_switch_host_without_begin_is_the_whole_migration() -> None:
    s = session()
    actions = s.on_switch_host(DST, 0.0)
    assert actions == [
        act.Answered(1, ok=False),
        act.InBackground(SWITCH_STEPS, "spice-switch-host"),
    ]
    done = finished(s.on_relink_failed("refused", [], 0.4))
    assert done.record.path == "lost"
    assert done.record.connection_id_after is None
    assert done.record.error == "switch-host reconnect failed: refused"
    assert phase_of(s) is Phase.IDLE
    assert s.session_id == 0


@pytest.mark.parametrize("reach", ["linking-main", "pre-linking", "connected", "connect-failed"])
def test_cancel_stays_on_the_source(reach: str) -> None:
    s = at(Phase(reach))
    actions = s.on_cancel(5.0)
    assert actions[:4] == [
        act.StopPrelinks(1),
        act.Answered(1, ok=False),
        act.DropDestinationLinks(1),
        act.LeaveSource(1),
    ]
    done = finished(actions)
    assert done.record.path == "cancelled"
    assert done.record.connection_id_after == SID
    assert done.record.connection_id_kept
    assert steps(done)[-2:] == [
        ("main:0", "src", "rx", "MIGRATE_CANCEL"),
        ("main:0", "src", "event", "DONE:cancelled"),
    ]
    assert phase_of(s) is Phase.IDLE
    assert s.on_cancel(6.0) == []  # a second cancel: nothing left to cancel


def test_new_begin_supersedes_an_open_migration() -> None:
    s = at(Phase.CONNECTED)
    actions = s.on_begin(DST, 1, 3.0)
    assert actions[0] == act.InBackground(
        (
            act.StopPrelinks(1),
            act.Answered(1, ok=False),
            act.DropDestinationLinks(1),
            act.LeaveSource(1),
        ),
        "spice-abort",
    )
    old = finished(actions)
    assert old.number == 1
    assert old.record.path == "cancelled"
    assert old.record.error == "superseded by a new migration"
    assert actions[-1] == act.StartPrelinks(2, SID, TARGET)
    # the old pre-link task reports late: ignored
    assert s.on_dst_linked(1, DISPLAY, frozenset(), "d", 3.1) == []
    assert s.on_prelink_failed(1, "cancelled", 3.1, DISPLAY) == []
    assert s.migrations_started == 2


def test_tls_is_never_downgraded() -> None:
    # configured (a CA or a tls-port): the destination's plain port is not offered
    s = session(tls_required=True)
    start = s.on_begin(TLS_DST, 1, 0.0)[-1]
    assert start == act.StartPrelinks(1, SID, act.LinkTarget("10.0.0.9", None, 5902, "CN=dst"))
    s.on_cancel(0.1)
    relink = s.on_switch_host(TLS_DST, 0.2)[-1]
    assert isinstance(relink, act.InBackground)
    assert relink.actions[-1] == act.Relink(act.LinkTarget("10.0.0.9", None, 5902, "CN=dst"))
    # in use (TLS found by NEED_SECURED): the same
    s = session(tls=True)
    start = s.on_begin(TLS_DST, None, 0.0)[-1]
    assert isinstance(start, act.StartPrelinks)
    assert start.target.port is None
    # a plain session may use the plain port, and the source's host when none is named
    s = session()
    start = s.on_begin(DstInfo(None, 5901, 5902), 1, 0.0)[-1]
    assert start == act.StartPrelinks(1, SID, act.LinkTarget("10.0.0.1", 5901, 5902, None))


# ----------------------------------------------------------------------------- illegal


def at(phase: Phase) -> ClientSession:
    """A session driven (legally) into ``phase``."""
    s = session()
    if phase is Phase.CLOSED:
        s.close()
    if phase in (Phase.IDLE, Phase.CLOSED):
        return s
    if phase is Phase.SWITCHING:
        s.on_switch_host(DST, 0.0)
        return s
    s.on_begin(DST, 1, 0.0)
    if phase is Phase.CONNECT_FAILED:
        s.on_prelink_failed(1, "refused", 0.1, MAIN_KEY)
    if phase in (Phase.LINKING_MAIN, Phase.CONNECT_FAILED):
        return s
    s.on_dst_linked(1, MAIN_KEY, frozenset(), "d", 0.1)  # no seamless cap: no ACK to wait
    if phase is Phase.PRE_LINKING:
        return s
    for key in (DISPLAY, INPUTS, CURSOR):
        s.on_dst_linked(1, key, frozenset(), "d", 0.2)
    if phase is Phase.HANDOVER:
        s.on_migrate(MAIN_KEY, MigrateFlags.NEED_DATA_TRANSFER, 1.0)
    elif phase in (Phase.AWAIT_DST_INIT, Phase.SWAPPING):
        s.on_migrate_end(1.0)
        if phase is Phase.SWAPPING:
            s.on_dst_init(9, 1.1)
    assert phase_of(s) is phase
    return s


#: every public input of the machine, as the event of the table it stands for
CALLS: dict[Ev, Callable[[ClientSession], object]] = {
    Ev.BEGIN: lambda s: s.on_begin(DST, 1, 9.0),
    Ev.DST_LINKED: lambda s: s.on_dst_linked(1, DISPLAY, frozenset(), "d", 9.0),
    Ev.DST_LINK_FAILED: lambda s: s.on_prelink_failed(1, "x", 9.0, DISPLAY),
    Ev.DST_MESSAGE: lambda s: s.on_dst_message(1, "PING", 9.0),
    Ev.SEAMLESS_ANSWER: lambda s: s.on_seamless_answer(1, True, 9.0),
    Ev.MIGRATE: lambda s: s.on_migrate(DISPLAY, 0, 9.0),
    Ev.MIGRATE_DATA: lambda s: s.on_migrate_data(MAIN_KEY, MAIN_DATA, 9.0),
    Ev.SWAPPED: lambda s: s.on_swapped(DISPLAY, 9.0),
    Ev.MIGRATE_END: lambda s: s.on_migrate_end(9.0),
    Ev.DST_INIT: lambda s: s.on_dst_init(7, 9.0),
    Ev.SWITCH_HOST: lambda s: s.on_switch_host(DST, 9.0),
    Ev.RELINKED: lambda s: s.on_relinked(9.0),
    Ev.RELINK_FAILED: lambda s: s.on_relink_failed("x", [], 9.0),
    Ev.CANCEL: lambda s: s.on_cancel(9.0),
    Ev.SOURCE_LOST: lambda s: s.on_source_lost(DISPLAY, "x", 9.0, closed=True),
    Ev.CLOSE: lambda s: s.close(),
}
#: pre-link reports for no open migration are stale (a cancelled task reporting late)
STALE_OK = {Ev.DST_LINKED, Ev.DST_LINK_FAILED, Ev.DST_MESSAGE, Ev.SEAMLESS_ANSWER}


def _legal(phase: Phase, event: Ev) -> bool:
    if phase in (Phase.IDLE, Phase.CLOSED) and event in STALE_OK | {Ev.SOURCE_LOST}:
        return True  # no migration open: ignored, not a transition
    if event is Ev.BEGIN and phase is not Phase.CLOSED:
        return True  # a BEGIN supersedes whatever is open
    if event is Ev.MIGRATE and phase is Phase.HANDOVER:
        return True  # display not cut yet
    if event is Ev.SWAPPED and phase is not Phase.SWAPPING:
        return False  # display has no swap due (MAIN's swap is checked in the paths)
    return (phase, event) in TRANSITIONS


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
@pytest.mark.parametrize("event", list(CALLS), ids=lambda e: e.name)
def test_every_phase_event_pair(phase: Phase, event: Ev) -> None:
    s = at(phase)
    if _legal(phase, event):
        CALLS[event](s)
        assert s.phase in Phase
    else:
        with pytest.raises(LocalProtocolError):
            CALLS[event](s)


def test_table_is_closed_over_phases_and_events() -> None:
    for (phase, event), nxt in TRANSITIONS.items():
        assert isinstance(phase, Phase)
        assert isinstance(event, Ev)
        assert isinstance(nxt, Phase)
    # only CLOSE leaves CLOSED, and it leads back to CLOSED
    assert {e for (p, e) in TRANSITIONS if p is Phase.CLOSED} == {Ev.CLOSE}


def test_per_channel_order_is_checked() -> None:
    s = at(Phase.HANDOVER)
    with pytest.raises(LocalProtocolError, match="MIGRATE without"):
        s.on_migrate(MAIN_KEY, 0, 1.5)  # MAIN already got its MIGRATE
    with pytest.raises(LocalProtocolError, match="MIGRATE_DATA without MIGRATE"):
        s.on_migrate_data(DISPLAY, DISPLAY_DATA, 1.5)
    s = at(Phase.CONNECTED)
    with pytest.raises(LocalProtocolError, match="prepared destination link"):
        s.on_migrate((ChannelType.PORT, 3), 0, 1.0)


def test_the_machine_does_no_io() -> None:
    """session.py and actions.py import no asyncio, socket or ssl (pydantic, through the
    record model, may pull socket in; the machine itself never touches one)."""
    import ast
    from pathlib import Path

    import spice_libvirt.spice.session as session_mod

    here = Path(session_mod.__file__).parent
    for name in ("session.py", "actions.py"):
        tree = ast.parse((here / name).read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert not imported & {"asyncio", "socket", "ssl", "selectors"}, (name, imported)
