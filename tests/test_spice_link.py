"""Byte-for-byte checks of the link handshake against the layouts in spice-protocol."""

from __future__ import annotations

import struct

import pytest

from spice_libvirt.errors import LocalProtocolError, RemoteProtocolError
from spice_libvirt.spice.constants import (
    ChannelType,
    CommonCap,
    MainCap,
    caps_to_words,
    words_to_caps,
)
from spice_libvirt.spice.link import LinkHeader, LinkMess, LinkReply, encrypt_ticket
from tests.spice_helpers import decrypt_ticket, link_reply_bytes, pub_key_der


def test_link_mess_bytes_match_spice_gtk_layout() -> None:
    mess = LinkMess(
        0,
        ChannelType.MAIN,
        0,
        frozenset({CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER}),
        frozenset(MainCap),
    )
    expected = bytes.fromhex(
        "52454451"
        "02000000"
        "02000000"
        "1a000000"  # REDQ, 2.2, size 18 + 8
        "00000000"
        "01"
        "00"
        "01000000"
        "01000000"
        "12000000"  # conn 0, main:0, 1+1 words, @18
        "09000000"
        "0f000000"  # common AUTH_SELECTION|MINI_HEADER, main all four
    )
    assert mess.encode() == expected
    assert LinkMess.decode(expected[16:]) == mess


def test_link_mess_with_session_id_and_no_caps() -> None:
    data = LinkMess(0xDEADBEEF, ChannelType.PORT, 3).encode()
    assert data[16:] == struct.pack("<IBBIII", 0xDEADBEEF, 10, 3, 0, 0, 18)
    assert data[12:16] == b"\x12\x00\x00\x00"


def test_link_reply_layout_and_caps() -> None:
    raw = link_reply_bytes()
    header = LinkHeader.decode(raw[:16])
    assert (header.major, header.minor, header.size) == (2, 2, 178 + 8)
    body = raw[16:]
    assert body[:4] == b"\0\0\0\0"
    assert body[4:166] == pub_key_der()
    assert struct.unpack_from("<III", body, 166) == (1, 1, 178)
    assert struct.unpack_from("<II", body, 178) == (0x0B, 0x09)
    reply = LinkReply.decode(body)
    assert reply.common_caps == {0, 1, 3}
    assert reply.channel_caps == {MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE}


def test_link_reply_error_only_body() -> None:
    body = struct.pack("<I", 7) + bytes(174)
    reply = LinkReply.decode(body)
    assert reply.error == 7
    assert reply.common_caps == frozenset()
    assert LinkReply.decode(struct.pack("<I", 5)).error == 5


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"HTTP" + struct.pack("<III", 2, 2, 20), "bad link magic"),
        (b"REDQ" + struct.pack("<III", 1, 0, 20), "version mismatch"),
        (b"REDQ" + struct.pack("<III", 2, 2, 5000), "outside"),
        (b"REDQ" + struct.pack("<III", 2, 2, 2), "outside"),
    ],
)
def test_link_header_rejects_garbage(header: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        LinkHeader.decode(header)


def test_link_reply_caps_outside_body_rejected() -> None:
    body = bytearray(link_reply_bytes()[16:])
    struct.pack_into("<I", body, 166, 900)  # 900 common words cannot fit
    with pytest.raises(RemoteProtocolError, match="exceed"):
        LinkReply.decode(bytes(body))
    struct.pack_into("<I", body, 166, 5000)
    with pytest.raises(RemoteProtocolError, match="capability words"):
        LinkReply.decode(bytes(body))


def test_truncated_success_reply_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="shorter"):
        LinkReply.decode(bytes(40))


def test_ticket_is_oaep_sha1_of_password_and_nul() -> None:
    ciphertext = encrypt_ticket(pub_key_der(), "s3cret")
    assert len(ciphertext) == 128
    assert decrypt_ticket(ciphertext) == b"s3cret\0"


def test_empty_password_still_encrypts_a_nul() -> None:
    assert decrypt_ticket(encrypt_ticket(pub_key_der(), None)) == b"\0"
    assert decrypt_ticket(encrypt_ticket(pub_key_der(), "")) == b"\0"


def test_password_longer_than_60_refused_locally() -> None:
    with pytest.raises(LocalProtocolError, match="at most 60"):
        encrypt_ticket(pub_key_der(), "x" * 61)
    assert len(encrypt_ticket(pub_key_der(), "x" * 60)) == 128


def test_garbage_public_key_is_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError, match="public key"):
        encrypt_ticket(b"\x30\x03garbage" + bytes(150), "pw")


def test_caps_words_round_trip() -> None:
    assert caps_to_words({0, 3}) == [9]
    assert caps_to_words({33}) == [0, 2]
    assert words_to_caps([9, 2]) == {0, 3, 33}
    assert caps_to_words(set()) == []
