"""The lab's TLS material: it verifies with Python's ssl, and QEMU's spice-server serves it."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from spice_libvirt.errors import LabError
from spice_libvirt_lab.qemu_process import QemuGroup
from spice_libvirt_lab.tls import (
    TlsMaterial,
    generate_tls_material,
    issue_server_certificate,
    load_tls_material,
)

SpiceLink = Callable[..., Awaitable[int]]


def _handshake(material: TlsMaterial, cafile: Path, server_hostname: str) -> ssl.SSLObject:
    """A full TLS handshake in memory: our server context against a verifying client."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(material.server_cert, material.server_key)
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return client
    raise AssertionError("TLS handshake did not finish")


def test_files_and_subject(tls_material: TlsMaterial) -> None:
    for path in (tls_material.ca_cert, tls_material.server_cert, tls_material.server_key):
        assert path.parent == tls_material.directory
    assert [p.name for p in (tls_material.ca_cert, tls_material.server_cert)] == [
        "ca-cert.pem",
        "server-cert.pem",
    ]
    assert tls_material.server_key.name == "server-key.pem"
    assert tls_material.subject == "C=XX,O=spice-libvirt lab,CN=localhost"
    # spice-server cannot ask for a passphrase: the key must be unencrypted, and private.
    key = serialization.load_pem_private_key(tls_material.server_key.read_bytes(), password=None)
    assert key.key_size >= 2048  # type: ignore[union-attr]
    assert stat.S_IMODE(tls_material.server_key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(tls_material.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", "::1"])
def test_server_cert_verifies_against_ca(tls_material: TlsMaterial, server_hostname: str) -> None:
    client = _handshake(tls_material, tls_material.ca_cert, server_hostname)
    peer = client.getpeercert()
    assert peer is not None
    assert ((("commonName", "localhost"),)) in peer["subject"]


def test_wrong_host_and_foreign_ca_fail(tls_material: TlsMaterial, tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(tls_material, tls_material.ca_cert, "10.9.9.9")
    other = generate_tls_material(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(tls_material, other.ca_cert, "localhost")


def test_second_server_under_same_ca(tls_material: TlsMaterial, tmp_path: Path) -> None:
    dst = issue_server_certificate(
        tmp_path / "dst", ca_dir=tls_material.directory, common_name="dst.lab", hosts=["dst.lab"]
    )
    assert dst.subject == "C=XX,O=spice-libvirt lab,CN=dst.lab"
    assert dst.ca_cert.read_bytes() == tls_material.ca_cert.read_bytes()
    assert not (dst.directory / "ca-key.pem").exists()  # the CA key stays where it was
    _handshake(dst, tls_material.ca_cert, "dst.lab")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(dst, tls_material.ca_cert, "localhost")


def test_regenerating_keeps_the_ca(tmp_path: Path) -> None:
    first = generate_tls_material(tmp_path)
    ca_before = first.ca_cert.read_bytes()
    cert_before = first.server_cert.read_bytes()
    second = generate_tls_material(tmp_path, common_name="again")
    assert second.ca_cert.read_bytes() == ca_before
    assert second.server_cert.read_bytes() != cert_before
    _handshake(second, first.ca_cert, "localhost")


def test_load_existing_material(tls_material: TlsMaterial, tmp_path: Path) -> None:
    loaded = load_tls_material(tls_material.directory)
    assert loaded.subject == tls_material.subject
    assert set(loaded.hosts) == {"127.0.0.1", "::1", "localhost"}
    with pytest.raises(LabError, match=r"server-cert\.pem"):
        load_tls_material(tmp_path)


def test_subject_escaping(tmp_path: Path) -> None:
    material = generate_tls_material(tmp_path, organization="ACME, Inc.", common_name="a=b")
    assert material.subject == "C=XX,O=ACME\\, Inc.,CN=a\\=b"
    with pytest.raises(LabError, match="two-letter"):
        generate_tls_material(tmp_path / "bad", country="XYZ")


@pytest.mark.qemu
async def test_qemu_serves_the_material(
    qemu_factory: QemuGroup, tls_material: TlsMaterial, spice_link: SpiceLink
) -> None:
    """spice-server 0.15 takes the three files as written (no dh.pem, PKCS#8 key)."""
    vm = await qemu_factory("tls", tls_dir=tls_material.directory)
    assert vm.spice_tls_port is not None
    ctx = ssl.create_default_context(cafile=str(tls_material.ca_cert))
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", vm.spice_tls_port, ssl=ctx), 5
    )
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True)
    served = x509.load_der_x509_certificate(der)
    ours = x509.load_pem_x509_certificate(tls_material.server_cert.read_bytes())
    assert served == ours
    version = sslobj.version()
    writer.close()
    await writer.wait_closed()
    assert version in ("TLSv1.2", "TLSv1.3")
    # And SPICE itself links over it, with verification by IP address.
    assert await spice_link("127.0.0.1", vm.spice_tls_port, ca_file=tls_material.ca_cert) == 0
    assert "dh" not in vm.log_tail().lower()


# --- safe files ------------------------------------------------------------------------


def test_key_files_are_private_and_written_through_no_symlink(tmp_path: Path) -> None:
    """Keys 0600 (the CA key too), certificates 0644; a planted symlink is replaced, not
    followed, and a planted file is never written into in place."""
    directory = tmp_path / "tls"
    directory.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (directory / "server-key.pem").symlink_to(victim)
    (directory / "ca-key.pem").symlink_to(victim)  # a dangling pair: no CA to reuse
    material = generate_tls_material(directory, reuse_ca=False)
    assert victim.read_text() == "precious\n"
    for key in (material.ca_key, material.server_key):
        st = key.lstat()
        assert stat.S_ISREG(st.st_mode), key
        assert stat.S_IMODE(st.st_mode) == 0o600, key
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    for cert in (material.ca_cert, material.server_cert):
        assert stat.S_IMODE(cert.lstat().st_mode) == 0o644
    # a second server certificate into the same directory replaces the files atomically
    inode = material.server_key.stat().st_ino
    again = generate_tls_material(directory)
    assert again.server_key.stat().st_ino != inode
    assert stat.S_IMODE(again.server_key.stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == [
        "ca-cert.pem", "ca-key.pem", "server-cert.pem", "server-key.pem",
    ]  # fmt: skip


def test_tls_directory_must_be_ours_and_real(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(LabError, match="not a plain directory"):
        generate_tls_material(link)
    assert list(real.iterdir()) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    if os.geteuid() == 0:  # only root can make a directory that is not its own
        with pytest.raises(LabError, match="belongs to uid 65534"):
            generate_tls_material(foreign)
    fresh = tmp_path / "fresh" / "tls"
    generate_tls_material(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
