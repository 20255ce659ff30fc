"""The link handshake, one per TCP connection: structures and ticket encryption.

Pure functions over bytes. The sequence (client's view)::

    -> SpiceLinkHeader + SpiceLinkMess + caps
    <- SpiceLinkHeader + SpiceLinkReply + caps
    -> u32 auth mechanism          (only if the server advertised AUTH_SELECTION)
    -> 128-byte RSA-OAEP ticket
    <- u32 link result

Everything the peer sends is checked against the layout before it is trusted; a violation
raises :class:`~spice_libvirt.errors.RemoteProtocolError` and never allocates beyond
:data:`~spice_libvirt.spice.constants.LINK_MESSAGE_MAX`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from spice_libvirt.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from spice_libvirt.spice.constants import (
    LINK_MAGIC,
    LINK_MESSAGE_MAX,
    MAX_PASSWORD_LENGTH,
    PUB_KEY_SIZE,
    TICKET_CIPHERTEXT_SIZE,
    VERSION_MAJOR,
    VERSION_MINOR,
    CommonCap,
    caps_to_words,
    words_to_caps,
)

LINK_HEADER = struct.Struct("<4sIII")
LINK_MESS = struct.Struct("<IBBIII")
LINK_REPLY_FIXED = struct.Struct(f"<I{PUB_KEY_SIZE}sIII")
U32 = struct.Struct("<I")

#: Most capability words either side may announce (spice-server accepts up to 1024; nobody
#: uses more than one or two, and a bound keeps a hostile count from costing memory).
MAX_CAPS_WORDS = 1024


@dataclass(frozen=True, slots=True)
class LinkHeader:
    major: int
    minor: int
    size: int

    def encode(self) -> bytes:
        return LINK_HEADER.pack(LINK_MAGIC, self.major, self.minor, self.size)

    @classmethod
    def decode(cls, data: bytes) -> LinkHeader:
        """Parse and validate the 16-byte header of the server's link reply."""
        if len(data) != LINK_HEADER.size:
            raise LocalProtocolError(f"link header needs {LINK_HEADER.size} bytes, got {len(data)}")
        magic, major, minor, size = LINK_HEADER.unpack(data)
        if magic != LINK_MAGIC:
            raise RemoteProtocolError(f"not a SPICE server: bad link magic {magic!r}")
        if major != VERSION_MAJOR:
            raise RemoteProtocolError(
                f"SPICE protocol version mismatch: server speaks {major}.{minor}, "
                f"we speak {VERSION_MAJOR}.{VERSION_MINOR}"
            )
        if size < U32.size or size > LINK_MESSAGE_MAX:
            raise RemoteProtocolError(f"link reply size {size} outside [4, {LINK_MESSAGE_MAX}]")
        return cls(major, minor, size)


@dataclass(frozen=True, slots=True)
class LinkMess:
    """What the client asks for: a channel, in a session, with these capabilities."""

    connection_id: int
    channel_type: int
    channel_id: int
    common_caps: frozenset[int] = field(default_factory=frozenset)
    channel_caps: frozenset[int] = field(default_factory=frozenset)

    def encode(self) -> bytes:
        """Header + SpiceLinkMess + caps, ready for the wire."""
        common = caps_to_words(self.common_caps)
        channel = caps_to_words(self.channel_caps)
        body = LINK_MESS.pack(
            self.connection_id,
            self.channel_type,
            self.channel_id,
            len(common),
            len(channel),
            LINK_MESS.size,
        )
        body += b"".join(U32.pack(word) for word in common + channel)
        return LinkHeader(VERSION_MAJOR, VERSION_MINOR, len(body)).encode() + body

    @classmethod
    def decode(cls, body: bytes) -> LinkMess:
        """Parse a SpiceLinkMess (the part after the link header); used by test servers."""
        if len(body) < LINK_MESS.size:
            raise RemoteProtocolError(f"link message of {len(body)} bytes is shorter than 18")
        conn, ctype, cid, n_common, n_channel, offset = LINK_MESS.unpack_from(body)
        common, channel = _read_caps(body, offset, n_common, n_channel, "link message")
        return cls(conn, ctype, cid, common, channel)


@dataclass(frozen=True, slots=True)
class LinkReply:
    """The server's answer: an error code or a public key plus its capabilities."""

    error: int
    pub_key: bytes
    common_caps: frozenset[int]
    channel_caps: frozenset[int]

    @classmethod
    def decode(cls, body: bytes) -> LinkReply:
        if len(body) < U32.size:
            raise RemoteProtocolError("link reply is empty")
        if len(body) < LINK_REPLY_FIXED.size:
            # spice-server sends the full zeroed struct with errors; a shorter body is only
            # acceptable when it carries an error code.
            (error,) = U32.unpack_from(body)
            if error == 0:
                raise RemoteProtocolError(
                    f"link reply of {len(body)} bytes is shorter than {LINK_REPLY_FIXED.size}"
                )
            return cls(error, b"", frozenset(), frozenset())
        error, pub_key, n_common, n_channel, offset = LINK_REPLY_FIXED.unpack_from(body)
        if error != 0:
            return cls(error, pub_key, frozenset(), frozenset())
        common, channel = _read_caps(body, offset, n_common, n_channel, "link reply")
        return cls(error, pub_key, common, channel)

    def encode(self) -> bytes:
        """Header + SpiceLinkReply + caps; used by test servers and round-trip tests."""
        if len(self.pub_key) != PUB_KEY_SIZE:
            raise LocalProtocolError(f"pub_key must be {PUB_KEY_SIZE} bytes")
        common = caps_to_words(self.common_caps)
        channel = caps_to_words(self.channel_caps)
        body = LINK_REPLY_FIXED.pack(
            self.error, self.pub_key, len(common), len(channel), LINK_REPLY_FIXED.size
        )
        body += b"".join(U32.pack(word) for word in common + channel)
        return LinkHeader(VERSION_MAJOR, VERSION_MINOR, len(body)).encode() + body


def _read_caps(
    body: bytes, offset: int, n_common: int, n_channel: int, what: str
) -> tuple[frozenset[int], frozenset[int]]:
    if n_common > MAX_CAPS_WORDS or n_channel > MAX_CAPS_WORDS:
        raise RemoteProtocolError(f"{what} announces {n_common}+{n_channel} capability words")
    end = offset + 4 * (n_common + n_channel)
    if offset < 0 or end > len(body):
        raise RemoteProtocolError(
            f"{what} capabilities at {offset}..{end} exceed {len(body)} bytes"
        )
    words = struct.unpack_from(f"<{n_common + n_channel}I", body, offset)
    return words_to_caps(words[:n_common]), words_to_caps(words[n_common:])


def encode_auth_mechanism(mechanism: int = CommonCap.AUTH_SPICE) -> bytes:
    """The u32 SpiceLinkAuthMechanism: the common-cap bit number of the chosen method."""
    return U32.pack(mechanism)


def encrypt_ticket(pub_key_der: bytes, password: str | None) -> bytes:
    """RSA-OAEP(SHA-1) of ``password + NUL`` under the link's public key.

    An absent password still needs a valid ciphertext (of a lone NUL): spice-server always
    decrypts, even with ticketing disabled, and answers PERMISSION_DENIED when that fails.
    """
    secret = (password or "").encode("utf-8")
    if len(secret) > MAX_PASSWORD_LENGTH:
        raise LocalProtocolError(f"SPICE passwords are at most {MAX_PASSWORD_LENGTH} bytes")
    # Imported here, not at the top: only a linking client needs RSA, and hypervisors that
    # run just the hook and the libvirt controller install without the ``client`` extra.
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.hazmat.primitives.serialization import load_der_public_key
    except ImportError as exc:
        raise ConfigError(
            "the embedded SPICE client needs the 'cryptography' package:"
            " pip install 'spice-libvirt[client]'"
        ) from exc
    try:
        key = load_der_public_key(pub_key_der)
    except ValueError as exc:
        raise RemoteProtocolError("link reply carries an unreadable public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise RemoteProtocolError("link reply carries a non-RSA public key")
    oaep = padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None
    )
    try:
        ciphertext = key.encrypt(secret + b"\0", oaep)
    except ValueError as exc:
        raise RemoteProtocolError(f"server key too small for the ticket: {exc}") from exc
    if len(ciphertext) != TICKET_CIPHERTEXT_SIZE:
        raise RemoteProtocolError(
            f"server key gives a {len(ciphertext)}-byte ticket, spice-server reads 128"
        )
    return ciphertext


def decode_link_result(data: bytes) -> int:
    if len(data) != U32.size:
        raise LocalProtocolError("link result is a u32")
    (code,) = U32.unpack(data)
    return int(code)
