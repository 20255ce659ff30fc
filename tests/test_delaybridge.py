"""The delaying bridge: its queue logic (sans-IO) and the real process between namespaces."""

from __future__ import annotations

import os
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt.lab import delaybridge, netns
from spice_libvirt.lab.delaybridge import DelayLine

# --------------------------------------------------------------------------- DelayLine


def test_frames_wait_half_the_rtt_each_way() -> None:
    line = DelayLine(100.0)
    assert line.push(0, b"a", now=10.0)
    assert line.push(1, b"b", now=10.01)
    assert line.pop_due(0, 10.049) == []
    assert line.next_due() == pytest.approx(10.05)
    assert line.pop_due(0, 10.05) == [b"a"]
    assert line.pop_due(1, 10.05) == []
    assert line.pop_due(1, 10.06) == [b"b"]
    assert line.next_due() is None


def test_lowering_the_delay_never_reorders() -> None:
    line = DelayLine(300.0)
    line.push(0, b"slow", now=0.0)  # due at 0.15
    line.set_rtt(0.0)
    line.push(0, b"fast", now=0.01)  # would be due at 0.01, must wait behind "slow"
    assert line.pop_due(0, 0.02) == []
    assert line.pop_due(0, 0.15) == [b"slow", b"fast"]


def test_queue_is_bounded_in_frames_and_bytes() -> None:
    line = DelayLine(50.0, max_frames=3, max_bytes=delaybridge._RECV_BUF)
    assert all(line.push(0, b"x", 0.0) for _ in range(3))
    assert not line.push(0, b"x", 0.0)
    assert line.push(1, b"y" * delaybridge._RECV_BUF, 0.0)
    assert not line.push(1, b"y", 0.0)
    s = line.stats()
    assert s.dropped_full == [1, 1]
    assert s.queued == [3, 1]
    assert s.queued_bytes == [3, delaybridge._RECV_BUF]
    line.pop_due(0, 1.0)
    assert line.push(0, b"x", 1.0)  # room again


@pytest.mark.parametrize("bad", [-1.0, delaybridge.MAX_RTT_MS + 1])
def test_impossible_rtt_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="rtt"):
        DelayLine(bad)
    with pytest.raises(ConfigError):
        DelayLine(0.0, max_frames=0)


@given(
    st.lists(
        st.tuples(
            st.floats(0, 0.2),  # time step
            st.sampled_from([0, 1]),  # direction
            st.one_of(st.none(), st.floats(0, 500)),  # new RTT (ms) before the push
        ),
        max_size=60,
    )
)
def test_fifo_and_never_early(events: list[tuple[float, int, float | None]]) -> None:
    line = DelayLine(20.0)
    now = 0.0
    earliest: dict[bytes, float] = {}
    sent: list[list[bytes]] = [[], []]
    popped: list[list[bytes]] = [[], []]
    for i, (step, direction, rtt) in enumerate(events):
        now += step
        for d in (0, 1):
            for frame in line.pop_due(d, now):
                assert now >= earliest[frame]
                popped[d].append(frame)
        if rtt is not None:
            line.set_rtt(rtt)
        frame = str(i).encode()
        earliest[frame] = now + line.one_way_s
        assert line.push(direction, frame, now)
        sent[direction].append(frame)
    for d in (0, 1):
        popped[d] += line.pop_due(d, now + 10.0)
    assert popped == sent


# --------------------------------------------------------------------------- the real bridge

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@dataclass
class Rig:
    server_ns: str
    client_ns: str
    bridge: netns.ProcRef
    control: Path
    log: Path
    port: int


def _echo_server(sock: socket.socket) -> None:
    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)

    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


@pytest.fixture
def rig(lab_dir: Path) -> Iterator[Rig]:
    """server [X] eth0 -- a [S: delay bridge] b -- eth0 [Y] client, echo server on X."""
    prefix = f"slabt{secrets.token_hex(3)}"
    x, y, s = f"{prefix}X", f"{prefix}Y", f"{prefix}S"
    server: socket.socket | None = None
    try:
        for name in (x, y, s):
            netns.add(name)
        netns.add_veth(x, "eth0", s, "a")
        netns.add_veth(y, "eth0", s, "b")
        netns.link_up(s, "a", promisc=True)
        netns.link_up(s, "b", promisc=True)
        netns.add_address(x, "eth0", "10.251.251.1/24")
        netns.add_address(y, "eth0", "10.251.251.2/24")
        control, log = lab_dir / "bridge.ctl", lab_dir / "bridge.log"
        ref = delaybridge.spawn(s, "a", "b", rtt_ms=0, control_path=control, log_path=log)
        server = netns.socket_in(x)
        server.bind(("10.251.251.1", 0))
        server.listen(64)
        threading.Thread(target=_echo_server, args=(server,), daemon=True).start()
        yield Rig(x, y, ref, control, log, server.getsockname()[1])
    finally:
        if server is not None:
            server.close()
        for name in (x, y, s):
            netns.delete(name)
        assert not {x, y, s} & set(netns.list_names())


#: What a busy shared machine may add to a round trip (scheduling, not the bridge's delay).
SLACK_MS = 100.0


def _median_connect_ms(rig: Rig, n: int = 5) -> float:
    return statistics.median(
        netns.tcp_connect_ms(rig.client_ns, "10.251.251.1", rig.port) for _ in range(n)
    )


@needs_root
@pytest.mark.slow
def test_bridge_gives_the_requested_rtt(rig: Rig) -> None:
    """A delay is never shorter than asked; above it, bounds are generous (a shared machine
    adds scheduling latency, never removes delay)."""
    assert _median_connect_ms(rig) < SLACK_MS
    for rtt in (50.0, 150.0, 300.0):
        stats = delaybridge.set_rtt(rig.control, rtt)
        assert stats.rtt_ms == rtt
        measured = _median_connect_ms(rig)
        assert rtt * 0.95 <= measured < rtt + SLACK_MS, f"asked {rtt} ms, got {measured:.1f}"
    delaybridge.set_rtt(rig.control, 0)
    assert _median_connect_ms(rig) < SLACK_MS
    final = delaybridge.stats(rig.control)
    assert final.dropped_full == [0, 0]
    assert final.send_errors == [0, 0]
    assert min(final.forwarded) > 0


@needs_root
@pytest.mark.slow
def test_bulk_data_passes_intact_with_delay(rig: Rig) -> None:
    """GSO super-frames and partial checksums survive the bridge (PACKET_VNET_HDR)."""
    delaybridge.set_rtt(rig.control, 20)
    payload = os.urandom(8 << 20)
    sock = netns.socket_in(rig.client_ns)
    sock.settimeout(30)
    sock.connect(("10.251.251.1", rig.port))
    received = bytearray()

    def read() -> None:
        while len(received) < len(payload):
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    start = time.monotonic()
    sock.sendall(payload)
    reader.join(60)
    elapsed = time.monotonic() - start
    sock.close()
    assert bytes(received) == payload
    assert elapsed > 0.02  # it did go through the delay
    stats = delaybridge.stats(rig.control)
    assert stats.send_errors == [0, 0]


@needs_root
def test_control_rejects_bad_requests(rig: Rig) -> None:
    with pytest.raises(ConfigError, match="rtt"):
        delaybridge.set_rtt(rig.control, -5)
    with pytest.raises(ConfigError, match="unknown command"):
        delaybridge.control(rig.control, {"cmd": "reboot"})
    # garbage on the wire is answered, not fatal
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(rig.control))
        s.sendall(b"not json\n")
        assert b'"ok": false' in s.recv(4096)
    assert delaybridge.stats(rig.control).rtt_ms == 0.0


@needs_root
def test_sigterm_stops_cleanly(rig: Rig) -> None:
    assert rig.bridge.alive()
    assert netns.terminate([rig.bridge], timeout=30) == []  # no SIGKILL needed (generous)
    assert not rig.control.exists()
    log = rig.log.read_text()
    assert "delaybridge: stopped" in log
    assert "Traceback" not in log


@needs_root
def test_spawn_reports_a_bridge_that_cannot_start(lab_dir: Path) -> None:
    with pytest.raises(LabError, match=r"exited|does not exist"):
        delaybridge.spawn(
            "slabt-nosuchns",
            "a",
            "b",
            rtt_ms=0,
            control_path=lab_dir / "c.ctl",
            log_path=lab_dir / "c.log",
            timeout=5,
        )
    with pytest.raises(ConfigError):
        delaybridge.spawn(
            "x", "a", "b", rtt_ms=-1, control_path=lab_dir / "c", log_path=lab_dir / "l"
        )
