"""The sans-IO channel state machine, driven by an in-memory server (no sockets)."""

from __future__ import annotations

import struct

import pytest

from spice_libvirt.errors import (
    AuthenticationError,
    LinkError,
    LocalProtocolError,
    RemoteProtocolError,
)
from spice_libvirt.spice import messages as m
from spice_libvirt.spice.connection import (
    NEED_DATA,
    TRANSITIONS,
    ClientChannelConnection,
    ConnState,
    KeepAlive,
    LinkEstablished,
    LinkReplyReceived,
    MessageReceived,
)
from spice_libvirt.spice.constants import ChannelType, CommonCap, LinkErr, MainCap
from spice_libvirt.spice.link import LinkMess
from tests.spice_helpers import decrypt_ticket, link_reply_bytes, server_frame


def linked(channel: int = ChannelType.MAIN, *, mini: bool = True) -> ClientChannelConnection:
    common = frozenset({CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER})
    conn = ClientChannelConnection(
        LinkMess(0, channel, 0, common, frozenset({MainCap.SEAMLESS_MIGRATE}))
    )
    conn.start()
    server_common = frozenset(
        {CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.AUTH_SPICE}
        | ({CommonCap.MINI_HEADER} if mini else set())
    )
    conn.receive_data(link_reply_bytes(common=server_common))
    assert isinstance(conn.next_event(), LinkReplyReceived)
    conn.authenticate("pw")
    conn.receive_data(b"\0\0\0\0")
    event = conn.next_event()
    assert isinstance(event, LinkEstablished)
    assert event.mini_header is mini
    return conn


def _same(conn: ClientChannelConnection) -> ClientChannelConnection:
    """Forget mypy's narrowing of ``conn.state`` after a call that changes it."""
    return conn


def test_full_link_sequence_bytes() -> None:
    conn = ClientChannelConnection(
        LinkMess(
            0,
            ChannelType.MAIN,
            0,
            frozenset({CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER}),
        )
    )
    assert conn.next_event() is NEED_DATA
    request = conn.start()
    assert request[:4] == b"REDQ"
    reply = link_reply_bytes()
    conn.receive_data(reply[:10])  # partial header: nothing yet
    assert conn.next_event() is NEED_DATA
    conn.receive_data(reply[10:])
    assert isinstance(conn.next_event(), LinkReplyReceived)
    mechanism, ticket = conn.auth_chunks("pw")
    assert mechanism == struct.pack("<I", CommonCap.AUTH_SPICE)
    assert decrypt_ticket(ticket) == b"pw\0"
    # link result and the first message in one read: the leftover must not be lost
    conn.receive_data(b"\0\0\0\0" + server_frame(m.SetAck(1, 10)))
    assert isinstance(conn.next_event(), LinkEstablished)
    event = conn.next_event()
    assert isinstance(event, MessageReceived)
    assert event.message == m.SetAck(1, 10)
    assert conn.state is ConnState.READY


def test_no_auth_mechanism_when_server_offers_no_selection() -> None:
    conn = ClientChannelConnection(
        LinkMess(0, 1, 0, frozenset({CommonCap.PROTOCOL_AUTH_SELECTION}))
    )
    conn.start()
    conn.receive_data(link_reply_bytes(common=frozenset({CommonCap.AUTH_SPICE})))
    conn.next_event()
    mechanism, ticket = conn.auth_chunks(None)
    assert mechanism == b""
    assert len(ticket) == 128


@pytest.mark.parametrize("code", [c for c in LinkErr if c != LinkErr.OK])
def test_every_link_error_code_in_reply_and_result(code: LinkErr) -> None:
    expected = AuthenticationError if code == LinkErr.PERMISSION_DENIED else LinkError
    conn = ClientChannelConnection(LinkMess(0, 1, 0))
    conn.start()
    conn.receive_data(link_reply_bytes(error=code))
    with pytest.raises(expected) as info:
        conn.next_event()
    assert info.value.code == code
    assert conn.state is ConnState.ERROR
    conn = ClientChannelConnection(LinkMess(0, 1, 0))
    conn.start()
    conn.receive_data(link_reply_bytes())
    conn.next_event()
    conn.authenticate(None)
    conn.receive_data(struct.pack("<I", code))
    with pytest.raises(
        expected, match="permission denied" if code == 7 else code.name.lower().replace("_", " ")
    ):
        conn.next_event()


def test_full_header_when_server_lacks_mini() -> None:
    conn = linked(mini=False)
    assert conn.send(m.MainAttachChannels()) == struct.pack("<QHII", 1, 104, 0, 0)
    conn.receive_data(server_frame(m.MainMigrateCancel(), mini=False, serial=77))
    event = conn.next_event()
    assert isinstance(event, MessageReceived)
    assert event.serial == 77


def test_migrate_with_data_transfer_requires_migrate_data_next() -> None:
    conn = linked(ChannelType.DISPLAY)
    conn.receive_data(server_frame(m.Migrate(3)) + server_frame(m.SetAck(1, 1)))
    assert isinstance(conn.next_event(), MessageReceived)
    assert conn.state is ConnState.AWAIT_MIGRATE_DATA
    conn = _same(conn)
    with pytest.raises(RemoteProtocolError, match="expected MIGRATE_DATA"):
        conn.next_event()
    assert conn.state is ConnState.ERROR


def test_migrate_then_data_then_resume() -> None:
    conn = linked(ChannelType.INPUTS)
    conn.receive_data(
        server_frame(m.Migrate(3)) + server_frame(m.MigrateData(b"ICMD\x01\0\0\0\0\0"))
    )
    conn.next_event()
    event = conn.next_event()
    assert isinstance(event, MessageReceived)
    assert event.message == m.MigrateData(b"ICMD\x01\0\0\0\0\0")
    assert conn.state is ConnState.MIGRATED
    conn.send(m.MigrateFlushMark())  # still allowed
    conn.resume_after_migration()
    assert _same(conn).state is ConnState.READY


def test_migrate_without_data_goes_straight_to_migrated() -> None:
    conn = linked(ChannelType.CURSOR)
    conn.receive_data(server_frame(m.Migrate(0)))
    conn.next_event()
    assert conn.state is ConnState.MIGRATED
    conn.receive_data(server_frame(m.Migrate(0)))
    with pytest.raises(RemoteProtocolError, match="MIGRATE in state"):
        conn.next_event()


def test_local_misuse_is_a_local_error() -> None:
    conn = ClientChannelConnection(LinkMess(0, 1, 0))
    with pytest.raises(LocalProtocolError):
        conn.send(m.Ack())
    with pytest.raises(LocalProtocolError):
        conn.authenticate("x")
    conn.start()
    with pytest.raises(LocalProtocolError):
        conn.start()


def test_transition_table_is_closed() -> None:
    reachable = {ConnState.IDLE} | set(TRANSITIONS.values())
    assert reachable >= {ConnState.READY, ConnState.MIGRATED}
    assert all(src in reachable for src, _ in TRANSITIONS)


def test_keepalive_acks_every_window_and_pongs() -> None:
    keep = KeepAlive()
    assert keep.on_message(m.SetAck(5, 3)) == [m.AckSync(5)]
    out = [keep.on_message(m.MainMultiMediaTime(1)) for _ in range(6)]
    assert out == [[], [], [m.Ack()], [], [], [m.Ack()]]
    assert keep.on_message(m.Ping(9, 123, b"padding")) == [m.Pong(9, 123)]
