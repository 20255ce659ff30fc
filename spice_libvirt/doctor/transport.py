"""What this host encrypts on the wire between hypervisors: migration TLS (read-only)."""

from __future__ import annotations

from pathlib import Path

from spice_libvirt.doctor.model import Check, fail, ok, skip, warn
from spice_libvirt.libvirt.migration_tls import QEMU_CONF, TLS_FILES, migration_tls


def check_migration_tls(qemu_conf: Path = QEMU_CONF) -> Check:
    """Is the guest's memory encrypted when it leaves or reaches this host? ``migrate`` and
    ``evacuate`` ask for ``VIR_MIGRATE_TLS`` by default exactly when this says ok."""
    name = "migration-tls"
    tls = migration_tls(qemu_conf)
    if tls.unknown is not None:
        return skip(name, f"{tls.describe()}: run doctor as root to read it")
    if tls.configured:
        return ok(name, f"{tls.describe()}: migrate and evacuate encrypt the guest's memory")
    fix = (
        f"install {', '.join(TLS_FILES)} into {tls.cert_dir} (qemu.conf's "
        "migrate_tls_x509_cert_dir or default_tls_x509_cert_dir) on every host"
    )
    if tls.forced:
        return fail(
            name, f"{tls.describe()}, yet migrate_tls_force = 1: every migration fails", fix
        )
    return warn(name, f"{tls.describe()}: the guest's memory moves in clear text", fix)
