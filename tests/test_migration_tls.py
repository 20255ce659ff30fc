"""Migration TLS decided from this host's own set-up, and the agent's peers over TLS
(without a lab; the wire itself is checked in ``tests/test_transport.py``)."""

from __future__ import annotations

from pathlib import Path

from spice_libvirt.agent.settings import AgentSettings
from spice_libvirt.libvirt.migration_tls import (
    MigrationTls,
    decide,
    is_local,
    migration_tls,
    parse_qemu_conf,
)


def test_qemu_conf_names_the_migration_tls_directory(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    certs = tmp_path / "migrate"
    certs.mkdir()
    conf.write_text(
        '# migrate_tls_x509_cert_dir = "/nowhere"\n'
        f'default_tls_x509_cert_dir = "{tmp_path}/default"\n'
        f'migrate_tls_x509_cert_dir = "{certs}"  # ours\n'
        "migrate_tls_force = 1\n"
    )
    assert parse_qemu_conf(conf.read_text())["migrate_tls_force"] == "1"
    found = migration_tls(conf)
    assert found.cert_dir == certs
    assert found.forced
    assert not found.configured
    assert "client-key.pem" in found.missing
    for name in found.missing:
        (certs / name).write_text("x")
    assert migration_tls(conf).configured
    conf.write_text("")
    assert migration_tls(conf).cert_dir == Path("/etc/pki/qemu")
    unreadable = migration_tls(tmp_path / "absent.conf")
    assert unreadable.unknown is not None
    assert not unreadable.configured


def test_migration_tls_on_where_this_host_is_set_up_else_said_why() -> None:
    ready = MigrationTls(Path("/etc/pki/qemu"))
    bare = MigrationTls(Path("/etc/pki/qemu"), missing=("ca-cert.pem",))
    assert decide(None, "qemu:///system", ready)[0] is True
    use, why = decide(None, "qemu:///system", bare)
    assert use is False
    assert "clear text" in why
    assert "ca-cert.pem" in why
    assert decide(None, "qemu:///system", MigrationTls(Path("/x"), ("a",), forced=True))[0]
    use, why = decide(None, "qemu+ssh://hv1/system", ready)
    assert use is False
    assert "not this host" in why
    assert decide(True, "qemu+ssh://hv1/system", bare)[0] is True
    assert decide(False, "qemu:///system", ready)[0] is False
    assert is_local("qemu+unix:///system?socket=/run/x/libvirt-sock")
    assert not is_local("qemu+tls://hostB/system")


def test_the_agent_reaches_its_peers_over_tls_by_default() -> None:
    assert AgentSettings().destination_uri == "qemu+tls://{peer}/system"
