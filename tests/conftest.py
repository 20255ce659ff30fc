"""Fixtures the whole suite shares: QEMU processes, TLS material and the Linux guest.

Everything here cleans up after itself even when a test fails: every QEMU a test started
through ``qemu_factory`` is stopped by PID at teardown, and per-test directories live under
a fresh, short temp dir (unix socket paths must stay under 108 bytes, which pytest's own
``tmp_path`` names can exceed).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from spice_libvirt.lab.guest import GuestImages, ensure_linux_guest, kvm_usable
from spice_libvirt.lab.qemu import QemuGroup
from spice_libvirt.lab.tls import TlsMaterial, generate_tls_material


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """A short, private work directory under /tmp, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="sl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def qemu_factory(lab_dir: Path) -> AsyncIterator[QemuGroup]:
    """``await qemu_factory(name, **spec_fields)`` -> a running QemuInstance.

    Every instance it started is stopped at teardown, also when the test failed.
    """
    group = QemuGroup(lab_dir)
    try:
        yield group
    finally:
        await group.stop_all()


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A CA and a server certificate for 127.0.0.1/::1/localhost (x509-dir layout)."""
    return generate_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The built Linux guest (built on first use into the user cache, then reused)."""
    return ensure_linux_guest()


@pytest.fixture
def require_kvm() -> None:
    """Skip the test on hosts where /dev/kvm cannot be used."""
    if not kvm_usable():
        pytest.skip("/dev/kvm is not usable on this host")


# --------------------------------------------------------------------------- SPICE link probe
# A deliberately tiny SPICE client: just enough of the link handshake (header, LinkMess,
# LinkReply, auth mechanism, RSA-OAEP ticket) to prove what a server accepts. The lab tests
# use it to check QEMU's SPICE set-ups without depending on the project's full client.

_SPICE_MAGIC = b"REDQ"
_CHANNEL_MAIN = 1
_CAP_AUTH_SELECTION = 1 << 0
_CAP_MINI_HEADER = 1 << 3
_AUTH_SPICE = 1


async def spice_link_result(
    host: str,
    port: int,
    password: str | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 5.0,
) -> int:
    """Link a MAIN channel and return the server's final SpiceLinkErr (0 = accepted)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ssl_context, server_hostname=server_hostname),
        timeout,
    )
    try:
        mess = struct.pack("<IBBIII", 0, _CHANNEL_MAIN, 0, 1, 0, 18)
        mess += struct.pack("<I", _CAP_AUTH_SELECTION | _CAP_MINI_HEADER)
        writer.write(struct.pack("<4sIII", _SPICE_MAGIC, 2, 2, len(mess)) + mess)
        header = await asyncio.wait_for(reader.readexactly(16), timeout)
        magic, major, _minor, size = struct.unpack("<4sIII", header)
        assert magic == _SPICE_MAGIC, header
        assert major == 2, header
        body = await asyncio.wait_for(reader.readexactly(size), timeout)
        (error,) = struct.unpack_from("<I", body, 0)
        if error:
            return int(error)
        public_key = serialization.load_der_public_key(body[4:166])
        assert isinstance(public_key, rsa.RSAPublicKey)
        ticket = public_key.encrypt(
            (password or "").encode() + b"\0",
            padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
        )
        writer.write(struct.pack("<I", _AUTH_SPICE) + ticket)
        (result,) = struct.unpack("<I", await asyncio.wait_for(reader.readexactly(4), timeout))
        return int(result)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


SpiceLinkProbe = Callable[..., Awaitable[int]]


@pytest.fixture
def spice_link() -> SpiceLinkProbe:
    """:func:`spice_link_result`: ``await spice_link(host, port, password, ssl_context=...)``."""
    return spice_link_result
