"""In-memory server side of the SPICE link, for codec and state-machine tests (no sockets)."""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from spice_libvirt.spice.constants import CommonCap, MainCap
from spice_libvirt.spice.framing import encode_frame
from spice_libvirt.spice.link import LinkReply
from spice_libvirt.spice.messages import Message, message_type

SERVER_COMMON = frozenset(
    {CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.AUTH_SPICE, CommonCap.MINI_HEADER}
)
SERVER_MAIN = frozenset({MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE})


@functools.cache
def server_key() -> rsa.RSAPrivateKey:
    """One RSA-1024 key per test session: generating one per link is what spice-server does,
    but it costs tens of milliseconds."""
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def pub_key_der() -> bytes:
    return (
        server_key()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def decrypt_ticket(ciphertext: bytes) -> bytes:
    return server_key().decrypt(
        ciphertext,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    )


def link_reply_bytes(
    common: frozenset[int] = SERVER_COMMON, channel: frozenset[int] = SERVER_MAIN, error: int = 0
) -> bytes:
    return LinkReply(error, pub_key_der(), common, channel).encode()


def server_frame(message: Message, *, mini: bool = True, serial: int = 1) -> bytes:
    return encode_frame(message_type(message), message.encode_body(), mini=mini, serial=serial)
