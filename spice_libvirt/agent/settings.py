"""The host agent's settings: ``/etc/spice-libvirt/agent.toml``, then the command line.

A file of its own, not a table in the hook's ``config.toml``: the hook reads that file on
every guest operation and refuses keys it does not know (a typo must not pass silently),
and the agent is a separate, long-running service with settings of its own.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spice_libvirt.errors import ConfigError
from spice_libvirt.migration.switchover import HoldMode

DEFAULT_AGENT_CONFIG = Path("/etc/spice-libvirt/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/spice-libvirt/agent")
#: the metrics endpoint by default: loopback only (a fleet's Prometheus reaches it once
#: ``metrics_address`` names the host's management address, or through a local relay)
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9474"


class AgentSettings(BaseModel):
    """What the agent watches and how it holds.

    * ``connect``: the local libvirtd (the agent holds migrations *out of* this host).
    * ``destination_uri``: how to reach a destination libvirtd found from the source QEMU's
      migration connection; ``{peer}`` is its address. TLS by default (libvirt's own
      certificates, ``/etc/pki/libvirt``): the connection carries which guests are where and
      when their clients link. Opened read-only: the agent only listens there.
    * ``peers``: libvirtds to subscribe to at start, so that the first migration to them
      misses no client link (a discovered peer is subscribed on first use and kept).
    * ``hold_timeout_s``: every hold is released after this long, linked or not.
    * ``margin_ms``: added to the RTT estimate after the destination initialized the
      client's last channel (the controller's release policy and its measured default:
      0 ms held every remote-viewer run seamless, ``benchmarks/RESULTS-libvirt-margin.md``).
    * ``poll_s``: how often the speed and downtime are read back during a hold (a caller
      that changes them is followed, not fought).
    * ``hold_mode``: ``switchover`` (the default) lets the first pass run at the caller's
      speed while the client links and holds only as its end comes near
      (:mod:`spice_libvirt.migration.switchover`); ``bulk`` holds at 1 MiB/s from the start.
    * ``switchover_guard_s``: the hold goes on when the rest of the pass would be sent
      within this long.
    * ``assumed_link_s``: how long a client is assumed to take to link when the kernel does
      not say its RTT.
    * ``allow_taint``: hold near-empty guests through the QMP passthrough too; off by
      default, since that taints the domain (``custom-monitor``).
    * ``state_dir``: holds written down before they are applied, and the status file.
    * ``syslog_socket``: one line per verdict to this datagram socket (journald, rsyslog);
      "" for none.
    * ``journal_path``: the SQLite journal the verdicts go to (``spice-libvirt journal``);
      None: the hook's journal (``config.toml``).
    * ``metrics``, ``metrics_address``: serve Prometheus metrics
      (:mod:`spice_libvirt.agent.metrics`) on ``IP:PORT`` (``[IPv6]:PORT``; port 0: any
      free port, shown by ``agent status``); loopback by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect: str = "qemu:///system"
    destination_uri: str = "qemu+tls://{peer}/system"
    peers: tuple[str, ...] = ()
    hold_timeout_s: float = Field(default=15.0, gt=0.5, le=600.0)
    margin_ms: float = Field(default=0.0, ge=-1000.0, le=5000.0)
    poll_s: float = Field(default=0.5, ge=0.02, le=5.0)
    hold_mode: HoldMode = "switchover"
    switchover_guard_s: float = Field(default=0.4, ge=0.05, le=10.0)
    assumed_link_s: float = Field(default=2.5, ge=0.1, le=60.0)
    allow_taint: bool = False
    state_dir: Path = DEFAULT_STATE_DIR
    journal_path: Path | None = None
    syslog_socket: str = "/dev/log"
    metrics: bool = True
    metrics_address: str = DEFAULT_METRICS_ADDRESS

    @field_validator("metrics_address")
    @classmethod
    def _is_address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("destination_uri")
    @classmethod
    def _has_peer(cls, value: str) -> str:
        if "{peer}" not in value:
            raise ValueError("must contain {peer} (the destination's address)")
        return value


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); :class:`ValueError` says why not.

    The host must be an IP address: a name could resolve to a wildcard or to another host
    tomorrow, and where the agent listens must be what the operator wrote.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"not HOST:PORT: {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port_text}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r} (in {address!r})") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"not a port: {port_text!r} (in {address!r})")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_agent_settings(path: Path | None, overrides: dict[str, object]) -> AgentSettings:
    """The file (when it exists; a named file must exist), then non-None ``overrides``."""
    values: dict[str, object] = {}
    file = path or DEFAULT_AGENT_CONFIG
    if file.exists():
        try:
            values.update(tomllib.loads(file.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{file}: {exc}") from exc
    elif path is not None:
        raise ConfigError(f"{file}: no such file")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AgentSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "agent settings"
        raise ConfigError(f"{file}: {where}: {first['msg']}") from exc
