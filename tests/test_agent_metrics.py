"""The agent's Prometheus metrics (agent/metrics.py): what each verdict counts, the endpoint
on loopback (IPv4 and IPv6, any free port), ``promtool check metrics`` on what it serves,
and the settings that place it or turn it off.

The lab scrape with a real Prometheus server is ``tests/test_metrics_lab.py``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, get_args

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spice_libvirt import __version__
from spice_libvirt.agent import metrics as agent_metrics
from spice_libvirt.agent.metrics import AgentMetrics, MetricsServer
from spice_libvirt.agent.plan import RELEASE_KINDS
from spice_libvirt.agent.record import AgentVerdict, HeldBy
from spice_libvirt.agent.service import Agent
from spice_libvirt.agent.settings import AgentSettings, load_agent_settings, parse_address
from spice_libvirt.cli import build_parser
from spice_libvirt.errors import AgentError, ConfigError

PROMTOOL = shutil.which("promtool")


def value(m: AgentMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_every_series_is_there_at_zero_before_the_first_migration() -> None:
    m = AgentMetrics()
    for held_by in get_args(HeldBy):
        assert held_by in agent_metrics._OUTCOMES_BY_HOLDER
    for held_by, outcomes in agent_metrics._OUTCOMES_BY_HOLDER.items():
        for outcome in outcomes:
            got = value(m, "spice_libvirt_agent_migrations_total", outcome=outcome, held_by=held_by)
            assert got == 0.0
    for kind in RELEASE_KINDS:
        assert value(m, "spice_libvirt_agent_releases_total", reason=kind) == 0.0
    assert value(m, "spice_libvirt_agent_up") == 0.0
    assert value(m, "spice_libvirt_build_info", version=__version__) == 1.0


@pytest.mark.parametrize(
    ("verdict", "counted"),
    [
        (
            AgentVerdict(
                domain="vm",
                outcome="seamless",
                held_by="agent",
                hold="taint-free",
                held_ms=1250.0,
                link_wait_ms=1100.0,
                release="linked",
            ),
            {"hold": 1.25, "link": 1.1, "release": "linked", "taint": 0.0},
        ),
        (
            AgentVerdict(
                domain="tiny",
                outcome="not-linked",
                held_by="agent",
                hold="taint-free",
                held_ms=80.0,
                release="migration-ended",
                taint_free_failed=True,
            ),
            {"hold": 0.08, "link": None, "release": "migration-ended", "taint": 1.0},
        ),
        (
            AgentVerdict(domain="vm", outcome="skipped", held_by="controller"),
            {"hold": None, "link": None, "release": None, "taint": 0.0},
        ),
        (
            AgentVerdict(domain="vm", outcome="no-client"),
            {"hold": None, "link": None, "release": None, "taint": 0.0},
        ),
    ],
)
def test_a_verdict_counts_once_where_it_belongs(
    verdict: AgentVerdict, counted: dict[str, object]
) -> None:
    m = AgentMetrics()
    m.verdict(verdict)
    total = value(
        m, "spice_libvirt_agent_migrations_total", outcome=verdict.outcome, held_by=verdict.held_by
    )
    assert total == 1.0
    assert value(m, "spice_libvirt_agent_hold_seconds_sum") == pytest.approx(counted["hold"] or 0)
    assert value(m, "spice_libvirt_agent_hold_seconds_count") == (1 if counted["hold"] else 0)
    assert value(m, "spice_libvirt_agent_link_wait_seconds_sum") == pytest.approx(
        counted["link"] or 0
    )
    releases = sum(
        value(m, "spice_libvirt_agent_releases_total", reason=k) or 0 for k in RELEASE_KINDS
    )
    assert releases == (1 if counted["release"] else 0)
    if counted["release"]:
        reason = str(counted["release"])
        assert value(m, "spice_libvirt_agent_releases_total", reason=reason) == 1.0
    assert value(m, "spice_libvirt_agent_taint_free_hold_failures_total") == counted["taint"]


def test_state_and_reconnects() -> None:
    m = AgentMetrics()
    m.state(connected=True, holds=2)
    assert value(m, "spice_libvirt_agent_up") == 1.0
    assert value(m, "spice_libvirt_agent_active_holds") == 2.0
    m.state(connected=False, holds=0)
    m.reconnected()
    assert value(m, "spice_libvirt_agent_up") == 0.0
    assert value(m, "spice_libvirt_agent_libvirt_reconnects_total") == 1.0


def test_the_service_counts_what_it_finishes_and_skips_incoming_migrations(tmp_path: Path) -> None:
    settings = AgentSettings(
        state_dir=tmp_path / "agent",
        journal_path=tmp_path / "journal.sqlite3",
        syslog_socket="",
    )
    (tmp_path / "agent").mkdir()
    agent = Agent(settings)
    agent._finish(AgentVerdict(domain="vm", outcome="seamless", held_by="agent", held_ms=900.0))
    agent._finish(AgentVerdict(domain="in", outcome="skipped"))  # incoming: not ours
    m = agent.metrics
    seamless = value(m, "spice_libvirt_agent_migrations_total", outcome="seamless", held_by="agent")
    assert seamless == 1.0
    assert value(m, "spice_libvirt_agent_migrations_total", outcome="skipped", held_by="none") == 0
    assert value(m, "spice_libvirt_agent_up") == 0.0  # no libvirtd connection in this test


@pytest.mark.parametrize("address", ["127.0.0.1:0", "[::1]:0"])
def test_the_endpoint_serves_the_registry_and_promtool_finds_nothing_to_lint(address: str) -> None:
    if address.startswith("[") and not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback")
    m = AgentMetrics()
    m.verdict(AgentVerdict(domain="vm", outcome="seamless", held_by="agent", held_ms=500.0))
    server = MetricsServer(m.registry, address)
    try:
        host, port = parse_address(server.address)
        assert port > 0
        assert host in ("127.0.0.1", "::1")
        text = scrape(server.address)
    finally:
        server.stop()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "spice_libvirt_agent_migrations",
        "spice_libvirt_agent_hold_seconds",
        "spice_libvirt_agent_active_holds",
        "spice_libvirt_agent_link_wait_seconds",
        "spice_libvirt_agent_releases",
        "spice_libvirt_agent_taint_free_hold_failures",
        "spice_libvirt_agent_libvirt_reconnects",
        "spice_libvirt_agent_up",
        "spice_libvirt_build_info",
        "process_cpu_seconds",
    } <= names
    assert PROMTOOL is not None, "promtool missing: bash scripts/setup.sh installs prometheus"
    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout == ""


def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AgentError, match=f"cannot serve metrics on 127.0.0.1:{port}: "):
            MetricsServer(AgentMetrics().registry, f"127.0.0.1:{port}")


def test_an_agent_whose_address_is_taken_holds_on_without_metrics(tmp_path: Path) -> None:
    """Holding matters more than counting: the agent runs on and says why it serves none."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = Agent(AgentSettings(state_dir=tmp_path, metrics_address=f"127.0.0.1:{port}"))
        with agent._serve_metrics():
            assert agent.status.metrics_address is None
            assert agent.status.problems == [
                f"cannot serve metrics on 127.0.0.1:{port}: Address already in use"
            ]
    agent = Agent(AgentSettings(state_dir=tmp_path, metrics_address="127.0.0.1:0"))
    with agent._serve_metrics():
        address = agent.status.metrics_address
        assert address is not None
        assert "spice_libvirt_agent_up 0.0" in scrape(address)
    off = Agent(AgentSettings(state_dir=tmp_path, metrics=False))
    with off._serve_metrics():
        assert off.status.metrics_address is None
        assert off.status.problems == []


def test_a_stopped_endpoint_listens_no_more() -> None:
    server = MetricsServer(AgentMetrics().registry, "127.0.0.1:0")
    host, port = parse_address(server.address)
    server.stop()
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect((host, port))


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("localhost:9474", "not an IP address"),
        ("0.0.0.0", "not HOST:PORT"),
        ("127.0.0.1:http", "not a port"),
        ("127.0.0.1:65536", "not a port"),
        ("::1:9474", "in brackets"),
    ],
)
def test_bad_metrics_addresses_are_refused_in_one_line(
    tmp_path: Path, address: str, error: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'metrics_address = "{address}"\n')
    with pytest.raises(ConfigError, match=error):
        load_agent_settings(config, {})


def test_loopback_by_default_and_the_command_line_places_or_stops_it(tmp_path: Path) -> None:
    assert AgentSettings().metrics
    assert parse_address(AgentSettings().metrics_address)[0] == "127.0.0.1"
    from spice_libvirt.cli.agent import _settings

    missing = tmp_path / "none.toml"
    missing.write_text("")
    for argv, on, address in (
        ([], True, "127.0.0.1:9474"),
        (["--metrics-address", "[::1]:9100"], True, "[::1]:9100"),
        (["--no-metrics"], False, "127.0.0.1:9474"),
    ):
        args = build_parser().parse_args(["agent", "run", "--config", str(missing), *argv])
        settings = _settings(args)
        assert (settings.metrics, settings.metrics_address) == (on, address)


class _InstantSkip:
    """A hold that judges its migration at once (the agent stepping aside)."""

    def __init__(self, settings: object, local: object, domain: str, *_: object) -> None:
        self.domain = domain
        self.plan = None
        self.verdict = AgentVerdict(domain=domain, outcome="skipped", held_by="controller")
        self.verdict.released_why = "held by spice-libvirt's own controller"

    def status(self, status: str, at: float) -> None:
        pass

    async def run(self) -> AgentVerdict:
        return self.verdict


async def test_one_migration_is_one_verdict_however_many_events_follow_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration skipped at ``setup`` is not judged again at ``active``; the next
    migration of the domain (a new ``setup``) is."""
    from spice_libvirt.agent import service
    from spice_libvirt.libvirt.connection import MigrationEvent

    monkeypatch.setattr(service, "MigrationHold", _InstantSkip)
    agent = Agent(AgentSettings(state_dir=tmp_path, journal_path=tmp_path / "j", syslog_socket=""))
    local: Any = object()
    stepped = {"outcome": "skipped", "held_by": "controller"}

    async def events(*statuses: str) -> None:
        for status in statuses:
            agent._on_migration(local, MigrationEvent("vm", status, 0.0))
            for _ in range(3):  # let the hold task finish and its callback run
                await asyncio.sleep(0)

    await events("setup", "active", "device", "completed")
    assert value(agent.metrics, "spice_libvirt_agent_migrations_total", **stepped) == 1.0
    await events("setup", "active", "completed")
    assert value(agent.metrics, "spice_libvirt_agent_migrations_total", **stepped) == 2.0
    await events("active")  # an agent that came up mid-migration still judges it
    assert value(agent.metrics, "spice_libvirt_agent_migrations_total", **stepped) == 3.0
