"""SPICE over TLS in the libvirt lab, the way a manager (oVirt) sets it up on its hosts.

* one lab CA (``<run>/tls-ca``; its key stays there);
* per host a server certificate with a host subject (``O=lab,CN=hostA``), subjectAltName
  the host's name and lab address, in the host's private ``/etc/libvirt/spice-tls``, which
  its ``qemu.conf`` names in ``spice_tls_x509_cert_dir`` next to ``spice_tls = 1``;
* migrations carry the destination's ``tlsPort`` and ``tlsSubject`` in the graphics URI, so
  libvirt's ``client_migrate_info`` tells the client which subject to expect there;
* the guest's memory moves over TLS too (``VIR_MIGRATE_TLS``): each host's
  ``migrate_tls_x509_cert_dir`` holds the CA and its certificate as server and client pair;
* clients (ours, remote-viewer) verify the CA and the subject on every host.

:func:`reissue` replaces one host's certificate by a wrong one (another subject, or another
CA): what a misissued or stale certificate looks like to a client that verifies. libvirt
hands QEMU the directory at each start, so it takes effect with the next QEMU on that host
(the next incoming migration there).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from spice_libvirt.spice.client import ClientOptions
from spice_libvirt_lab.libvirt_host import MIGRATE_TLS_DIR, LibvirtHost
from spice_libvirt_lab.libvirt_state import (
    SPICE_TLS_DIR,
    TLS_LAB_PORT,
    LabState,
    LabTlsState,
    TlsMode,
    load_state,
    locked,
)
from spice_libvirt_lab.libvirt_ticket import lab_ticket
from spice_libvirt_lab.tls import create_ca, issue_server_certificate

#: the organisation of the lab's host certificates ("O=lab,CN=hostA")
ORGANIZATION = "lab"


def host_subject(hostname: str) -> str:
    """The subject a lab host's certificate carries, in certificate order."""
    return f"O={ORGANIZATION},CN={hostname}"


def plan(run_dir: Path, hostnames: dict[str, str], mode: TlsMode) -> LabTlsState:
    """The lab's TLS state before anything is written (``hostnames``: host -> hostname)."""
    ca_dir = run_dir / "tls-ca"
    return LabTlsState(
        mode=mode,
        port=None if mode == "tls-only" else TLS_LAB_PORT,
        ca_dir=ca_dir,
        ca_cert=ca_dir / "ca-cert.pem",
        subjects={name: host_subject(hostname) for name, hostname in hostnames.items()},
    )


def cert_dir(host: LibvirtHost) -> Path:
    """The host's ``spice_tls_x509_cert_dir`` as seen from the root namespace."""
    return host.etc_dir / Path(SPICE_TLS_DIR).relative_to("/etc/libvirt")


def create(state: LabState) -> None:
    """Write the lab CA (once, before any host is prepared)."""
    assert state.tls is not None
    create_ca(state.tls.ca_dir, organization=f"{ORGANIZATION} CA", country=None)


def migrate_cert_dir(host: LibvirtHost) -> Path:
    """The host's ``migrate_tls_x509_cert_dir`` as seen from the root namespace."""
    return host.etc_dir / Path(MIGRATE_TLS_DIR).relative_to("/etc/libvirt")


def issue(state: LabState, name: str) -> None:
    """The host's own certificates into its private cert directories (after ``prepare``):
    SPICE's, and migration TLS's (server and client: ``VIR_MIGRATE_TLS`` both ways)."""
    assert state.tls is not None
    host = state.host(name)
    cfg = host.config
    for directory, client_too in ((cert_dir(host), False), (migrate_cert_dir(host), True)):
        issue_server_certificate(
            directory,
            ca_dir=state.tls.ca_dir,
            common_name=cfg.hostname,
            hosts=[cfg.hostname, cfg.ip],
            organization=ORGANIZATION,
            country=None,
            client_too=client_too,
        )


def reissue(
    lab_dir: Path, name: str, *, common_name: str | None = None, foreign_ca: bool = False
) -> str:
    """Replace host ``name``'s certificate: another ``common_name`` (a wrong subject), or
    the right subject signed by a CA nobody trusts (``foreign_ca``); the new subject.

    Without either, the host gets a correct certificate again (undoing a test's damage).
    """
    with locked(lab_dir):
        state = load_state(lab_dir)
        if state is None or state.tls is None:
            raise ValueError(f"no TLS libvirt lab in {lab_dir}")
        host = state.host(name)
        ca_dir = state.tls.ca_dir
        if foreign_ca:
            ca_dir = state.run_dir / "tls-foreign-ca"
            create_ca(ca_dir, organization="intruder CA", country=None)
        material = issue_server_certificate(
            cert_dir(host),
            ca_dir=ca_dir,
            common_name=common_name or host.config.hostname,
            hosts=[host.config.hostname, host.config.ip],
            organization=ORGANIZATION,
            country=None,
        )
        if foreign_ca:
            # the host directory's CA copy must stay the lab's: spice-server sends the
            # chain it has, the client checks it against the lab CA it was given
            (cert_dir(host) / "ca-cert.pem").write_bytes(state.tls.ca_cert.read_bytes())
        return material.subject


def graphics_uri(state: LabState, destination: str) -> str | None:
    """``spice://<dst ip>:<port>?tlsPort=P&tlsSubject=O%3Dlab%2CCN%3DhostB`` (None: no TLS).

    libvirt passes these to ``client_migrate_info`` instead of its cookie's values, so the
    client verifies the destination against the subject the lab *expects* there, not the
    one the destination happens to present.
    """
    if state.tls is None:
        return None
    tls = state.tls
    query = urllib.parse.urlencode(
        {"tlsPort": tls.tls_port, "tlsSubject": tls.subjects[destination]},
        quote_via=urllib.parse.quote,
        safe="",
    )
    ip = state.hosts[destination].config.ip
    port = f":{tls.port}" if tls.port is not None else ""
    return f"spice://{ip}{port}?{query}"


def client_options(
    state: LabState, host: str, address: str, port: int | None, tls_port: int | None
) -> ClientOptions:
    """Our client for the guest on ``host``: on a TLS lab TLS only, verifying the lab CA
    and the host's subject (never the plain port: no downgrade to offer); with the lab's
    ticket when it has one."""
    ticket = lab_ticket(state)
    if state.tls is None:
        return ClientOptions(host=address, port=port, stream_port_name=None, ticket=ticket)
    return ClientOptions(
        host=address,
        tls_port=tls_port or state.tls.tls_port,
        ca_file=state.tls.ca_cert,
        host_subject=state.tls.subjects[host],
        stream_port_name=None,
        ticket=ticket,
    )


__all__ = [
    "ORGANIZATION",
    "cert_dir",
    "client_options",
    "create",
    "graphics_uri",
    "host_subject",
    "issue",
    "migrate_cert_dir",
    "plan",
    "reissue",
]
