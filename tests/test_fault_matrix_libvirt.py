"""The fault matrix on the libvirt path: two libvirtds in namespaces, a client 300 ms away.

Each test breaks one real migration at an observed moment -- the CLI interrupted by SIGINT
or SIGTERM in each phase, the destination QEMU killed, a libvirtd restarted, the client's
link made lossy and jittery on top of its 300 ms (the delay bridge's loss and jitter) -- and then
checks the invariants of :mod:`tests.faults` on both hosts: the domain runs on exactly one,
no migration job is left, QEMU's max-bandwidth is what it was before the hold, and the exit
code is the documented one. The issue's bug is the first test: Ctrl-C during the hold left
the job crawling at 4 KiB/s with the domain paused on the destination.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.libvirt.controller import (
    LibvirtMigrationReport,
    LibvirtMigrationRequest,
    migrate_libvirt,
)
from spice_libvirt.spice.client import ClientOptions
from spice_libvirt_lab import delaybridge, libvirt_lab, netns
from spice_libvirt_lab.libvirt_lab import HostName, LabState
from spice_libvirt_lab.libvirt_migrate import lab_request, migrate_by_report
from spice_libvirt_lab.libvirt_state import PORT_CHANNEL as PORT
from spice_libvirt_lab.libvirt_status import where
from spice_libvirt_lab.witness_thread import netns_witness
from tests import faults
from tests.rigs.libvirt_lab import cli_dir, fresh_state, lab_marks

pytest.importorskip("libvirt")

RTT_MS = 300.0

pytestmark = lab_marks(client_rtt_ms=RTT_MS)
#: after the CLI exits, the hosts must be settled at once; this bound only absorbs
#: libvirt's own bookkeeping (the destination's incoming domain being torn down)
SETTLE_S = 10.0


def _uris(lab: LabState) -> tuple[str, dict[str, str], str]:
    state = fresh_state(lab)
    uris = {name: h.uri_unix for name, h in state.hosts.items()}
    return state.domain, uris, where(state)


def _bandwidth_before(uris: dict[str, str], domain: str, host: str) -> int | None:
    return faults.libvirt_host_view(uris[host], domain).qemu_max_bandwidth


def _check_left_clean(
    uris: dict[str, str], domain: str, bandwidth: int | None, expect_on: str | None
) -> str:
    """The invariants after a fault; the host the domain runs on."""
    assert faults.wait_for(
        lambda: faults.settled(faults.libvirt_views(uris, domain)), SETTLE_S, 0.1
    ), faults.libvirt_views(uris, domain)
    views = faults.libvirt_views(uris, domain)
    (host,) = faults.running_on(views)
    if expect_on is not None:
        assert host == expect_on, views
    if bandwidth is not None:
        assert views[host].qemu_max_bandwidth == bandwidth, views
    return host


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_during_the_hold_leaves_no_job_and_no_throttle(
    shared_lab: LabState, sig: int
) -> None:
    """``lab migrate`` interrupted while the job is held at 4 KiB/s."""
    domain, uris, source = _uris(shared_lab)
    before = _bandwidth_before(uris, domain, source)
    run = faults.run_cli_interrupted(
        ["lab", "--dir", str(cli_dir(shared_lab)), "migrate", "--json"],
        lambda: faults.throttled(uris[source], domain),
        sig,
    )
    views = faults.libvirt_views(uris, domain)
    faults.record_row(
        path="libvirt",
        scenario=f"{signal.Signals(sig).name} during the hold",
        exit_code=run.returncode,
        signal_to_exit_s=run.exit_after_signal_s,
        runs_on=faults.running_on(views),
        bandwidth_before=before,
        bandwidth_after=views[source].qemu_max_bandwidth,
        jobs=[v.job for v in views.values()],
    )
    assert run.signalled_after_s is not None, run.stderr
    expected = ExitCode.INTERRUPTED if sig == signal.SIGINT else ExitCode.TERMINATED
    assert run.returncode == expected, run.stderr
    assert "undone" in run.stderr, run.stderr
    assert "the domain runs on: source" in run.stderr, run.stderr
    _check_left_clean(uris, domain, before, expect_on=source)


def test_sigint_in_the_preflight_changes_nothing(shared_lab: LabState) -> None:
    domain, uris, source = _uris(shared_lab)
    before = _bandwidth_before(uris, domain, source)
    run = faults.run_cli_interrupted(
        ["lab", "--dir", str(cli_dir(shared_lab)), "migrate", "--json", "--no-watch"],
        None,
        signal.SIGINT,
    )
    views = faults.libvirt_views(uris, domain)
    faults.record_row(
        path="libvirt",
        scenario="SIGINT in the preflight",
        exit_code=run.returncode,
        signal_to_exit_s=run.exit_after_signal_s,
        runs_on=faults.running_on(views),
        jobs=[v.job for v in views.values()],
    )
    # the signal lands as soon as the CLI's own code runs: before anything was changed
    assert run.signalled_after_s is not None, run.stderr
    assert run.returncode == ExitCode.INTERRUPTED, run.stderr
    _check_left_clean(uris, domain, before, expect_on=source)


def test_sigterm_after_the_job_completed_leaves_it_on_the_destination(shared_lab: LabState) -> None:
    """Interrupted in the verdict phase (the job is over): nothing to undo, placed there."""
    domain, uris, source = _uris(shared_lab)
    destination = "B" if source == "A" else "A"
    before = _bandwidth_before(uris, domain, source)
    run = faults.run_cli_interrupted(
        ["lab", "--dir", str(cli_dir(shared_lab)), "migrate", "--json", "--no-watch"],
        lambda: faults.libvirt_host_view(uris[destination], domain).state == "running",
        signal.SIGTERM,
    )
    views = faults.libvirt_views(uris, domain)
    faults.record_row(
        path="libvirt",
        scenario="SIGTERM in the verdict",
        exit_code=run.returncode,
        signal_to_exit_s=run.exit_after_signal_s,
        runs_on=faults.running_on(views),
        jobs=[v.job for v in views.values()],
    )
    assert run.returncode in (ExitCode.TERMINATED, ExitCode.OK), run.stderr
    host = _check_left_clean(uris, domain, None, expect_on=destination)
    assert host == destination
    assert before is None or before > 0


async def _held_migration(
    lab: LabState, fault: Callable[[libvirt_lab.LabState, str, str], None], **options: Any
) -> tuple[LibvirtMigrationReport, str, str]:
    """Migrate with the embedded client sent where it cannot link (so the hold holds for
    ``hold_timeout``), strike with ``fault(state, source, destination)`` once the throttle
    is in place, and return the report with the source and destination names."""
    state = fresh_state(lab)
    source = where(state)
    destination = "B" if source == "A" else "A"
    endpoint = libvirt_lab.spice_endpoint(state, source)
    assert endpoint is not None
    bogus = state.subnet.replace(".0/24", ".99")
    fields: dict[str, Any] = {
        "graphics_uri": f"spice://{bogus}:5900",
        "hold_timeout": 20.0,
        "completion_timeout": 60.0,
    }
    fields.update(options)
    request = lab_request(state, source, destination, **fields)  # type: ignore[arg-type]
    uri = state.hosts[source].uri_unix
    witness = netns_witness(
        ClientOptions(host=endpoint.address, port=endpoint.port, stream_port_name=None),
        state.client.netns,
    )
    async with witness:
        task = asyncio.create_task(migrate_libvirt(request, witness))
        held = await asyncio.to_thread(
            faults.wait_for, lambda: task.done() or faults.throttled(uri, state.domain), 60
        )
        assert held
        assert not task.done()
        await asyncio.to_thread(fault, state, source, destination)
        async with asyncio.timeout(180):
            report = await task
    return report, source, destination


def _kill_destination_qemu(state: libvirt_lab.LabState, _src: str, dst: str) -> None:
    pids = faults.qemu_pids_in(state.hosts[dst].config.netns, state.domain)
    assert pids, "no destination QEMU found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _restart(which: str) -> Callable[[libvirt_lab.LabState, str, str], None]:
    def fault(state: libvirt_lab.LabState, src: str, dst: str) -> None:
        host: libvirt_lab.HostName = "A" if (src if which == "source" else dst) == "A" else "B"
        libvirt_lab.restart_libvirtd(state.lab_dir, host)

    return fault


@pytest.mark.parametrize(
    "fault",
    ["destination-qemu-killed", "source-libvirtd-restarted", "destination-libvirtd-restarted"],
)
async def test_fault_mid_job_leaves_the_domain_on_exactly_one_host(
    shared_lab: LabState, fault: str
) -> None:
    domain, uris, source = _uris(shared_lab)
    before = _bandwidth_before(uris, domain, source)
    strike = {
        "destination-qemu-killed": _kill_destination_qemu,
        "source-libvirtd-restarted": _restart("source"),
        "destination-libvirtd-restarted": _restart("destination"),
    }[fault]
    report, src, _dst = await _held_migration(shared_lab, strike)
    host = await asyncio.to_thread(_check_left_clean, uris, domain, None, None)
    views = faults.libvirt_views(uris, domain)
    faults.record_row(
        path="libvirt",
        scenario=fault.replace("-", " ") + " mid-hold",
        outcome=report.outcome,
        placement=report.placement,
        runs_on=host,
        exit_code=int(for_report(report)),
        bandwidth=views[host].qemu_max_bandwidth,
        bandwidth_before=before,
    )
    # each fault ends the job: the destination's incoming domain dies (killed, or killed by
    # its restarted libvirtd), or the restarted source libvirtd cancels its unattended
    # outgoing job; the domain runs on, unthrottled, where it was
    assert host == src, (views, report.notes)
    assert report.placement == "source", report.notes
    assert report.placement_evidence
    assert views[host].qemu_max_bandwidth == before, views
    assert report.outcome == "failed", report.notes
    assert for_report(report) is ExitCode.MIGRATION_FAILED


async def test_require_seamless_with_the_client_blocked_releases_the_hold(
    shared_lab: LabState,
) -> None:
    """The client cannot reach the destination: ``--require-seamless`` aborts the held
    job; the domain stays on the source at its old bandwidth, the client with it."""
    domain, uris, source = _uris(shared_lab)
    before = _bandwidth_before(uris, domain, source)

    def nothing(_state: libvirt_lab.LabState, _src: str, _dst: str) -> None:
        return None

    report, src, _dst = await _held_migration(
        shared_lab, nothing, require_seamless=True, hold_timeout=3.0
    )
    views = faults.libvirt_views(uris, domain)
    faults.record_row(
        path="libvirt",
        scenario="client blocked, --require-seamless",
        outcome=report.outcome,
        placement=report.placement,
        exit_code=int(for_report(report)),
        runs_on=faults.running_on(views),
        bandwidth_before=before,
        bandwidth_after=views[src].qemu_max_bandwidth,
        jobs=[v.job for v in views.values()],
    )
    assert report.outcome == "cancelled", report.notes
    assert report.placement == "source"
    assert for_report(report) is ExitCode.MIGRATION_FAILED
    host = await asyncio.to_thread(_check_left_clean, uris, domain, before, src)
    assert host == src


async def test_link_between_the_hosts_cut_mid_job(shared_lab: LabState) -> None:
    """The destination host drops off the network while the job is held: libvirt's
    keepalive ends the job, the source keeps (or gets back) the domain, and the report
    places it there; the link comes back afterwards."""
    domain, uris, source = _uris(shared_lab)
    before = _bandwidth_before(uris, domain, source)
    state = fresh_state(shared_lab)
    cut: list[str] = []

    def cut_link(state: libvirt_lab.LabState, _src: str, dst: str) -> None:
        netns.ip(state.switch_netns, "link", "set", f"p{dst}", "down")
        cut.append(dst)

    try:
        report, src, _dst = await _held_migration(
            shared_lab, cut_link, hold_timeout=5.0, completion_timeout=90.0
        )
    finally:
        for dst in cut:
            netns.link_up(state.switch_netns, f"p{dst}", master="br0")
    host = await asyncio.to_thread(_check_left_clean, uris, domain, None, None)
    views = faults.libvirt_views(uris, domain)
    faults.record_row(
        path="libvirt",
        scenario="link between the hosts cut mid-hold",
        placement=report.placement,
        runs_on=host,
        exit_code=int(for_report(report)),
        jobs=[v.job for v in views.values()],
        bandwidth_before=before,
        bandwidth_after=views[host].qemu_max_bandwidth,
    )
    assert host == src, views
    assert report.placement == "source", report.notes
    assert views[host].qemu_max_bandwidth == before, views
    assert for_report(report) is ExitCode.MIGRATION_FAILED


# --------------------------------------------------------------------------- a lossy client link

#: a poor client link: 300 ms RTT (the lab's), 2 % loss and 20 ms jitter each way
LOSS_PCT, JITTER_MS, SEED = 2.0, 20.0, 8


async def _migrate_watched(
    state: libvirt_lab.LabState, request: LibvirtMigrationRequest, source: HostName
) -> LibvirtMigrationReport:
    """``lab migrate``'s own path (witness first, its one-way time into the request), with
    the guest's port stream checked by the embedded client."""
    endpoint = libvirt_lab.spice_endpoint(state, source)
    assert endpoint is not None
    options = ClientOptions(host=endpoint.address, port=endpoint.port, stream_port_name=PORT)
    witness = netns_witness(options, state.client.netns)
    async with witness:
        request = request.model_copy(update={"witness_one_way_ms": witness.one_way_ms})
        report = await migrate_libvirt(request, witness)
        report.notes.append(f"client RTT to the source {witness.rtt_ms} ms (TCP connect)")
        return report


def test_lossy_jittery_client_link_migration_settles_and_says_how(libvirt_lab_dir: Path) -> None:
    """A lab of its own with the linux guest, whose port stream the client checks for gaps
    (the firmware guest of the other scenarios writes no stream).

    Client link at 300 ms with 2 % loss and 20 ms jitter: a ``lab migrate`` with the
    embedded client. Whatever the outcome, the domain ends on exactly one host with no job
    and no throttle, the client is attached where it runs (or its loss is reported), a
    seamless outcome has an unbroken stream, and the exit code is the report's."""
    state = libvirt_lab.up(libvirt_lab_dir, client_rtt_ms=RTT_MS, guest="linux")
    domain, uris, source = _uris(state)
    destination = "B" if source == "A" else "A"
    before = _bandwidth_before(uris, domain, source)
    delaybridge.set_impairment(state.bridge.control, loss_pct=LOSS_PCT, jitter_ms=JITTER_MS)
    start = delaybridge.reseed(state.bridge.control, SEED)

    def run(st: LabState, src: HostName, dst: HostName) -> LibvirtMigrationReport:
        return asyncio.run(_migrate_watched(st, lab_request(st, src, dst), src))

    try:  # a failed migration is judged below
        report = migrate_by_report(libvirt_lab_dir, run)
    finally:
        end = delaybridge.set_impairment(state.bridge.control, loss_pct=0.0, jitter_ms=0.0)
    host = _check_left_clean(uris, domain, None, None)
    views = faults.libvirt_views(uris, domain)
    other = destination if host == source else source
    client = report.clients[0] if report.clients else None
    stream = report.stream
    lost = [a - b for a, b in zip(end.dropped_loss, start.dropped_loss, strict=True)]
    faults.record_row(
        path="libvirt",
        scenario="client link 300 ms, 2 % loss, 20 ms jitter",
        outcome=report.outcome,
        placement=report.placement or ("destination" if host == destination else "source"),
        exit_code=int(for_report(report)),
        runs_on=host,
        client_path=client.path if client else None,
        connection_id_kept=client.connection_id_kept if client else None,
        link_wait=report.link_wait.result,
        link_wait_ms=report.link_wait.duration_ms,
        stream_records=stream.records if stream else None,
        stream_gaps=stream.gaps if stream else None,
        stream_duplicates=stream.duplicates if stream else None,
        stream_max_stall_ms=stream.max_stall_ms if stream else None,
        frames_lost_on_purpose=lost,
        bandwidth_before=before,
        bandwidth_after=views[host].qemu_max_bandwidth,
        jobs=[v.job for v in views.values()],
        notes=report.notes,
    )
    print(f"lossy link: {report.outcome}, on {host}, client {client}, stream {stream}, lost {lost}")
    assert sum(lost) > 0, "the bridge lost nothing: the impairment was not in place"
    assert faults.qemu_pids_in(state.hosts[other].config.netns, domain) == []
    assert views[host].qemu_max_bandwidth != faults.HOLD_BYTES_PER_S, views
    if host == source:
        assert views[host].qemu_max_bandwidth == before, views
        assert report.placement == "source", report.notes
        assert for_report(report) is ExitCode.MIGRATION_FAILED, report.notes
    else:
        assert report.migration.status == "completed", report.notes
    assert client is not None, report.notes  # the embedded client was there all along
    if report.outcome == "seamless":
        assert host == destination
        assert client.path == "seamless"
        assert client.connection_id_kept, client  # attached where the VM runs, same session
        assert stream is not None
        assert stream.records > 0, stream
        assert (stream.gaps, stream.duplicates) == (0, 0), stream
        assert for_report(report) is ExitCode.OK
    elif host == destination:  # it moved without its client following seamlessly: said so
        assert report.outcome in (
            "semi-seamless", "switch-host", "client-lost", "failed"
        ), report.notes  # fmt: skip
        assert for_report(report) in (
            ExitCode.NOT_SEAMLESS, ExitCode.CLIENT_LOST, ExitCode.MIGRATION_FAILED
        )  # fmt: skip
