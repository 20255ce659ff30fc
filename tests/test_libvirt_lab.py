"""The two-host libvirt lab, for real: namespaces, two libvirtds, a guest, migrations, teardown.

Each test builds its own lab in ``libvirt_lab_dir`` (unique ``slab<hex>`` namespaces, its own
state directory) and checks that ``down`` leaves no process, namespace or mount behind, also
after a crash.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.record import ClientMigrationRecord, StreamStats
from spice_libvirt_lab import labdir, libvirt_lab, netns
from spice_libvirt_lab.libvirt_host import LibvirtHost
from spice_libvirt_lab.libvirt_lab import LabState
from tests.rigs.libvirt_lab import LIBVIRT_LAB, assert_lab_gone, lab_processes
from tests.rigs.viewer import XServer, migration_messages, start_viewer

libvirt = pytest.importorskip("libvirt")

pytestmark = LIBVIRT_LAB


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _ours(prefix: str) -> list[str]:
    return [n for n in netns.list_names() if n.startswith(prefix)]


def _assert_gone(state: LabState, procs: list[netns.ProcRef]) -> None:
    """The rig's leak check, and nothing of the lab's files left either."""
    assert_lab_gone(state, procs)
    assert not (netns.NETNS_ETC_DIR / state.client.netns).exists()
    assert not state.run_dir.exists()
    assert libvirt_lab.load_state(state.lab_dir) is None


def _embedded_client_channels(state: LabState, host: str, port: int | None) -> list[str]:
    """Link the embedded SPICE client from namespace C; return the channels it linked."""
    assert port is not None  # a plain lab always has a plain port

    async def link() -> list[str]:
        client = SpiceClient(ClientOptions(host=host, port=port, link_timeout=10))
        await client.connect()
        try:
            return client.channels
        finally:
            await client.close()

    return netns.call_in(state.client.netns, lambda: asyncio.run(link()), timeout=60)


def _stream_stats(state: LabState, host: str, port: int | None, seconds: float) -> StreamStats:
    """Read the guest's record stream from namespace C for a while; its continuity."""
    assert port is not None

    async def read() -> StreamStats:
        client = SpiceClient(ClientOptions(host=host, port=port, link_timeout=10))
        await client.connect()
        try:
            await client.port_stream(libvirt_lab.PORT_CHANNEL, timeout=10)
            await asyncio.sleep(seconds)
            return client.stream_stats()
        finally:
            await client.close()

    return netns.call_in(state.client.netns, lambda: asyncio.run(read()), timeout=60)


def _follow_one_migration(
    state: LabState, lab: Path, host: str, port: int | None
) -> tuple[ClientMigrationRecord, libvirt_lab.MigrationResult]:
    """Run the embedded SPICE client in namespace C, connected to ``host:port``, and migrate.

    The client's whole asyncio loop runs in a thread that lives in the client namespace, so
    every socket it opens goes through the client's (delayed) link.
    """
    linked = threading.Event()
    go_on = threading.Event()
    result: list[libvirt_lab.MigrationResult] = []

    async def client_side() -> ClientMigrationRecord:
        client = SpiceClient(ClientOptions(host=host, port=port, link_timeout=10))
        await client.connect()
        try:
            linked.set()
            record = await client.next_migration(timeout=90)
            go_on.wait(30)
            return record
        finally:
            await client.close()

    box: list[ClientMigrationRecord] = []

    def run_client() -> None:
        box.append(
            netns.call_in(state.client.netns, lambda: asyncio.run(client_side()), timeout=120)
        )

    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            run_client()
        except BaseException as exc:
            errors.append(exc)
            linked.set()

    t = threading.Thread(target=guarded)
    t.start()
    assert linked.wait(30)
    assert not errors, errors
    try:
        result.append(libvirt_lab.migrate(lab))
    finally:
        go_on.set()
        t.join(120)
    assert not errors, errors
    return box[0], result[0]


def test_up_status_rtt_migrate_ping_pong_down(libvirt_lab_dir: Path) -> None:
    state = libvirt_lab.up(libvirt_lab_dir, client_rtt_ms=50)

    # the layout: five namespaces with the lab's unique prefix, nothing else
    assert state.prefix.startswith("slab")
    assert sorted(_ours(state.prefix)) == sorted(state.namespaces)
    assert all(n.startswith(state.prefix) for n in state.namespaces)

    # two libvirtds with distinct host UUIDs, reachable from the root namespace by UNIX socket
    st = libvirt_lab.status(libvirt_lab_dir)
    assert st.healthy, st
    uuids = {h.name: h.host_uuid for h in st.hosts}
    assert uuids == {n: state.hosts[n].config.host_uuid for n in ("A", "B")}
    assert uuids["A"] != uuids["B"]
    for name in ("A", "B"):
        conn = libvirt.open(
            f"qemu+unix:///system?socket={state.hosts[name].config.state_dir}"
            "/run/libvirt/libvirt-sock"
        )
        try:
            assert conn.getHostname() == f"host{name}"
        finally:
            conn.close()
    assert st.active_host == "A"
    assert st.hosts[0].domains == {"labvm": "running"}
    assert "labvm" not in st.hosts[1].domains
    assert st.spice is not None
    assert st.spice.address == state.hosts["A"].config.ip
    # the guest's QEMU is the child of the host's subreaper: reaped the moment it exits,
    # so libvirt's return after a migration waits for no late reaping (lab/reaper.py)
    reaper = state.hosts["A"].runtime.reaper
    assert reaper is not None
    assert reaper.alive()
    children = [p for p in netns.pids_in(state.hosts["A"].config.netns) if _ppid(p) == reaper.pid]
    assert any("qemu" in Path(f"/proc/{p}/comm").read_text() for p in children), children

    # a second lab in the same directory is refused, the first one untouched
    with pytest.raises(LabError, match="already running"):
        libvirt_lab.up(libvirt_lab_dir)
    assert libvirt_lab.status(libvirt_lab_dir).healthy

    # the client link has the requested RTT (TCP connect to A's SPICE port), and it can change
    probe = libvirt_lab.probe_rtt(libvirt_lab_dir)
    assert probe.target == f"{st.spice.address}:{st.spice.port}"
    # (a delay is never shorter than asked; the upper bounds are generous: the machine is shared)
    assert 50 * 0.95 <= probe.median_ms < 50 + 100
    libvirt_lab.set_client_rtt(libvirt_lab_dir, 150)
    assert 150 * 0.95 <= libvirt_lab.probe_rtt(libvirt_lab_dir).median_ms < 150 + 100
    libvirt_lab.set_client_rtt(libvirt_lab_dir, 0)
    assert libvirt_lab.probe_rtt(libvirt_lab_dir).median_ms < 50
    # loss and jitter reach the running bridge (what `lab rtt --loss-pct --jitter-ms` sets)
    stats = libvirt_lab.set_client_impairment(libvirt_lab_dir, loss_pct=2.0, jitter_ms=20.0, seed=8)
    assert (stats.loss_pct, stats.jitter_ms, stats.seed) == ([2.0, 2.0], [20.0, 20.0], 8)
    stats = libvirt_lab.set_client_impairment(libvirt_lab_dir, loss_pct=0.0, jitter_ms=0.0)
    assert (stats.loss_pct, stats.jitter_ms) == ([0.0, 0.0], [0.0, 0.0])
    # the hosts' own link is not delayed
    a_to_b = netns.tcp_connect_ms(state.hosts["A"].config.netns, state.hosts["B"].config.ip, 16509)
    assert a_to_b < 50

    # the embedded client links every channel from namespace C, through the delayed link
    channels = _embedded_client_channels(state, st.spice.address, st.spice.port)
    assert {"main:0", "display:0", "inputs:0", "cursor:0"} <= set(channels)
    assert any(c.startswith("port:") for c in channels)  # the spiceport stream channel

    # A -> B, plain libvirt p2p driven from the root namespace over the UNIX socket
    first = libvirt_lab.migrate(libvirt_lab_dir)
    assert (first.source, first.destination, first.ok) == ("A", "B", True)
    assert first.spice_before == st.spice
    assert first.spice_after is not None
    assert first.spice_after.address == state.hosts["B"].config.ip
    assert libvirt_lab.status(libvirt_lab_dir).active_host == "B"
    after = _embedded_client_channels(state, first.spice_after.address, first.spice_after.port)
    assert set(after) == set(channels)

    # ping-pong: B -> A, then A -> B again
    second = libvirt_lab.migrate(libvirt_lab_dir)
    assert (second.source, second.destination) == ("B", "A")
    with pytest.raises(ConfigError, match="already runs"):
        libvirt_lab.migrate(libvirt_lab_dir, to="A")
    third = libvirt_lab.migrate(libvirt_lab_dir, to="B")
    assert (third.source, third.destination) == ("A", "B")
    final = libvirt_lab.status(libvirt_lab_dir)
    assert final.active_host == "B"
    assert final.migrations == 3
    assert final.healthy

    procs = lab_processes(state)
    assert len(procs) >= 6  # bridge, 2 x (libvirtd, virtlogd), the guest's qemu
    report = libvirt_lab.down(libvirt_lab_dir)
    assert report.found
    assert report.leftovers == []
    assert "domain labvm on B" in report.stopped
    _assert_gone(state, procs)
    assert libvirt_lab.down(libvirt_lab_dir).found is False


def test_down_after_a_crash(libvirt_lab_dir: Path) -> None:
    state = libvirt_lab.up(libvirt_lab_dir)
    procs = lab_processes(state)
    daemons_a = {
        ref.pid
        for ref in (
            state.hosts["A"].runtime.libvirtd,
            state.hosts["A"].runtime.virtlogd,
            state.hosts["A"].runtime.reaper,
        )
        if ref is not None
    } | {d.proc.pid for d in state.daemons if d.where == "A"}  # its sshd
    qemu = [p for p in netns.pids_in(state.hosts["A"].config.netns) if p not in daemons_a]
    assert qemu, "the guest's qemu should run in A's namespace"
    # the crash: A's libvirtd and the bridge die hard, B's virtlogd too; the state file stays
    for ref in (
        state.hosts["A"].runtime.libvirtd,
        state.bridge.proc,
        state.hosts["B"].runtime.virtlogd,
    ):
        assert ref is not None
        os.kill(ref.pid, signal.SIGKILL)
    bridge = state.bridge.proc
    assert bridge is not None
    netns.wait_for(lambda: not bridge.alive(), timeout=30, what="the bridge to die")
    st = libvirt_lab.status(libvirt_lab_dir)
    assert st.running
    assert not st.healthy
    assert not st.hosts[0].libvirtd_alive
    # half alive is still "running": a new lab is refused
    with pytest.raises(LabError, match="already running"):
        libvirt_lab.up(libvirt_lab_dir)

    report = libvirt_lab.down(libvirt_lab_dir)
    assert report.leftovers == []
    assert set(qemu) <= set(report.swept_pids)  # the orphaned qemu, found by namespace
    _assert_gone(state, procs)


def test_failed_up_cleans_up_after_itself(libvirt_lab_dir: Path) -> None:
    seen: list[LibvirtHost] = []

    def sabotage(host: LibvirtHost) -> None:
        seen.append(host)
        if host.config.name == "B":  # A is already running at this point
            raise LabError("sabotaged before host B started")

    with pytest.raises(LabError, match="sabotaged"):
        libvirt_lab.up(libvirt_lab_dir, before_start=sabotage)
    assert [h.config.name for h in seen] == ["A", "B"]
    a = seen[0].runtime
    assert a.libvirtd is not None
    assert a.virtlogd is not None
    assert not a.libvirtd.alive()
    assert not a.virtlogd.alive()
    assert _ours(seen[0].config.netns[:-1]) == []
    assert libvirt_lab.load_state(libvirt_lab_dir) is None


def test_stale_state_file_does_not_block_a_new_lab(libvirt_lab_dir: Path) -> None:
    state = libvirt_lab.up(libvirt_lab_dir)
    stale = (libvirt_lab_dir / libvirt_lab.STATE_FILE).read_text()
    libvirt_lab.down(libvirt_lab_dir)
    (libvirt_lab_dir / libvirt_lab.STATE_FILE).write_text(
        stale
    )  # as if down had crashed at the very end
    fresh = libvirt_lab.up(libvirt_lab_dir)
    assert fresh.id != state.id
    assert libvirt_lab.status(libvirt_lab_dir).healthy
    libvirt_lab.down(libvirt_lab_dir)
    assert _ours(state.prefix) == []
    assert _ours(fresh.prefix) == []


def test_bad_input_is_refused_before_anything_starts(
    libvirt_lab_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_namespaces(name: str) -> None:
        raise AssertionError(f"bad input must be refused before namespace {name} is made")

    monkeypatch.setattr(netns, "add", no_namespaces)
    with pytest.raises(ConfigError, match="memory"):
        libvirt_lab.up(libvirt_lab_dir, memory_mib=1)
    with pytest.raises(ConfigError, match="rtt"):
        libvirt_lab.up(libvirt_lab_dir, client_rtt_ms=-3)
    with pytest.raises(ConfigError, match="unknown guest"):
        libvirt_lab.up(libvirt_lab_dir, guest="windows")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="domain name"):
        libvirt_lab.up(libvirt_lab_dir, domain="bad name/..")
    with pytest.raises(LabError, match="no libvirt lab"):
        libvirt_lab.migrate(libvirt_lab_dir)
    assert libvirt_lab.down(libvirt_lab_dir).found is False
    assert libvirt_lab.status(libvirt_lab_dir).running is False
    (libvirt_lab_dir / libvirt_lab.STATE_FILE).write_text("{not json")
    with pytest.raises(LabError, match="unreadable"):
        libvirt_lab.status(libvirt_lab_dir)
    (libvirt_lab_dir / libvirt_lab.STATE_FILE).unlink()


def test_embedded_client_in_c_follows_a_migration(libvirt_lab_dir: Path) -> None:
    """The embedded client, living in namespace C, follows the guest from A to B.

    Plain p2p migration does not wait for the client, so the path may be seamless or a
    switch-host fallback; either way the client must end up on B with its channels.
    """
    state = libvirt_lab.up(libvirt_lab_dir, client_rtt_ms=0)
    spice = libvirt_lab.status(libvirt_lab_dir).spice
    assert spice is not None
    record, result = _follow_one_migration(state, libvirt_lab_dir, spice.address, spice.port)
    assert (result.source, result.destination) == ("A", "B")
    assert result.spice_after is not None
    assert record.path in ("seamless", "semi-seamless", "switch-host"), record
    assert record.destination == f"{result.spice_after.address}:{result.spice_after.port}"
    assert "display:0" in record.channels_after


def _established(ns: str, address: str, port: int | None) -> int:
    out = netns.run_in(ns, ["ss", "-tnH", "state", "established"]).stdout
    return sum(1 for line in out.splitlines() if f"{address}:{port}" in line.split()[-1:])


def test_remote_viewer_in_c_follows_the_guest(
    libvirt_lab_dir: Path, x_server: XServer, lab_dir: Path
) -> None:
    """remote-viewer started in C by lab hostname stays connected across A -> B."""
    state = libvirt_lab.up(libvirt_lab_dir, client_rtt_ms=0)
    spice = libvirt_lab.status(libvirt_lab_dir).spice
    assert spice is not None
    # the lab's host name, resolved via /etc/netns/<C>/hosts
    uri = f"spice://hostA:{spice.port}"
    viewer = start_viewer(uri, x_server.display, lab_dir, ns=state.client.netns)
    try:
        a, b = state.hosts["A"].config.ip, state.hosts["B"].config.ip
        netns.wait_for(
            lambda: _established(state.client.netns, a, spice.port) >= 4,
            timeout=30,
            what="remote-viewer to link its channels to A",
        )
        result = libvirt_lab.migrate(libvirt_lab_dir)
        assert result.spice_after is not None
        port_b = result.spice_after.port
        netns.wait_for(
            lambda: (
                _established(state.client.netns, b, port_b) >= 4
                and _established(state.client.netns, a, spice.port) == 0
            ),
            timeout=30,
            what="remote-viewer to move to B",
        )
        assert viewer.alive(), "remote-viewer exited"
        assert migration_messages(viewer.log_text()), viewer.log_text()[-2000:]
    finally:
        viewer.stop()


def test_linux_guest_boots_on_a_and_migrates(libvirt_lab_dir: Path) -> None:
    """The TCG linux guest (kernel + initrd from lab.guest) boots, streams, and ping-pongs."""
    state = libvirt_lab.up(libvirt_lab_dir, guest="linux")
    assert state.timings.guest_ready_s is not None
    assert "GUEST-READY" in libvirt_lab.serial_log(state, "A").read_text()
    spice = libvirt_lab.status(libvirt_lab_dir).spice
    assert spice is not None
    channels = _embedded_client_channels(state, spice.address, spice.port)
    assert any(c.startswith("port:") for c in channels)
    there = libvirt_lab.migrate(libvirt_lab_dir)
    back = libvirt_lab.migrate(libvirt_lab_dir)
    assert (there.destination, back.destination) == ("B", "A")
    assert libvirt_lab.status(libvirt_lab_dir).healthy
    # after two migrations the guest still runs and streams records to a client in C
    spice = libvirt_lab.status(libvirt_lab_dir).spice
    assert spice is not None
    stats = _stream_stats(state, spice.address, spice.port, seconds=1.5)
    assert stats.records > 100
    assert stats.gaps == 0
    assert stats.duplicates == 0
    # console history survives the return to A (append='on')
    assert "GUEST-READY" in libvirt_lab.serial_log(state, "A").read_text()
    procs = lab_processes(state)
    assert libvirt_lab.down(libvirt_lab_dir).leftovers == []
    _assert_gone(state, procs)


HOOK = """#!/bin/sh
# test hook: record argv, pass the XML through unchanged
echo "$(hostname) $*" >> /var/log/libvirt/hook-calls.log
cat > /dev/null
exit 0
"""


def test_hooks_installed_before_start_and_after_restart(libvirt_lab_dir: Path) -> None:
    """A hook in a host's private /etc/libvirt/hooks runs there (and only there)."""

    def install(host: LibvirtHost) -> None:
        if host.config.name == "A":
            hook = host.etc_dir / "hooks" / "qemu"
            hook.write_text(HOOK)
            hook.chmod(0o755)

    state = libvirt_lab.up(libvirt_lab_dir, before_start=install)
    log_a = state.hosts["A"].config.state_dir / "log" / "hook-calls.log"
    log_b = state.hosts["B"].config.state_dir / "log" / "hook-calls.log"
    assert "hostA labvm started begin -" in log_a.read_text()

    # install on B afterwards: needs a libvirtd restart, the lab keeps tracking the new PID
    b = state.host("B")
    (b.etc_dir / "hooks" / "qemu").write_text(HOOK)
    (b.etc_dir / "hooks" / "qemu").chmod(0o755)
    old_pid = state.hosts["B"].runtime.libvirtd
    state = libvirt_lab.restart_libvirtd(libvirt_lab_dir, "B")
    new_pid = state.hosts["B"].runtime.libvirtd
    assert old_pid is not None
    assert new_pid is not None
    assert new_pid.pid != old_pid.pid
    assert not old_pid.alive()
    st = libvirt_lab.status(libvirt_lab_dir)
    assert st.healthy
    assert st.hosts[1].host_uuid == state.hosts["B"].config.host_uuid

    libvirt_lab.migrate(libvirt_lab_dir)
    calls_b = log_b.read_text()
    assert "hostB labvm migrate begin -" in calls_b
    assert "hostB labvm started begin -" in calls_b
    assert "hostA labvm release end -" in log_a.read_text()


def test_purge_removes_a_lab_whose_state_is_lost(libvirt_lab_dir: Path) -> None:
    state = libvirt_lab.up(libvirt_lab_dir)
    procs = lab_processes(state)
    shutil.rmtree(libvirt_lab_dir)  # state file, logs and sockets gone; the lab still runs
    assert libvirt_lab.down(libvirt_lab_dir).found is False
    with pytest.raises(ConfigError, match="not a lab prefix"):
        libvirt_lab.purge("slab")  # never a pattern that could match foreign namespaces
    report = libvirt_lab.purge(state.prefix)
    assert report.found
    assert sorted(report.namespaces_deleted) == sorted(state.namespaces)
    assert report.leftovers == []
    assert [p for p in procs if p.alive()] == []
    assert _ours(state.prefix) == []
    assert libvirt_lab.purge(state.prefix).found is False


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "lab", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_lab_up_libvirt_in_the_default_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """``lab up --libvirt`` with no --dir and no $SPICE_LIBVIRT_LAB_DIR: the default under
    /run, which each host's namespace replaces by its own /run (mounted last since)."""
    monkeypatch.delenv(labdir.LAB_DIR_ENV, raising=False)
    env = dict(os.environ)
    default = labdir.libvirt_lab_dir()
    assert default == Path("/run/spice-libvirt/lab/libvirt")
    existing = libvirt_lab.load_state(default)
    assert existing is None, f"a libvirt lab ({existing and existing.id}) is using {default}"
    try:
        up = _cli("up", "--libvirt", "--json", env=env)
        assert up.returncode == 0, up.stderr
        state = LabState.model_validate_json(up.stdout)
        assert state.lab_dir == default
        assert default in state.hosts["A"].config.state_dir.parents
        status = _cli("status", "--json", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["healthy"] is True
        lab_mode = stat.S_IMODE(default.stat().st_mode)
        assert lab_mode & 0o077 == 0, f"{default} is {lab_mode:o}"
        procs = lab_processes(state)
        down = _cli("down", "--json", env=env)
        assert down.returncode == 0, down.stderr
        assert json.loads(down.stdout)["leftovers"] == []
        _assert_gone(state, procs)
    finally:
        assert libvirt_lab.down(default).leftovers == []
