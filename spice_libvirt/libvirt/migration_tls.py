"""Is this host set up to encrypt the guest's memory in a migration (``VIR_MIGRATE_TLS``)?

libvirt moves guest memory in clear text unless the migration asks for TLS (the
``VIR_MIGRATE_TLS`` flag, ``virsh migrate --tls``), and it can only do so with the x509
files in the directory ``qemu.conf`` names: ``migrate_tls_x509_cert_dir``, else
``default_tls_x509_cert_dir`` (``/etc/pki/qemu``). A host that migrates both ways needs the
CA, the server pair (it receives) and the client pair (it sends: ``migrate_tls_x509_verify``
defaults to on, so the destination asks the source for its certificate).
``migrate_tls_force = 1`` makes libvirt refuse every migration without the flag.

:func:`migration_tls` reads that from ``qemu.conf`` (root-only on Debian); the controller
asks for TLS by default where this host is set up for it (:func:`decide`), and ``doctor``
reports it. The destination is not readable from here: if it lacks the files, libvirt
refuses in its Prepare phase and nothing moves.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from pathlib import Path

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_TLS_CERT_DIR = "/etc/pki/qemu"
#: what a host that migrates both ways needs in the directory
TLS_FILES = (
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
)


@dataclasses.dataclass(frozen=True)
class MigrationTls:
    """This host's migration TLS set-up, as ``qemu.conf`` and its directory say."""

    cert_dir: Path
    missing: tuple[str, ...] = ()
    #: ``migrate_tls_force = 1``: libvirt refuses migrations without ``VIR_MIGRATE_TLS``
    forced: bool = False
    #: why nothing could be said (qemu.conf unreadable); None: it was read
    unknown: str | None = None

    @property
    def configured(self) -> bool:
        return self.unknown is None and not self.missing

    def describe(self) -> str:
        if self.unknown is not None:
            return f"migration TLS unknown ({self.unknown})"
        if self.missing:
            return f"migration TLS not set up: {self.cert_dir} lacks {', '.join(self.missing)}"
        forced = "; migrate_tls_force = 1" if self.forced else ""
        return f"migration TLS set up ({self.cert_dir}{forced})"


def parse_qemu_conf(text: str) -> dict[str, str]:
    """libvirt's ``key = value`` lines (strings in double quotes, numbers bare); comments
    and lists are skipped -- only scalar keys are looked up here."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        key, eq, value = raw.split("#", 1)[0].strip().partition("=")
        if not eq or not key.strip().isidentifier():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        values[key.strip()] = value
    return values


def migration_tls(qemu_conf: Path = QEMU_CONF) -> MigrationTls:
    """This host's set-up (never raises: what could not be read is ``unknown``)."""
    try:
        conf = parse_qemu_conf(qemu_conf.read_text(errors="replace"))
    except OSError as exc:
        return MigrationTls(
            Path(DEFAULT_TLS_CERT_DIR), unknown=f"{qemu_conf}: {exc.strerror or exc}"
        )
    cert_dir = Path(
        conf.get("migrate_tls_x509_cert_dir")
        or conf.get("default_tls_x509_cert_dir")
        or DEFAULT_TLS_CERT_DIR
    )
    missing = tuple(name for name in TLS_FILES if not (cert_dir / name).is_file())
    return MigrationTls(cert_dir, missing, forced=conf.get("migrate_tls_force", "0") == "1")


def is_local(uri: str) -> bool:
    """The libvirt URI names this host's own libvirtd (no host part, or localhost)."""
    host = urllib.parse.urlsplit(uri).hostname
    return host in (None, "", "localhost", "127.0.0.1", "::1")


def decide(
    asked: bool | None, source_uri: str, local: MigrationTls | None = None
) -> tuple[bool, str]:
    """Whether to ask for ``VIR_MIGRATE_TLS``, and why (the report's note).

    ``asked``: the operator's explicit choice (``--migrate-tls``/``--no-migrate-tls``);
    None: on where this host -- the source, when the controller runs on it -- is set up
    for it (or forces it), off elsewhere, saying so.
    """
    if asked is True:
        return True, "guest memory encrypted: VIR_MIGRATE_TLS asked for (--migrate-tls)"
    if asked is False:
        return False, "guest memory in clear text: migration TLS declined (--no-migrate-tls)"
    if not is_local(source_uri):
        return False, (
            f"guest memory in clear text: the source {source_uri} is not this host, so its "
            "migration TLS is not known here (--migrate-tls asks for it)"
        )
    tls = local if local is not None else migration_tls()
    if tls.configured or tls.forced:
        return True, f"guest memory encrypted: VIR_MIGRATE_TLS, {tls.describe()}"
    return False, (
        f"guest memory in clear text: {tls.describe()} (set it up on every host, or "
        "--migrate-tls / --no-migrate-tls to choose)"
    )


__all__ = [
    "DEFAULT_TLS_CERT_DIR",
    "QEMU_CONF",
    "TLS_FILES",
    "MigrationTls",
    "decide",
    "is_local",
    "migration_tls",
    "parse_qemu_conf",
]
