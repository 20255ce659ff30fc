"""The agent's Prometheus metrics, and the endpoint that serves them.

Operators watch fleets through Prometheus; libvirt's exporters count migration jobs and
bytes, nothing about the SPICE client. The agent knows, per migration, whether the client
was kept, so it says so here: served by the maintained client library
(``prometheus_client``: its registry, metric types and exposition), on
``metrics_address`` (loopback by default; ``metrics = false`` serves nothing).

Names follow Prometheus's naming guide: one prefix (``spice_libvirt_``), the agent's
subsystem, base units (seconds), ``_total`` on counters. No label carries a domain name
or an address: a fleet's series stay few whatever it runs, and what the endpoint tells a
local reader is counts only (``spice-libvirt journal --summary`` names the domains).

* ``spice_libvirt_agent_migrations_total{outcome, held_by}``: outgoing migrations by the
  agent's verdict and by who held them: ``agent``, ``controller`` (the agent stepped aside
  for spice-libvirt's own controller) or ``none`` (no client, another holder, an error);
* ``spice_libvirt_agent_hold_seconds``: how long each hold lasted (histogram);
* ``spice_libvirt_agent_active_holds``: holds in place now;
* ``spice_libvirt_agent_link_wait_seconds``: from the hold to the destination initializing
  the client's last channel (histogram; only holds whose client linked);
* ``spice_libvirt_agent_releases_total{reason}``: releases by their fixed reason
  (:data:`~spice_libvirt.agent.plan.RELEASE_KINDS`);
* ``spice_libvirt_agent_taint_free_hold_failures_total``: migrations of guests that could
  not be held taint-free (they switched over before the client linked);
* ``spice_libvirt_agent_libvirt_reconnects_total``; ``spice_libvirt_agent_up`` (1 while
  connected to the local libvirtd); ``spice_libvirt_build_info{version}``; and the
  library's ``process_*`` metrics.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.process_collector import ProcessCollector

from spice_libvirt import __version__, errors
from spice_libvirt.agent.plan import RELEASE_KINDS
from spice_libvirt.agent.record import AgentVerdict, HeldBy
from spice_libvirt.agent.settings import format_address, parse_address

log = logging.getLogger(__name__)

NAMESPACE = "spice_libvirt"
SUBSYSTEM = "agent"
#: hold bound 15 s by default (at most 600): the buckets cover a LAN client's tenth of a
#: second to a bound that ran out
HOLD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
#: a client links in about four of its round trips (0.3 s RTT: 1.2 s)
LINK_WAIT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)

#: the (outcome, held_by) pairs a verdict can have: shown at 0 from the start, so that
#: ``increase()`` sees the first migration of each kind
_OUTCOMES_BY_HOLDER: dict[HeldBy, tuple[str, ...]] = {
    "agent": ("seamless", "switch-host", "not-linked", "client-lost", "failed", "error"),
    "controller": ("skipped",),
    "none": ("no-client", "skipped", "error"),
}


class AgentMetrics:
    """The agent's metrics in a registry of their own (several agents may share a process
    in tests; the library's global registry would refuse the second)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        common: dict[str, Any] = {
            "namespace": NAMESPACE,
            "subsystem": SUBSYSTEM,
            "registry": self.registry,
        }
        self.migrations = Counter(
            "migrations",
            "Outgoing migrations the agent saw, by its verdict and by who held them.",
            ["outcome", "held_by"],
            **common,
        )
        self.hold_seconds = Histogram(
            "hold_seconds",
            "How long the agent held a migration's switchover.",
            buckets=HOLD_BUCKETS,
            **common,
        )
        self.active_holds = Gauge("active_holds", "Holds in place now.", **common)
        self.link_wait_seconds = Histogram(
            "link_wait_seconds",
            "From the hold to the destination initializing the client's last channel.",
            buckets=LINK_WAIT_BUCKETS,
            **common,
        )
        self.releases = Counter("releases", "Holds released, by the reason.", ["reason"], **common)
        self.taint_free_failures = Counter(
            "taint_free_hold_failures",
            "Migrations of guests that could not be held taint-free: they switched over "
            "before the client linked (too little memory to move at 1 MiB/s).",
            **common,
        )
        self.libvirt_reconnects = Counter(
            "libvirt_reconnects", "Connections to the local libvirtd opened again.", **common
        )
        self.up = Gauge("up", "1 while the agent is connected to its local libvirtd.", **common)
        build = Info(
            "build", "The spice-libvirt version.", namespace=NAMESPACE, registry=self.registry
        )
        build.info({"version": __version__})
        ProcessCollector(registry=self.registry)
        for held_by, outcomes in _OUTCOMES_BY_HOLDER.items():
            for outcome in outcomes:
                self.migrations.labels(outcome=outcome, held_by=held_by)
        for kind in RELEASE_KINDS:
            self.releases.labels(reason=kind)

    def verdict(self, verdict: AgentVerdict) -> None:
        """Count one migration the agent finished with."""
        self.migrations.labels(outcome=verdict.outcome, held_by=verdict.held_by).inc()
        if verdict.release is not None:
            self.releases.labels(reason=verdict.release).inc()
        if verdict.held_ms is not None:
            self.hold_seconds.observe(verdict.held_ms / 1000.0)
        if verdict.link_wait_ms is not None:
            self.link_wait_seconds.observe(verdict.link_wait_ms / 1000.0)
        if verdict.taint_free_failed:
            self.taint_free_failures.inc()

    def state(self, *, connected: bool, holds: int) -> None:
        self.up.set(1 if connected else 0)
        self.active_holds.set(holds)

    def reconnected(self) -> None:
        self.libvirt_reconnects.inc()


# ------------------------------------------------------------------ the endpoint


class _Quiet(WSGIRequestHandler):
    """No line on stderr per scrape (a scrape every 15 s is not news)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """The library's WSGI app on a threaded stdlib server of its own: scrapes never wait
    for the agent's event loop, and :meth:`stop` closes the socket when the agent ends."""

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._server = make_server(
                host, port, make_wsgi_app(registry), Server, handler_class=_Quiet
            )
        except OSError as exc:
            raise errors.AgentError(
                f"cannot serve metrics on {address}: {exc.strerror or exc}"
            ) from exc
        bound_host, bound_port = self._server.server_address[:2]
        #: where it listens (the real port when ``address`` asked for port 0)
        self.address = format_address(str(bound_host), int(bound_port))
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics endpoint", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)
