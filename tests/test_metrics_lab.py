"""The operators' view on real libvirtds: a real Prometheus scrapes both hosts' agents.

One two-host lab for the module (``lab up --libvirt --agent``: the memcheck guest, 64 MiB of
data, 4 MiB/s of it rewritten, which a taint-free hold keeps in its first pass; one
``spice-libvirt watch`` client 150 ms away; the hook installed in both hosts, journaling to
the same file as the host's agent).
A Prometheus server from Debian's ``prometheus`` package runs inside host A's namespace
(listening on that namespace's loopback) and scrapes both agents on the hosts' lab
addresses, every second.

* ``lab status --json`` names each agent's metrics address;
* 4 plain ``virsh migrate --bandwidth 52`` (VDSM's default cap) there and back: the PromQL
  sum of seamless migrations held by the agents is 4 (and the client's own record says
  seamless each time); ``promtool check metrics`` is clean on what both agents serve;
* our own ``migrate`` through the command line: the agent steps aside (PromQL:
  ``held_by="controller"``), the textfile counts it, the journal has the controller's row;
* ``journal --summary`` on host B's real journal: the hook's and the agent's rows, each
  migration once (host A's, with the controller's row, in the test before).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt.cli.textfile import parse
from spice_libvirt.errors import LabError
from spice_libvirt.hook import install as hook_install
from spice_libvirt_lab import libvirt_agent, netns
from spice_libvirt_lab.libvirt_host import LibvirtHost
from spice_libvirt_lab.libvirt_state import LabState
from spice_libvirt_lab.memcheck import MemcheckOptions
from tests.rigs.libvirt_lab import cli_dir, lab_marks

pytest.importorskip("libvirt")

RTT_MS = 150.0
MIGRATIONS = 4
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
#: Prometheus's own port, on the loopback of host A's namespace (nobody else's)
PROMETHEUS_PORT = 9090
SEAMLESS_HELD = 'sum(spice_libvirt_agent_migrations_total{outcome="seamless",held_by="agent"})'


#: the hosts' spice-libvirt configuration, as the hook inside each host reads it
IN_HOST_CONFIG = libvirt_agent.AGENT_DIR_INSIDE.parent / "spice-libvirt.toml"


def install_hook(host: LibvirtHost) -> None:
    """The hook journals to the agent's journal file: one file holds the host's writers
    (the controller's rows join them when the CLI is pointed at it). Both files lie in the
    host's own ``/var/lib/libvirt`` (``<state>/lib``), where the agent keeps its own."""
    journal = libvirt_agent.AGENT_DIR_INSIDE / "journal.sqlite3"
    (host.state_dir / "lib" / IN_HOST_CONFIG.name).write_text(f'journal_path = "{journal}"\n')
    hook_install.install(host.etc_dir / "hooks", config=IN_HOST_CONFIG)


#: a guest whose whole working set is data, some of it rewritten all the time: a
#: hypervisor's busy VM in miniature, and it boots at once (no kernel under TCG)
GUEST = MemcheckOptions(working_set_mib=64, dirty_mib_s=4, pass_ms=500)

pytestmark = lab_marks(
    client_rtt_ms=RTT_MS,
    guest="memcheck",
    memcheck_options=GUEST,
    clients=True,
    agent=True,
    before_start=install_hook,
)


@pytest.fixture(scope="module")
def lab(shared_lab: LabState) -> LabState:
    assert PROMETHEUS is not None, "prometheus missing: bash scripts/setup.sh installs it"
    return shared_lab


def agent_addresses(lab: LabState) -> dict[str, str]:
    found = {p.where: p.address for p in lab.daemons if p.what.startswith("agent ")}
    assert set(found) == {"A", "B"}, lab.daemons
    return {host: str(address) for host, address in found.items()}


@pytest.fixture(scope="module")
def prometheus(lab: LabState) -> Iterator[str]:
    """A Prometheus server inside host A scraping both agents; its URL (inside A)."""
    directory = lab.run_dir / "prometheus"
    directory.mkdir(mode=0o700)
    targets = sorted(agent_addresses(lab).values())
    config = directory / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {"job_name": "spice-libvirt-agent", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    assert PROMETHEUS is not None
    argv = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
        "--log.level=warn",
    ]
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            lab.host("A").enter_argv(argv),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    ref = netns.ProcRef.of(proc.pid, what="prometheus")
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            up = query(lab, url, 'sum(up{job="spice-libvirt-agent"})')
            if up == 2.0:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"Prometheus never scraped both agents: {log.read_text()[-2000:]}")
        yield url
    finally:
        netns.terminate([ref], timeout=15.0)


def query(lab: LabState, url: str, expr: str) -> float | None:
    """One PromQL instant query through promtool, inside host A; the single value or None."""
    assert PROMTOOL is not None
    try:
        out = lab.host("A").run([PROMTOOL, "query", "instant", "-o", "json", url, expr])
    except LabError:
        return None  # not up yet
    result: list[dict[str, Any]] = json.loads(out or "[]")
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def wait_query(lab: LabState, url: str, expr: str, want: float, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    got = query(lab, url, expr)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.5)
        got = query(lab, url, expr)
    return got if got is not None else float("nan")


def client_paths(lab: LabState) -> list[str | None]:
    """The watch client's own verdict per migration (its JSON lines)."""
    (client,) = lab.clients
    assert client.domain is not None
    verdicts = lab.run_dir / "clients" / f"{client.domain}.jsonl"
    return [json.loads(line).get("path") for line in verdicts.read_text().splitlines()]


#: the bandwidth VDSM passes on every migration unless Engine says otherwise (MiB/s,
#: ``migration_max_bandwidth``). Unlimited, a small guest crosses in about half a second,
#: and under this machine's load (10-16 on 2 cores) the agent was seen holding 20 ms after
#: the switchover (the linux guest; its verdict notes when the hold came).
CALLER_BANDWIDTH_MIBS = "52"


def virsh_migrate(lab: LabState) -> None:
    src, dst = libvirt_agent.running_host(lab)
    done = subprocess.run(
        libvirt_agent.plain_migrate_argv(lab, src, dst, ["--bandwidth", CALLER_BANDWIDTH_MIBS]),
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def scrape_in(lab: LabState, address: str) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return netns.call_in(lab.hosts["A"].config.netns, get)


# ---------------------------------------------------------------------------- the tests


def test_lab_status_names_each_agents_metrics_address(lab: LabState) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "lab", "--dir", str(cli_dir(lab)),
         "status", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    agents = {
        d["where"]: d for d in json.loads(done.stdout)["daemons"] if d["what"].startswith("agent")
    }
    for host in ("A", "B"):
        assert agents[host]["alive"]
        assert agents[host]["address"] == f"{lab.hosts[host].config.ip}:9474"


def test_four_plain_migrations_there_and_back_are_four_seamless_in_promql(
    lab: LabState, prometheus: str
) -> None:
    assert query(lab, prometheus, SEAMLESS_HELD) == 0.0  # every series is there from the start
    before = len(client_paths(lab))
    for _ in range(MIGRATIONS):
        virsh_migrate(lab)
    assert wait_query(lab, prometheus, SEAMLESS_HELD, MIGRATIONS) == MIGRATIONS
    # nothing else was counted, every hold released because the client linked
    assert query(lab, prometheus, "sum(spice_libvirt_agent_migrations_total)") == MIGRATIONS
    assert query(lab, prometheus, 'sum(spice_libvirt_agent_releases_total{reason="linked"})') == 4
    assert query(lab, prometheus, "sum(spice_libvirt_agent_hold_seconds_count)") == MIGRATIONS
    assert query(lab, prometheus, "sum(spice_libvirt_agent_link_wait_seconds_count)") == 4
    assert query(lab, prometheus, "sum(spice_libvirt_agent_up)") == 2.0
    assert query(lab, prometheus, "sum(spice_libvirt_agent_active_holds)") == 0.0
    median = query(
        lab,
        prometheus,
        "histogram_quantile(0.5, sum by (le) (spice_libvirt_agent_hold_seconds_bucket))",
    )
    assert median is not None
    assert 0 < median < 15
    # the client's own account, independent of the agents
    paths = client_paths(lab)[before:]
    assert paths == ["seamless"] * MIGRATIONS, paths


def test_promtool_finds_nothing_to_lint_in_what_the_agents_serve(lab: LabState) -> None:
    assert PROMTOOL is not None
    for host, address in agent_addresses(lab).items():
        text = scrape_in(lab, address)
        assert "spice_libvirt_agent_migrations_total" in text, host
        lint = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert lint.returncode == 0, (host, lint.stdout, lint.stderr)
        assert lint.stdout == "", host


def test_our_own_migrate_is_stepped_aside_from_counted_in_the_textfile_and_journaled(
    lab: LabState, prometheus: str, tmp_path: Path
) -> None:
    src, dst = libvirt_agent.running_host(lab)
    config = tmp_path / "config.toml"
    prom = tmp_path / "spice_libvirt.prom"
    journal = libvirt_agent.journal_path(lab, src)
    config.write_text(f'journal_path = "{journal}"\nmetrics_textfile = "{prom}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "migrate", lab.domain, "--json",
         "--from", lab.hosts[src].uri_unix, "--to", lab.hosts[dst].uri_tcp,
         "--to-connect", lab.hosts[dst].uri_unix],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "SPICE_LIBVIRT_CONFIG": str(config)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "seamless"
    stepped = 'sum(spice_libvirt_agent_migrations_total{held_by="controller",outcome="skipped"})'
    assert wait_query(lab, prometheus, stepped, 1.0) == 1.0
    assert parse(prom.read_text())[0] == {("migrate", "seamless"): 1.0}
    summary = journal_summary(journal)
    to_dst = by_key(summary["by_destination"])[lab.hosts[dst].uri_tcp]
    assert to_dst["seamless"] == to_dst["judged"] == to_dst["migrations"] == 3  # 2 agent + ours


def journal_summary(journal: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "journal", "--summary", "--json",
         "--path", str(journal)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def by_key(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {g["key"]: g for g in groups}


def test_the_summary_of_a_real_journal_tells_each_migration_once(lab: LabState) -> None:
    """Host B's journal after the module's migrations (A->B, B->A twice, then ours A->B):
    the hook saw three come in, the agent judged two going out."""
    text = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "journal", "--summary",
         "--path", str(libvirt_agent.journal_path(lab, "B"))],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    print(text)
    summary = journal_summary(libvirt_agent.journal_path(lab, "B"))
    dest = by_key(summary["by_destination"])
    to_a = dest[lab.hosts["A"].uri_tcp]
    assert (to_a["migrations"], to_a["seamless"], to_a["seamless_share"]) == (2, 2, 1.0)
    assert to_a["median_held_ms"] > 0
    assert to_a["worst_outcome"] == "seamless"
    assert to_a["last_failure"] is None
    incoming = dest["(this host)"]
    assert (incoming["migrations"], incoming["judged"], incoming["worst_outcome"]) == (
        3,
        0,
        "incoming",
    )
    (domain,) = summary["by_domain"]
    assert (domain["key"], domain["migrations"], domain["seamless"]) == (lab.domain, 5, 2)
