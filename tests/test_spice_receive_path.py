"""The fast receive path (mini headers, READY: frames cut and decoded ahead) against the
plain one-by-one path (full headers), on the same messages cut into the same reads.

The full-header path goes through ``FrameDecoder.next_raw`` and decodes one frame per
``next_event()``; the mini-header path inlines the framing and cuts ahead. Whatever the
stream (valid, malformed bodies, MIGRATE and MIGRATE_DATA, oversized headers) and however
it is split into reads, both must produce the same events with the same serials, the same
``received`` count after each, and the same error at the same place.
"""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spice_libvirt.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from spice_libvirt.spice import messages as m
from spice_libvirt.spice.connection import (
    CUT_AHEAD,
    NEED_DATA,
    ClientChannelConnection,
    ConnState,
    MessageReceived,
)
from spice_libvirt.spice.constants import ChannelType, MigrateFlags
from spice_libvirt.spice.framing import FrameDecoder, encode_frame
from tests.test_spice_connection import _same, linked

#: (msg_type, body) building blocks; the last ones are malformed or change state
PIECES: list[tuple[int, bytes]] = [
    (m.VmcData.TYPE, b"0123456789abcdef0123456789abcdef"),
    (4, struct.pack("<IQ", 7, 99) + b"pad"),  # PING
    (3, struct.pack("<II", 1, 20)),  # SET_ACK
    (305, b"\x01" * 300),  # a display message: UnknownMessage
    (m.VmcData.TYPE, b""),
    (4, b"\x00" * 5),  # PING too short: malformed
    (1, struct.pack("<I", 0)),  # MIGRATE without data
    (1, struct.pack("<I", MigrateFlags.NEED_DATA_TRANSFER)),  # MIGRATE, data follows
    (2, b"migration data"),  # MIGRATE_DATA
]


def _stream(pieces: list[tuple[int, bytes]], *, mini: bool) -> bytes:
    return b"".join(
        encode_frame(t, body, mini=mini, serial=i) for i, (t, body) in enumerate(pieces, 1)
    )


def _run(conn: ClientChannelConnection, data: bytes, cuts: list[int]) -> list[object]:
    """Feed ``data`` split at ``cuts``, draining events after every read; the outcome list
    holds (serial, message, received) per event, then the error (type, text) if any."""
    out: list[object] = []
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for lo, hi in itertools.pairwise(bounds):
        try:
            conn.receive_data(data[lo:hi])
        except LocalProtocolError as exc:
            out.append(("local", str(exc)))
            return out
        while True:
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                out.append((type(exc).__name__, str(exc), conn.state))
                return out
            if event is NEED_DATA:
                break
            assert isinstance(event, MessageReceived)
            out.append((event.serial, event.message, conn.received))
            if conn.state is ConnState.MIGRATED:
                conn.resume_after_migration()
    return out


def _both(pieces: list[tuple[int, bytes]], cuts: list[int], channel: int) -> None:
    fast = _run(linked(channel, mini=True), _stream(pieces, mini=True), [c * 6 for c in cuts])
    plain = _run(linked(channel, mini=False), _stream(pieces, mini=False), [c * 18 for c in cuts])
    # the reads differ (header sizes differ) but the events may not
    assert fast == plain


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, len(PIECES) - 1), max_size=40),
    st.lists(st.integers(0, 400), max_size=6),
    st.sampled_from([ChannelType.PORT, ChannelType.MAIN, ChannelType.DISPLAY]),
)
def test_fast_path_matches_the_plain_path(
    picks: list[int], cuts: list[int], channel: ChannelType
) -> None:
    _both([PIECES[i] for i in picks], cuts, channel)


def test_events_before_a_malformed_body_come_first_then_the_error() -> None:
    conn = linked(ChannelType.DISPLAY)
    good = [PIECES[0], PIECES[1], PIECES[3]]
    conn.receive_data(_stream([*good, (4, b"\x00" * 5), PIECES[0]], mini=True))
    for i in range(3):
        event = conn.next_event()
        assert isinstance(event, MessageReceived)
        assert (event.serial, conn.received) == (i + 1, i + 1)
    with pytest.raises(RemoteProtocolError, match="PING needs 12 bytes, got 5"):
        conn.next_event()
    assert conn.state is ConnState.ERROR
    assert conn.received == 3
    with pytest.raises(LocalProtocolError, match="already failed"):
        conn.next_event()


def test_an_oversized_header_after_good_frames_is_judged_in_order() -> None:
    conn = linked(ChannelType.PORT)
    conn.receive_data(_stream([PIECES[0]] * 2, mini=True) + struct.pack("<HI", 101, 0xFFFFFFFF))
    assert [conn.next_event() for _ in range(2)] == [
        MessageReceived(1, m.VmcData(PIECES[0][1])),
        MessageReceived(2, m.VmcData(PIECES[0][1])),
    ]
    with pytest.raises(RemoteProtocolError, match="announces 4294967295 bytes"):
        conn.next_event()
    assert conn.received == 2


def test_migrate_in_a_run_of_records_changes_state_at_its_own_event() -> None:
    conn = linked(ChannelType.PORT)
    records = [PIECES[0]] * 5
    conn.receive_data(_stream([*records, PIECES[7], PIECES[8], *records], mini=True))
    for _ in range(5):
        conn.next_event()
        assert conn.state is ConnState.READY
    event = conn.next_event()
    assert isinstance(event, MessageReceived)
    assert isinstance(event.message, m.Migrate)
    assert conn.state is ConnState.AWAIT_MIGRATE_DATA
    assert conn.migrate_flags == MigrateFlags.NEED_DATA_TRANSFER
    event = conn.next_event()
    assert isinstance(event, MessageReceived)
    assert isinstance(event.message, m.MigrateData)
    assert _same(conn).state is ConnState.MIGRATED
    conn.resume_after_migration()
    assert [e.serial for e in iter(conn.next_event, NEED_DATA)] == [8, 9, 10, 11, 12]  # type: ignore[union-attr]
    assert conn.received == 12


def test_data_fed_between_events_keeps_its_place() -> None:
    conn = linked(ChannelType.PORT)
    stream = _stream([(m.VmcData.TYPE, bytes([i])) for i in range(CUT_AHEAD + 10)], mini=True)
    half = len(stream) // 2
    conn.receive_data(stream[:half])
    first = conn.next_event()
    conn.receive_data(stream[half:])
    rest = list(iter(conn.next_event, NEED_DATA))
    events = [first, *rest]
    assert [e.message.data for e in events] == [bytes([i]) for i in range(CUT_AHEAD + 10)]  # type: ignore[union-attr]
    assert [e.serial for e in events] == list(range(1, CUT_AHEAD + 11))  # type: ignore[union-attr]


def test_a_frame_spanning_many_reads_is_gathered_once() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    frame = encode_frame(305, body, mini=True)
    dec = FrameDecoder(mini=True)
    for offset in range(0, len(frame), 1000):
        dec.feed(frame[offset : offset + 1000])
        assert dec.buffered == min(offset + 1000, len(frame))
        if offset + 1000 < len(frame):
            assert dec.next_frame() is None
    got = dec.next_frame()
    assert got is not None
    assert (got.serial, got.msg_type, got.body) == (1, 305, body)
    assert dec.buffered == 0


def test_a_header_split_across_reads_is_judged_when_complete() -> None:
    dec = FrameDecoder(mini=True, max_body=1024)
    dec.feed(struct.pack("<HI", 101, 5000)[:3])
    assert dec.next_frame() is None
    dec.feed(struct.pack("<HI", 101, 5000)[3:])
    with pytest.raises(RemoteProtocolError, match="announces 5000 bytes"):
        dec.next_frame()
    assert dec.buffered == 6
