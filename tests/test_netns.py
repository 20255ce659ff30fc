"""Real network namespaces: created, wired, entered, emptied and removed without a trace."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt.errors import LabError
from spice_libvirt_lab import netns

pytestmark = pytest.mark.root  # network namespaces


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Two fresh namespace names; whatever the test left is deleted afterwards."""
    prefix = f"slabt{secrets.token_hex(3)}"
    made = [f"{prefix}X", f"{prefix}Y"]
    try:
        yield made
    finally:
        for name in made:
            netns.delete(name)


def _thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_pair_talks_and_delete_leaves_nothing(names: list[str]) -> None:
    x, y = names
    netns.add(x)
    netns.add(y)
    assert {x, y} <= set(netns.list_names())
    netns.add_veth(x, "eth0", y, "eth0")
    netns.add_address(x, "eth0", "10.251.250.1/24")
    netns.add_address(y, "eth0", "10.251.250.2/24")
    # the address exists only inside the namespaces
    assert (
        "10.251.250.1"
        not in subprocess.run(
            ["ip", "-o", "addr"], capture_output=True, text=True, check=True
        ).stdout
    )

    server = netns.socket_in(x)
    server.bind(("10.251.250.1", 0))
    server.listen(2)
    port = server.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        for _ in range(4):  # three RTT probes, then the real client
            conn, _ = server.accept()
            got.append(conn.recv(16))
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    # the fastest of three: on a loaded machine one SYN or ARP request may be retried (1 s)
    ms = min(netns.tcp_connect_ms(y, "10.251.250.1", port) for _ in range(3))
    client = netns.socket_in(y)
    client.connect(("10.251.250.1", port))
    client.sendall(b"hello")
    client.close()
    t.join(30)
    server.close()
    assert got == [b"", b"", b"", b"hello"]
    assert 0 <= ms < 50  # a direct veth pair: no delay anywhere between the namespaces

    # a process started inside is found by namespace and ended by delete()
    proc = subprocess.Popen(netns.exec_argv(x, ["sleep", "60"]))
    netns.wait_for(lambda: len(netns.pids_in(x)) >= 1, timeout=30, what="sleep in netns")
    inside = [netns.ProcRef.of(pid) for pid in netns.pids_in(x)]
    netns.delete(x)
    netns.delete(y)
    proc.wait(30)
    assert not any(ref.alive() for ref in inside)
    assert not {x, y} & set(netns.list_names())  # other users' namespaces may come and go
    mounts = Path("/proc/self/mountinfo").read_text()
    assert x not in mounts
    assert y not in mounts


def test_call_in_moves_only_a_helper_thread(names: list[str]) -> None:
    x, _ = names
    netns.add(x)
    home = _thread_netns()
    inside = netns.call_in(x, _thread_netns)
    assert inside == netns.inode(x) != home
    assert _thread_netns() == home
    ifaces = netns.call_in(x, lambda: sorted(n for _, n in socket.if_nameindex()))
    assert ifaces == ["lo"]


def test_call_in_propagates_errors(names: list[str]) -> None:
    x, _ = names
    netns.add(x)

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        netns.call_in(x, boom)


def test_unknown_or_taken_names_are_clear_errors(names: list[str]) -> None:
    x, _ = names
    with pytest.raises(LabError, match="does not exist"):
        netns.call_in(x, lambda: None)
    with pytest.raises(LabError, match="does not exist"):
        netns.inode(x)
    netns.add(x)
    with pytest.raises(LabError, match="already exists"):
        netns.add(x)
    with pytest.raises(LabError, match="ip -n"):
        netns.ip(x, "link", "set", "dev", "nosuchif", "up")
    netns.delete(x)
    netns.delete(x)  # deleting a missing namespace is fine
    with pytest.raises(LabError):
        netns.tcp_connect_ms("nosuchns0", "127.0.0.1", 1)


def test_etc_files_reach_programs_run_inside(names: list[str]) -> None:
    x, _ = names
    netns.add(x)
    netns.write_etc_file(x, "hosts", "127.0.0.1 localhost\n10.251.250.9 hostZ\n")
    out = netns.run_in(x, ["cat", "/etc/hosts"]).stdout
    assert "hostZ" in out
    netns.delete(x)
    assert not (netns.NETNS_ETC_DIR / x).exists()


def test_procref_never_signals_a_recycled_pid() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        real = netns.ProcRef.of(proc.pid, "sleep")
        impostor = netns.ProcRef(pid=proc.pid, start_time=real.start_time + 1)
        assert real.alive()
        assert not impostor.alive()
        netns.terminate([impostor], timeout=0.5)
        assert proc.poll() is None  # untouched
        assert netns.terminate([real], timeout=5) == []  # SIGTERM was enough
        proc.wait(5)  # terminate() reaped it already (its status went to waitpid)
        assert not real.alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_terminate_escalates_to_sigkill() -> None:
    # an ignored SIGTERM survives exec; "ready" says the trap is in place (no guessing a delay)
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; echo ready; exec sleep 60"], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        ref = netns.ProcRef.of(proc.pid)
        assert netns.terminate([ref], timeout=0.5) == [proc.pid]  # needed SIGKILL
        proc.wait(5)
        assert not ref.alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_wait_for_retries_transient_errors_and_times_out() -> None:
    calls: list[int] = []

    def soon() -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise FileNotFoundError("not yet")
        return len(calls) >= 4

    netns.wait_for(soon, timeout=5, what="soon", interval=0.01)
    assert len(calls) == 4
    with pytest.raises(LabError, match="waiting for never"):
        netns.wait_for(lambda: False, timeout=0.1, what="never", interval=0.01)

    def broken() -> bool:
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        netns.wait_for(broken, timeout=5, what="broken")
