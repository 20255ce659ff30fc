"""Host evacuation for real: four SPICE domains with a client each, 50 ms away, A -> B.

The clients are our embedded client, one per domain, in the lab's client namespace; the
evacuation does *not* get them as witnesses, so each verdict comes from what a
third-party client leaves behind: the destination's graphics events for the hold and its
``query-spice`` connection ids for the verdict. The guests are the lab's firmware guests,
which the taint-free hold cannot always keep: these evacuations allow the monitor
passthrough explicitly (``allow_taint``); ``tests/test_taint_free.py`` evacuates a guest it
can keep, without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys

import pytest

from spice_libvirt import api
from spice_libvirt.errors import ConfigError
from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.libvirt.connection import Connection
from spice_libvirt.libvirt.controller import spice_graphics
from spice_libvirt.libvirt.evacuate import evacuate, spice_domains
from spice_libvirt.spice.client import ClientOptions
from spice_libvirt_lab import libvirt_lab
from spice_libvirt_lab.libvirt_migrate import start_extra_domains
from spice_libvirt_lab.libvirt_state import LabState
from spice_libvirt_lab.witness_thread import ThreadedWitness, netns_witness
from tests import faults
from tests.rigs.libvirt_lab import lab_marks

libvirt = pytest.importorskip("libvirt")

pytestmark = lab_marks(client_rtt_ms=50)


async def _endpoints(uri: str, names: list[str]) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    async with await Connection.open(uri) as conn:
        for name in names:
            dom = await conn.lookup(name)
            listen, port, _tls = spice_graphics(await conn.call(dom.XMLDesc, "xml")) or (
                None,
                None,
                None,
            )
            assert listen is not None
            assert port is not None
            out[name] = (listen, port)
    return out


async def test_evacuate_four_domains_with_clients_all_seamless(shared_lab: LabState) -> None:
    state = libvirt_lab.load_state(shared_lab.lab_dir)
    assert state is not None
    extra = await start_extra_domains(shared_lab.lab_dir, 3, host="A")
    names = sorted([state.domain, *extra])
    endpoints = await _endpoints(state.hosts["A"].uri_unix, names)
    witnesses: list[ThreadedWitness] = []
    try:
        for name in names:
            host, port = endpoints[name]
            w = netns_witness(
                ClientOptions(host=host, port=port, stream_port_name=None, link_timeout=30.0),
                state.client.netns,
            )
            await w.start()
            witnesses.append(w)
        report = await api.evacuate_host_async(
            state.hosts["A"].uri_unix,
            state.hosts["B"].uri_tcp,
            to_connect=state.hosts["B"].uri_unix,
            parallel=2,
            allow_taint=True,
        )
        assert [d.domain for d in report.domains] == names
        for d in report.domains:
            assert d.report is not None, d.error
            assert d.outcome == "seamless", (d.domain, d.report.hold, d.report.notes)
            assert d.report.tainted
            # the QMP throttle only when the taint-free hold was about to run out
            assert (d.report.hold.applied == "qmp-throttle") == (
                d.report.hold.escalated is not None
            )
            assert d.report.hold.release_reason is not None
            assert "destination initialized 5/5" in d.report.hold.release_reason
            (client,) = d.report.clients
            assert client.kind == "external"
            assert client.connection_id_kept
        assert report.all_seamless
        assert report.exit_code() == ExitCode.OK
        # every client followed, by its own account too
        for w in witnesses:
            record = await w.next_migration(timeout=10)
            assert record.path == "seamless"
            assert record.connection_id_kept
    finally:
        for w in witnesses:
            with contextlib.suppress(Exception):
                await w.stop()
    st = libvirt_lab.status(shared_lab.lab_dir)
    b = next(h for h in st.hosts if h.name == "B")
    assert all(b.domains.get(n) == "running" for n in names)


def test_evacuate_back_through_the_cli_without_clients(shared_lab: LabState) -> None:
    state = libvirt_lab.load_state(shared_lab.lab_dir)
    assert state is not None
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spice_libvirt",
            "evacuate",
            "--from",
            state.hosts["B"].uri_unix,
            "--to",
            state.hosts["A"].uri_tcp,
            "--to-connect",
            state.hosts["A"].uri_unix,
            "--parallel",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["domains"]) == 4
    assert {d["outcome"] for d in report["domains"]} == {"no-client"}
    assert report["all_seamless"] is True


async def test_evacuate_refuses_bad_parallel() -> None:
    with pytest.raises(ConfigError):
        await evacuate("qemu:///x", "qemu:///y", parallel=0)


def test_evacuate_unreachable_source_is_exit_code_3() -> None:
    rc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spice_libvirt",
            "evacuate",
            "--from",
            "qemu+unix:///system?socket=/nonexistent/sock",
            "--to",
            "qemu+tcp://nowhere/system",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    ).returncode
    assert rc == ExitCode.UNREACHABLE


async def test_cancelled_evacuation_leaves_every_domain_on_the_source_unthrottled(
    shared_lab: LabState,
) -> None:
    """Cancelled (what Ctrl-C does to the CLI) while every job is held: each domain's own
    undo runs to its end -- no job, no throttle, every domain on A -- before it unwinds."""
    state = libvirt_lab.load_state(shared_lab.lab_dir)
    assert state is not None
    uri_a = state.hosts["A"].uri_unix
    uris = {"A": uri_a, "B": state.hosts["B"].uri_unix}
    names, _skipped = await spice_domains(uri_a)
    assert names
    endpoints = await _endpoints(uri_a, names)
    before = {n: faults.libvirt_host_view(uri_a, n).qemu_max_bandwidth for n in names}
    bogus = state.subnet.replace(".0/24", ".99")
    witnesses: list[ThreadedWitness] = []
    try:
        for name in names:
            host, port = endpoints[name]
            w = netns_witness(
                ClientOptions(host=host, port=port, stream_port_name=None, link_timeout=30.0),
                state.client.netns,
            )
            await w.start()
            witnesses.append(w)
        task = asyncio.create_task(
            evacuate(
                uri_a,
                state.hosts["B"].uri_tcp,
                destination_connect_uri=state.hosts["B"].uri_unix,
                parallel=len(names),
                options={
                    "graphics_uri": f"spice://{bogus}:5900",
                    "hold_timeout": 30.0,
                    # the throttle from the start (it is what must be undone): allowed
                    "allow_taint": True,
                    "hold": "qmp",
                },
            )
        )
        held = await asyncio.to_thread(
            faults.wait_for,
            lambda: task.done() or all(faults.throttled(uri_a, n) for n in names),
            90,
        )
        assert held
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(180):
                await task
        for name in names:
            views = faults.libvirt_views(uris, name)
            faults.record_row(
                path="libvirt",
                scenario="evacuation cancelled mid-hold",
                domain=name,
                runs_on=faults.running_on(views),
                jobs=[v.job for v in views.values()],
                bandwidth_before=before[name],
                bandwidth_after=views["A"].qemu_max_bandwidth,
            )
            assert faults.settled(views), (name, views)
            assert faults.running_on(views) == ["A"], (name, views)
            assert views["A"].qemu_max_bandwidth == before[name], (name, views)
    finally:
        for w in witnesses:
            with contextlib.suppress(Exception):
                await w.stop()
