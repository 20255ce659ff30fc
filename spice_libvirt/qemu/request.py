"""What one QMP-driven migration needs, validated before anything is touched."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from spice_libvirt.migration.policy import TlsDowngradePolicy
from spice_libvirt.qemu.qmp import QMPAddress


class MigrationRequest(BaseModel):
    """Everything one QMP-driven migration needs; validated before anything is touched."""

    source_qmp: str = Field(description="unix socket path, or host:port")
    destination_qmp: str
    migrate_uri: str = Field(description="where the source sends the stream, e.g. tcp:h:p")
    #: the destination's SPICE address *as the client reaches it* (not the host's view)
    client_host: str
    client_port: int | None = None
    client_tls_port: int | None = None
    client_cert_subject: str | None = None
    require_seamless: bool = False
    wait_client: bool = True
    link_timeout: float = Field(default=10.0, gt=0)
    #: minimum pause after the destination shows every link (QMP signal), so that the
    #: client's MIGRATE_CONNECTED_SEAMLESS reaches the source (about one RTT)
    grace: float = Field(default=0.25, ge=0)
    #: pause after the embedded client reports it sent MIGRATE_CONNECTED_SEAMLESS, on top
    #: of the one-way latency it measured (its message must reach the source first)
    embedded_grace: float = Field(default=0.005, ge=0)
    max_grace: float = Field(default=2.0, ge=0)
    downtime_limit_ms: int | None = Field(default=None, gt=0)
    max_bandwidth: int | None = Field(default=None, gt=0, description="bytes/s")
    connect_timeout: float = Field(default=10.0, gt=0)
    command_timeout: float = Field(default=10.0, gt=0)
    completion_timeout: float = Field(default=300.0, gt=0)
    cancel_timeout: float = Field(default=10.0, gt=0)
    spice_completed_timeout: float = Field(default=15.0, gt=0)
    #: after SPICE_MIGRATE_COMPLETED: how long to watch the destination for a new session
    #: the longest wait after SPICE_MIGRATE_COMPLETED for the evidence of the client's path
    #: (the verdict is taken as soon as it is conclusive, usually one RTT + margin after)
    settle: float = Field(default=1.0, ge=0)
    #: slack on top of the client's RTT when watching for a switch-host reconnect
    verdict_margin_ms: float = Field(default=100.0, ge=0)
    poll_interval: float = Field(default=0.1, gt=0)
    #: how long the embedded client may take to hand over its record after the migration
    record_timeout: float = Field(default=10.0, gt=0)
    #: PID of the source QEMU, to check ``seamless-migration=on`` in its command line;
    #: found through SO_PEERCRED when the source QMP is a local unix socket
    source_pid: int | None = None
    #: a client on TLS that could end up in plain text: ``refuse`` raises in the
    #: preflight (nothing changed), ``warn`` migrates and notes it. ``refuse`` by default:
    #: a migration must never move a client from TLS to plain text, and the refusal says
    #: how to fix the cause; ``warn`` is the operator's explicit choice (e.g. an urgent
    #: evacuation). The verdict flags any downgrade that happens either way.
    tls_downgrade_policy: TlsDowngradePolicy = "refuse"
    #: FOR TESTS ONLY: offer the plain port even to a client on TLS, reproducing the downgrade
    #: (the verdict must then report ``tls_downgraded``)
    test_offer_plain_port: bool = False

    @model_validator(mode="after")
    def _check_ports(self) -> MigrationRequest:
        if self.client_port is None and self.client_tls_port is None:
            raise ValueError("client_migrate_info needs client_port or client_tls_port")
        for port in (self.client_port, self.client_tls_port):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"port out of range: {port}")
        return self

    @property
    def client_target(self) -> str:
        return client_target(self.client_host, self.client_port, self.client_tls_port)


def client_target(host: str, port: int | None, tls_port: int | None) -> str:
    """``host:port[/tls:P]`` as the report shows what the client was told."""
    tls = f"/tls:{tls_port}" if tls_port else ""
    return f"{host}:{port or '-'}{tls}"


def parse_qmp_address(text: str) -> QMPAddress:
    """``/run/x.qmp`` or ``unix:/run/x.qmp`` -> path; ``host:port`` / ``tcp:host:port`` -> pair."""
    if text.startswith("unix:"):
        return text[5:]
    rest = text[4:] if text.startswith("tcp:") else text
    if "/" not in rest and ":" in rest:
        host, _, port = rest.rpartition(":")
        if port.isdigit():
            return (host.strip("[]"), int(port))
    return text


__all__ = ["MigrationRequest", "client_target", "parse_qmp_address"]
