"""Arbitrary bytes from a peer only ever raise our protocol error (never anything else)."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spice_libvirt.errors import RemoteProtocolError
from spice_libvirt.spice import messages as m
from spice_libvirt.spice.connection import (
    NEED_DATA,
    ClientChannelConnection,
    ConnState,
    LinkReplyReceived,
)
from spice_libvirt.spice.constants import ChannelType
from spice_libvirt.spice.link import LinkMess
from spice_libvirt.spice.migrate_data import check_migrate_data
from tests.spice_helpers import link_reply_bytes

CHANNELS = st.sampled_from(list(ChannelType))
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _drain(conn: ClientChannelConnection) -> None:
    for _ in range(10_000):
        event = conn.next_event()
        if event is NEED_DATA:
            return
        if isinstance(event, LinkReplyReceived):
            conn.authenticate(None)


def _feed_hostile(conn: ClientChannelConnection, chunks: list[bytes]) -> None:
    """Feed peer bytes; the only error allowed is ours, and it leaves the state ERROR."""
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            _drain(conn)
    except RemoteProtocolError:
        assert conn.state is ConnState.ERROR


@FUZZ
@given(channel=CHANNELS, msg_type=st.integers(0, 0xFFFF), body=st.binary(max_size=300))
def test_message_decoder_only_raises_remote_errors(
    channel: int, msg_type: int, body: bytes
) -> None:
    for decode in (m.decode_server_message, m.decode_client_message):
        with contextlib.suppress(RemoteProtocolError):
            decode(channel, msg_type, body)


@FUZZ
@given(channel=CHANNELS, chunks=st.lists(st.binary(max_size=200), max_size=6))
def test_link_phase_fuzz(channel: int, chunks: list[bytes]) -> None:
    conn = ClientChannelConnection(LinkMess(0, channel, 0), max_body=4096)
    conn.start()
    _feed_hostile(conn, chunks)


@FUZZ
@given(channel=CHANNELS, chunks=st.lists(st.binary(max_size=400), max_size=8))
def test_data_phase_fuzz(channel: int, chunks: list[bytes]) -> None:
    conn = ClientChannelConnection(LinkMess(7, channel, 0), max_body=4096)
    conn.start()
    conn.receive_data(link_reply_bytes())
    _drain(conn)
    conn.receive_data(b"\0\0\0\0")
    _feed_hostile(conn, chunks)


@FUZZ
@given(channel=CHANNELS, body=st.binary(max_size=120))
def test_migrate_data_check_fuzz(channel: int, body: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        check_migrate_data(channel, body)
