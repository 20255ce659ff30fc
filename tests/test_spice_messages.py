"""Message bodies: byte-for-byte layouts, round trips for every message, hostile bodies."""

from __future__ import annotations

import re
import struct
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spice_libvirt.errors import RemoteProtocolError
from spice_libvirt.spice import messages as m
from spice_libvirt.spice.constants import ChannelType
from spice_libvirt.spice.framing import FrameDecoder, encode_frame

# ---------------------------------------------------------------- byte-for-byte layouts


def test_begin_seamless_matches_facts_doc_example() -> None:
    msg = m.MainMigrateBeginSeamless(m.DstInfo("10.0.0.9", 5901, None), 1)
    frame = encode_frame(msg.TYPE, msg.encode_body(), mini=True)
    assert frame == bytes.fromhex(
        "7400210000000d17ffff090000001800000000000000000000000100000031302e302e302e3900"
    )
    assert m.decode_server_message(1, 116, frame[6:]) == msg


def test_migrate_begin_with_subject_points_after_host() -> None:
    msg = m.MainMigrateBegin(m.DstInfo("hostB", 5900, 5901, "C=XX,CN=hostB"))
    body = msg.encode_body()
    port, sport, host_size, host_off, subj_size, subj_off = struct.unpack_from("<HHIIII", body)
    assert (port, sport, host_size, host_off) == (5900, 5901, 6, 20)
    assert (subj_size, subj_off) == (14, 26)
    assert body[20:26] == b"hostB\0"
    assert body[26:] == b"C=XX,CN=hostB\0"
    assert m.MainMigrateBegin.decode_body(body) == msg


def test_switch_host_allows_null_host() -> None:
    body = struct.pack("<HHIIII", 5900, 0xFFFF, 0, 0, 0, 0)
    msg = m.MainMigrateSwitchHost.decode_body(body)
    assert msg.dst == m.DstInfo(None, 5900, None, None)
    with pytest.raises(RemoteProtocolError, match="NULL"):
        m.MainMigrateBegin.decode_body(struct.pack("<HHIIII", 5900, 0, 4, 0, 0, 0))


def test_init_is_eight_u32() -> None:
    body = struct.pack("<8I", 0x11223344, 1, 3, 1, 0, 10, 12345, 0)
    msg = m.decode_server_message(ChannelType.MAIN, 103, body)
    assert msg == m.MainInit(0x11223344, 1, 3, 1, 0, 10, 12345, 0)
    assert msg.encode_body() == body


def test_channels_list_is_bounded_in_distinct_channels() -> None:
    many = [(t, i) for t in range(2, 12) for i in range(26)]  # 260 distinct pairs
    body = struct.pack("<I", len(many)) + b"".join(bytes(p) for p in many)
    with pytest.raises(RemoteProtocolError, match="more than 256 distinct"):
        m.MainChannelsList.decode_body(body)
    # many duplicates of three channels decode to three
    dups = struct.pack("<I", 300_000) + bytes([2, 0, 3, 0, 10, 1]) * 100_000
    assert len(m.MainChannelsList.decode_body(dups).channels) == 3


def test_channels_list_and_name_and_uuid() -> None:
    body = struct.pack("<I", 3) + bytes([2, 0, 3, 0, 10, 1])
    assert m.MainChannelsList.decode_body(body).channels == ((2, 0), (3, 0), (10, 1))
    assert m.MainName.decode_body(struct.pack("<I", 6) + b"labvm\0").name == "labvm"
    # duplicates are dropped while reading, first-seen order kept
    dup = struct.pack("<I", 5) + bytes([2, 0, 3, 0, 2, 0, 3, 0, 10, 1])
    assert m.MainChannelsList.decode_body(dup).channels == ((2, 0), (3, 0), (10, 1))
    assert m.MainName("labvm").encode_body() == struct.pack("<I", 6) + b"labvm\0"
    assert m.MainUuid.decode_body(bytes(range(16))).uuid == bytes(range(16))


def test_common_messages_layout() -> None:
    assert m.SetAck(7, 20).encode_body() == struct.pack("<II", 7, 20)
    assert m.Ping(5, 99, b"pad").encode_body() == struct.pack("<IQ", 5, 99) + b"pad"
    assert m.Pong(5, 99).encode_body() == struct.pack("<IQ", 5, 99)
    assert m.Migrate(3).encode_body() == b"\x03\0\0\0"
    wait = m.WaitForChannels(((2, 0, 42),))
    assert wait.encode_body() == b"\x01" + struct.pack("<BBQ", 2, 0, 42)
    notify = m.Notify(1, 2, 2, 0, "hi")
    assert notify.encode_body() == struct.pack("<QIIII", 1, 2, 2, 0, 3) + b"hi\0"
    assert m.Notify.decode_body(notify.encode_body()) == notify
    assert m.DisplayInit(1, 100, 1, 200).encode_body() == struct.pack("<BqBi", 1, 100, 1, 200)
    assert len(m.DisplayInit(1, 100, 1, 200).encode_body()) == 14


def test_port_init_name_pointer_is_offset_nine() -> None:
    body = m.PortInit("org.spice-libvirt.stream", True).encode_body()
    size, offset, opened = struct.unpack_from("<IIB", body)
    assert (size, offset, opened) == (25, 9, 1)
    assert body[9:] == b"org.spice-libvirt.stream\0"
    assert m.decode_server_message(ChannelType.PORT, 201, body) == m.PortInit(
        "org.spice-libvirt.stream", True
    )


def test_unknown_messages_are_kept_whole() -> None:
    msg = m.decode_server_message(ChannelType.DISPLAY, 302, b"\x01\x02")
    assert isinstance(msg, m.UnknownMessage)
    assert (m.message_type(msg), msg.data, m.message_name(msg)) == (302, b"\x01\x02", "MSG_302")


def test_full_and_mini_headers() -> None:
    assert encode_frame(3, b"ab", mini=True) == struct.pack("<HI", 3, 2) + b"ab"
    assert encode_frame(3, b"ab", mini=False, serial=9) == struct.pack("<QHII", 9, 3, 2, 0) + b"ab"
    dec = FrameDecoder(mini=False)
    dec.feed(encode_frame(3, b"ab", mini=False, serial=9)[:10])
    assert dec.next_frame() is None
    dec.feed(encode_frame(3, b"ab", mini=False, serial=9)[10:])
    frame = dec.next_frame()
    assert frame is not None
    assert (frame.serial, frame.msg_type, frame.body) == (9, 3, b"ab")


def test_mini_header_serials_are_implicit_from_one() -> None:
    dec = FrameDecoder(mini=True)
    dec.feed(encode_frame(4, b"x", mini=True) * 3)
    assert [f.serial for f in iter(dec.next_frame, None)] == [1, 2, 3]


def test_oversized_frame_rejected_before_buffering() -> None:
    dec = FrameDecoder(mini=True, max_body=1024)
    dec.feed(struct.pack("<HI", 101, 0xFFFFFFFF))
    with pytest.raises(RemoteProtocolError, match="announces"):
        dec.next_frame()
    assert dec.buffered == 6


@pytest.mark.parametrize(
    ("channel", "msg_type", "body", "match"),
    [
        (ChannelType.MAIN, 104, struct.pack("<I", 0x7FFFFFFF), "announces"),
        (ChannelType.MAIN, 103, bytes(31), "needs 32"),
        (ChannelType.MAIN, 113, struct.pack("<I", 1000) + b"x", "exceeds"),
        (ChannelType.MAIN, 116, struct.pack("<HHIIII", 1, 1, 50, 24, 0, 0) + bytes(8), "exceed"),
        (ChannelType.MAIN, 101, struct.pack("<HHIIII", 1, 1, 5, 0xFFFFFFF0, 0, 0), "exceed"),
        (ChannelType.DISPLAY, 7, struct.pack("<QIIII", 0, 0, 0, 0, 99), "exceeds"),
        (ChannelType.DISPLAY, 5, b"\x09" + bytes(10), "announces"),
        (ChannelType.PORT, 201, struct.pack("<IIB", 4, 9, 0) + b"ab", "exceed"),
        (ChannelType.MAIN, 114, bytes(15), "needs 16"),
        (ChannelType.MAIN, 101, struct.pack("<HHIIII", 1, 1, 3, 20, 0, 0) + b"\xff\xfe\0", "UTF-8"),
    ],
)
def test_hostile_bodies_raise_remote_errors(
    channel: int, msg_type: int, body: bytes, match: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        m.decode_server_message(channel, msg_type, body)


# ---------------------------------------------------------------- round trips


_U = {"B": 8, "H": 16, "I": 32, "Q": 64}
_S = {"b": 8, "h": 16, "i": 32, "q": 64}


def _int_strategies(layout: struct.Struct) -> list[st.SearchStrategy[int]]:
    out: list[st.SearchStrategy[int]] = []
    for count, code in re.findall(r"(\d*)([a-zA-Z])", layout.format.lstrip("<")):
        out.extend(_one_int(code) for _ in range(int(count or 1)))
    return out


def _one_int(code: str) -> st.SearchStrategy[int]:
    if code in _U:
        return st.integers(0, 2 ** _U[code] - 1)
    bits = _S[code]
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=40)
port = st.one_of(st.none(), st.integers(1, 0xFFFE))
dst_info = st.builds(
    m.DstInfo,
    host=text.filter(bool),
    port=port,
    tls_port=port,
    cert_subject=st.one_of(st.none(), text.filter(bool)),
)
u32 = st.integers(0, 2**32 - 1)

SPECIAL: dict[type[m.Message], st.SearchStrategy[Any]] = {
    m.Ping: st.builds(m.Ping, u32, st.integers(0, 2**64 - 1), st.binary(max_size=64)),
    m.WaitForChannels: st.builds(
        m.WaitForChannels,
        st.lists(
            st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 2**64 - 1)),
            max_size=8,
        ).map(tuple),
    ),
    m.Notify: st.builds(m.Notify, st.integers(0, 2**64 - 1), u32, u32, u32, text),
    m.MainMigrateBegin: st.builds(m.MainMigrateBegin, dst_info),
    m.MainMigrateSwitchHost: st.builds(m.MainMigrateSwitchHost, dst_info),
    m.MainMigrateBeginSeamless: st.builds(m.MainMigrateBeginSeamless, dst_info, u32),
    m.MainChannelsList: st.builds(
        m.MainChannelsList,
        st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=20, unique=True).map(
            tuple
        ),
    ),
    m.MainName: st.builds(m.MainName, text),
    m.MainUuid: st.builds(m.MainUuid, st.binary(min_size=16, max_size=16)),
    m.PortInit: st.builds(m.PortInit, text, st.booleans()),
}


def strategy_for(cls: type[m.Message]) -> st.SearchStrategy[Any]:
    if cls in SPECIAL:
        return SPECIAL[cls]
    if issubclass(cls, m.FixedMessage):
        return st.tuples(*_int_strategies(cls.LAYOUT)).map(lambda v: cls(*v))
    if issubclass(cls, m.RawMessage):
        return st.binary(max_size=256).map(cls)
    if issubclass(cls, m.EmptyMessage):
        return st.just(cls())
    raise AssertionError(f"no strategy for {cls.__name__}")


ALL = m.all_message_classes()


@pytest.mark.parametrize(
    ("direction", "channel", "cls"), ALL, ids=[f"{d}-{c}-{k.__name__}" for d, c, k in ALL]
)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_message_round_trips(
    direction: str, channel: int, cls: type[m.Message], data: st.DataObject
) -> None:
    msg = data.draw(strategy_for(cls))
    body = msg.encode_body()
    decode = m.decode_server_message if direction == "server" else m.decode_client_message
    back = decode(channel, cls.TYPE, body)
    assert back == msg
    assert back.encode_body() == body
    frame = encode_frame(cls.TYPE, body, mini=True)
    dec = FrameDecoder(mini=True)
    dec.feed(frame)
    got = dec.next_frame()
    assert got is not None
    assert (got.msg_type, got.body) == (cls.TYPE, body)


def test_registry_covers_every_facts_doc_message() -> None:
    main_server = {cls.TYPE for d, c, cls in ALL if d == "server" and c == ChannelType.MAIN}
    assert main_server == set(range(1, 8)) | set(range(101, 119))
    main_client = {cls.TYPE for d, c, cls in ALL if d == "client" and c == ChannelType.MAIN}
    assert main_client == set(range(1, 7)) | set(range(101, 112))
    # MAIN_INIT's eight u32 in the facts doc's order: session_id first (the connection id
    # every later link carries)
    assert [f.name for f in fields(m.MainInit)] == [
        "session_id",
        "display_channels_hint",
        "supported_mouse_modes",
        "current_mouse_mode",
        "agent_connected",
        "agent_tokens",
        "multi_media_time",
        "ram_hint",
    ]
    init = m.decode_server_message(ChannelType.MAIN, 103, struct.pack("<8I", *range(1, 9)))
    assert isinstance(init, m.MainInit)
    assert (init.session_id, init.ram_hint) == (1, 8)
