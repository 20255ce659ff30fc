"""A host of memcheck guests drained by other people's callers, with the host agents.

One lab for the module: 4 memcheck guests (128 MiB working set each, every page data) on
host A, each with its own ``spice-libvirt watch`` client 150 ms away (``lab up --libvirt
--domains 4 --guest memcheck``), and a host agent in each host. The oracle is each client's
own record (``lab clients``); the guests' own accounts (``lab guest``) say whether their
memory came through:

* all four drained at once by plain ``virsh migrate --live --p2p``: 4/4 seamless;
* drained back by the VDSM-like caller (``benchmarks/vdsm_caller.py``: 2 at a time,
  52 MiB/s, its downtime schedule, a monitor every 0.5 s here): 4/4 seamless, and each
  migration ran at the caller's 52 MiB/s and downtime once the agent had released it, and
  the agent put exactly those values back.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from benchmarks.vdsm_caller import Caller, Options
from spice_libvirt_lab import libvirt_agent, libvirt_clients
from spice_libvirt_lab.libvirt_agent import running_agents
from spice_libvirt_lab.libvirt_state import HostName, LabState, save
from spice_libvirt_lab.libvirt_status import guest_accounts, where
from spice_libvirt_lab.memcheck import MemcheckOptions
from tests.rigs.libvirt_lab import lab_marks

pytest.importorskip("libvirt")

DOMAINS = 4
OPTIONS = MemcheckOptions(working_set_mib=128)

pytestmark = lab_marks(
    client_rtt_ms=150.0,
    guest="memcheck",
    domains=DOMAINS,
    clients=True,
    memcheck_options=OPTIONS,
    timeout=600.0,
)


@pytest.fixture(scope="module")
def fleet(shared_lab: LabState) -> Iterator[LabState]:
    """The lab with an agent in each host for the module's tests."""
    with running_agents(shared_lab):
        yield shared_lab


def _counts(state: LabState) -> dict[str, int]:
    return {d: len(h.verdicts) for d, h in libvirt_clients.client_histories(state).items()}


def _paths_after(state: LabState, before: dict[str, int], timeout: float = 60.0) -> list[str]:
    """Each client's path for the migration just made, once every client has said it."""
    deadline = time.monotonic() + timeout
    while True:
        histories = libvirt_clients.client_histories(state)
        fresh = {d: h.verdicts[before.get(d, 0) :] for d, h in histories.items()}
        if all(fresh.values()) or time.monotonic() > deadline:
            return [str(v[0].path) if v else "no verdict" for v in fresh.values()]
        time.sleep(0.5)


def _moved(state: LabState, to: HostName) -> None:
    """The callers moved the guests behind the lab's back: tell the lab where they are."""
    assert where(state) == to
    state.active_host = to
    save(state)


def _guests_intact(state: LabState, to: HostName, timeout: float = 60.0) -> None:
    """Every guest reports again from the destination, and has found no bad page. (On a
    loaded machine a guest under TCG may go quiet for a while: waited for, bounded.)"""
    deadline = time.monotonic() + timeout
    while True:
        accounts = guest_accounts(state.lab_dir)
        if all(a.alive and a.host == to for a in accounts) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert len(accounts) == DOMAINS
    for account in accounts:
        assert (account.alive, account.host) == (True, to), account
        assert account.errors == 0, account


def test_four_concurrent_plain_virsh_migrations_are_seamless(fleet: LabState) -> None:
    src, dst = libvirt_agent.running_host(fleet)
    before = _counts(fleet)
    procs = [
        subprocess.Popen(
            [
                "virsh",
                "-c",
                fleet.hosts[src].uri_unix,
                "migrate",
                "--live",
                "--p2p",
                name,
                f"qemu+tcp://{fleet.hosts[dst].config.hostname}/system",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in fleet.all_domains
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert _paths_after(fleet, before) == ["seamless"] * DOMAINS
    _moved(fleet, dst)
    _guests_intact(fleet, dst)


def test_the_vdsm_like_caller_is_seamless_and_its_schedule_and_bandwidth_respected(
    fleet: LabState,
) -> None:
    src, dst = libvirt_agent.running_host(fleet)
    before = _counts(fleet)
    verdicts_before = len(libvirt_agent.verdicts(fleet, src))
    options = Options(
        source_uri=fleet.hosts[src].uri_unix,
        destination=fleet.hosts[dst].config.hostname,
        monitor_interval_s=0.5,
    )
    records = Caller(options).drain(fleet.all_domains)
    assert all(r.ok for r in records), [r.error for r in records]
    assert _paths_after(fleet, before) == ["seamless"] * DOMAINS
    _moved(fleet, dst)
    _guests_intact(fleet, dst)
    # the caller's own account: two at a time, its init downtime first, its bandwidth
    starts = sorted((r.started_at or 0.0, r.ended_at or 0.0) for r in records)
    for i, (start, _end) in enumerate(starts):
        running = sum(1 for s, e in starts[:i] if e > start)
        assert running <= 1, starts
    for record in records:
        assert record.actions[0]["action"] == "setDowntime"
        assert record.actions[0]["value"] == 101
        assert record.params["bandwidth"] == 52
        for look in record.looks_after_hold():
            # the caller's own: its bandwidth, and a downtime its schedule had set by then
            # (under load the schedule steps on after the release: 101, then 104, ...)
            assert look["speed_mibs"] == 52, record
            assert look["downtime_ms"] in record.downtimes_set_by(look["t"]), record
    # the agents: every migration held, then released to the caller's own values
    # each comes once its client left the source and one RTT passed without a reconnect
    verdicts = libvirt_agent.new_verdicts(fleet, src, verdicts_before, DOMAINS)
    by_domain = {v["domain"]: v for v in verdicts}
    assert set(by_domain) == set(fleet.all_domains)
    for record in records:
        verdict = by_domain[record.domain]
        assert verdict["outcome"] == "seamless", verdict
        set_by_caller = record.downtimes_set_by(float("inf"))
        assert verdict["caller_restored"]["speed_mibs"] == 52
        assert verdict["caller_restored"]["downtime_ms"] in set_by_caller, (verdict, record)
