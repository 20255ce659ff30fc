"""X.509 material for SPICE over TLS in the lab: a CA and server certificates.

spice-server (through QEMU's ``-spice x509-dir=DIR``) reads three PEM files with fixed
names from one directory: ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``. The
key must be unencrypted unless ``x509-key-password`` is passed, which the lab never does.
QEMU 7.2 hands spice-server a DH parameter file only when ``x509-dh-key-file`` is given;
without one, spice-server 0.15 negotiates ECDHE (checked here: TLS 1.3 with
TLS_AES_256_GCM_SHA384, and TLS 1.2 with ECDHE-RSA-AES256-GCM-SHA384 when the client caps
the version), so no DH parameters are written.

Clients verify the server in one of two ways, and the lab must serve both:

* by host name / IP address against the subjectAltName (Python's :mod:`ssl`, our client);
* by the full subject DN, which QEMU's ``client_migrate_info cert-subject=`` hands to the
  client for the destination, and spice-gtk takes as ``--spice-host-subject``. spice-gtk
  parses that string as comma-separated ``KEY=VALUE`` pairs *in the order of the
  certificate's RDNs* and compares the encoded names, so :attr:`TlsMaterial.subject` is
  written in that order ("C=XX,O=spice-libvirt lab,CN=localhost"), not in RFC 4514's
  reversed order.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel

from spice_libvirt.errors import LabError

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
SERVER_CERT_FILE = "server-cert.pem"
SERVER_KEY_FILE = "server-key.pem"
CLIENT_CERT_FILE = "client-cert.pem"
CLIENT_KEY_FILE = "client-key.pem"

DEFAULT_COUNTRY = "XX"
DEFAULT_ORGANIZATION = "spice-libvirt lab"

#: RSA keeps every SPICE client happy (old spice-gtk builds included); 2048 bits is the
#: smallest size current OpenSSL security levels accept.
_KEY_BITS = 2048
_VALIDITY = datetime.timedelta(days=30)
#: Backdate notBefore so that a guest or peer with a slightly late clock accepts the cert.
_BACKDATE = datetime.timedelta(hours=1)

_SUBJECT_KEYS = {
    NameOID.COUNTRY_NAME: "C",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.COMMON_NAME: "CN",
}


class TlsMaterial(BaseModel):
    """Where the PEM files are, and the server's subject in the form SPICE tools expect."""

    directory: Path
    ca_cert: Path
    #: the CA's private key (may live in another directory than the server files; may be
    #: absent for material made elsewhere)
    ca_key: Path
    server_cert: Path
    server_key: Path
    #: "C=XX,O=spice-libvirt lab,CN=localhost": for ``client_migrate_info cert-subject``
    #: and spice-gtk ``--spice-host-subject``
    subject: str
    #: the host names and IP addresses in the server certificate's subjectAltName
    hosts: list[str]


def _escape(value: str) -> str:
    # spice-common's subject parser splits on ',' and '=' and honours '\' as escape.
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


def subject_string(name: x509.Name) -> str:
    """Render ``name`` as "C=..,O=..,CN=.." in certificate order (see module docstring)."""
    parts = []
    for attribute in name:
        key = _SUBJECT_KEYS.get(attribute.oid)
        if key is None:
            raise LabError(f"unsupported subject attribute {attribute.oid.dotted_string}")
        value = attribute.value
        if not isinstance(value, str):
            raise LabError("subject attribute values must be text")
        parts.append(f"{key}={_escape(value)}")
    return ",".join(parts)


def _name(common_name: str, organization: str, country: str | None) -> x509.Name:
    """C (if any), O, CN in that order; without a country as oVirt's host certificates
    ("O=lab,CN=hostA") are issued."""
    attributes = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ]
    if country is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    return x509.Name(attributes)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole, through a new file that nobody can have prepared for us.

    The data goes to a fresh name opened ``O_CREAT|O_EXCL|O_NOFOLLOW`` (so neither a
    planted file nor a symlink there is ever written through), gets exactly ``mode``
    before the first byte, and is renamed over ``path``: a rename replaces a symlink at the
    destination instead of following it, and readers never see half a key.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask can only have removed bits; be exact anyway
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_private(path: Path, data: bytes) -> None:
    _write_file(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_file(path, data, 0o644)


def _own_directory(directory: Path) -> None:
    """Create ``directory`` (0700) or accept an existing one only if it is really ours.

    Keys are written into it: a directory that is a symlink or belongs to someone else
    could hand them to that someone.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise LabError(f"TLS directory {directory} is not a plain directory")
    if st.st_uid != os.geteuid():
        raise LabError(f"TLS directory {directory} belongs to uid {st.st_uid}, not to us")


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
    key = serialization.load_pem_private_key((directory / CA_KEY_FILE).read_bytes(), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise LabError(f"{directory / CA_KEY_FILE} is not an RSA key")
    return cert, key


def _new_ca(organization: str, country: str | None) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    name = _name(f"{organization} CA", organization, country)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def generate_tls_material(
    directory: Path,
    *,
    common_name: str = "localhost",
    hosts: list[str] | None = None,
    organization: str = DEFAULT_ORGANIZATION,
    country: str | None = DEFAULT_COUNTRY,
    reuse_ca: bool = True,
) -> TlsMaterial:
    """Write a CA (unless one is already there) and a fresh server certificate into ``directory``.

    ``hosts`` go into the subjectAltName (default: 127.0.0.1, ::1 and localhost). With
    ``reuse_ca`` an existing ``ca-cert.pem``/``ca-key.pem`` pair in ``directory`` signs the
    new server certificate; a second server under the same CA (another subject, for
    instance) comes from :func:`issue_server_certificate`.
    """
    if reuse_ca and (directory / CA_CERT_FILE).exists() and (directory / CA_KEY_FILE).exists():
        _own_directory(directory)
    else:
        create_ca(directory, organization=organization, country=country)
    return issue_server_certificate(
        directory,
        ca_dir=directory,
        common_name=common_name,
        hosts=hosts,
        organization=organization,
        country=country,
    )


def _check_country(country: str | None) -> None:
    if country is not None and len(country) != 2:
        raise LabError(f"country must be a two-letter code, got {country!r}")


def create_ca(
    directory: Path,
    *,
    organization: str = DEFAULT_ORGANIZATION,
    country: str | None = DEFAULT_COUNTRY,
) -> Path:
    """A new CA (``ca-cert.pem``, ``ca-key.pem``) in ``directory``; the certificate's path.

    A manager's CA lives apart from the hosts: each host directory then gets a copy of the
    CA certificate only (:func:`issue_server_certificate`), never its key.
    """
    _check_country(country)
    _own_directory(directory)
    ca_cert, ca_key = _new_ca(organization, country)
    _write_public(directory / CA_CERT_FILE, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / CA_KEY_FILE, _key_pem(ca_key))
    return directory / CA_CERT_FILE


def issue_server_certificate(
    directory: Path,
    *,
    ca_dir: Path,
    common_name: str = "localhost",
    hosts: list[str] | None = None,
    organization: str = DEFAULT_ORGANIZATION,
    country: str | None = DEFAULT_COUNTRY,
    client_too: bool = False,
) -> TlsMaterial:
    """Issue a server certificate signed by the CA in ``ca_dir`` into ``directory``.

    ``directory`` gets its own copy of ``ca-cert.pem`` (spice-server wants it there) but
    not of the CA key. Use this for a migration destination that must present a different
    subject than the source while chaining to the same CA. ``client_too``: the certificate
    may also authenticate a TLS client, and goes in as ``client-cert.pem``/``client-key.pem``
    as well (QEMU's migration TLS: a host is the server of incoming migrations and the
    client of outgoing ones).
    """
    _check_country(country)
    hosts = list(hosts) if hosts is not None else ["127.0.0.1", "::1", "localhost"]
    if not hosts:
        raise LabError("a server certificate needs at least one host name or address")
    _own_directory(directory)
    ca_cert, ca_key = _load_ca(ca_dir)
    if directory.resolve() != ca_dir.resolve():
        _write_public(directory / CA_CERT_FILE, ca_cert.public_bytes(serialization.Encoding.PEM))
    key = rsa.generate_private_key(public_exponent=65537, key_size=_KEY_BITS)
    subject = _name(common_name, organization, country)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH]
                + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_too else [])
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_public(directory / SERVER_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / SERVER_KEY_FILE, _key_pem(key))
    if client_too:
        _write_public(directory / CLIENT_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
        _write_private(directory / CLIENT_KEY_FILE, _key_pem(key))
    return TlsMaterial(
        directory=directory,
        ca_cert=directory / CA_CERT_FILE,
        ca_key=ca_dir / CA_KEY_FILE,
        server_cert=directory / SERVER_CERT_FILE,
        server_key=directory / SERVER_KEY_FILE,
        subject=subject_string(subject),
        hosts=hosts,
    )


def load_tls_material(directory: Path) -> TlsMaterial:
    """Describe an existing x509 directory (e.g. one an administrator made with certtool)."""
    try:
        cert = x509.load_pem_x509_certificate((directory / SERVER_CERT_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read {directory / SERVER_CERT_FILE}: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        hosts += san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        hosts = []
    for required in (CA_CERT_FILE, SERVER_KEY_FILE):
        if not (directory / required).exists():
            raise LabError(f"{directory} has no {required}")
    return TlsMaterial(
        directory=directory,
        ca_cert=directory / CA_CERT_FILE,
        ca_key=directory / CA_KEY_FILE,
        server_cert=directory / SERVER_CERT_FILE,
        server_key=directory / SERVER_KEY_FILE,
        subject=subject_string(cert.subject),
        hosts=hosts,
    )
