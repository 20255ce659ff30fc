"""``spice://HOST[:PORT][?tls-port=N]`` addresses, as remote-viewer and libvirt write them."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from spice_libvirt.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SpiceURI:
    host: str
    port: int | None
    tls_port: int | None
    tls_subject: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"spice://{host}" + (f":{self.port}" if self.port is not None else "")
        return text + (f"?tls-port={self.tls_port}" if self.tls_port is not None else "")


def _port(value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not a number") from None
    if not 0 < number < 65536:
        raise ConfigError(f"{what} {number} is outside 1..65535")
    return number


def parse_spice_uri(text: str) -> SpiceURI:
    """Parse a SPICE URI; accepts ``tls-port``/``tlsPort`` and ``port`` query parameters
    (libvirt's graphics URI spells them ``tlsPort`` and ``tlsSubject``)."""
    parts = urlsplit(text)
    if parts.scheme != "spice":
        raise ConfigError(f"not a spice:// URI: {text!r}")
    try:
        host, port_text = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in {text!r}: {exc}") from None
    if not host:
        raise ConfigError(f"no host in {text!r}")
    query = {k.lower().replace("-", ""): v[-1] for k, v in parse_qs(parts.query).items()}
    port = port_text if port_text is not None else None
    if "port" in query:
        port = _port(query["port"], "port")
    tls_port = _port(query["tlsport"], "tls-port") if "tlsport" in query else None
    if port is None and tls_port is None:
        raise ConfigError(f"{text!r} names neither a port nor a tls-port")
    return SpiceURI(host, port, tls_port, query.get("tlssubject"))
