"""The delaying bridge: its queue logic (sans-IO) and the real process between namespaces."""

from __future__ import annotations

import contextlib
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
from spice_libvirt_lab import delaybridge, delayline, netns
from spice_libvirt_lab.delaybridge import DelayLine

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
    line = DelayLine(50.0, max_frames=3, max_bytes=delayline.RECV_BUF)
    assert all(line.push(0, b"x", 0.0) for _ in range(3))
    assert not line.push(0, b"x", 0.0)
    assert line.push(1, b"y" * delayline.RECV_BUF, 0.0)
    assert not line.push(1, b"y", 0.0)
    s = line.stats()
    assert s.dropped_full == [1, 1]
    assert s.queued == [3, 1]
    assert s.queued_bytes == [3, delayline.RECV_BUF]
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


# --------------------------------------------------------------------------- loss and jitter


def _delays(line: DelayLine, n: int, direction: int = 0, spacing: float = 10.0) -> list[float]:
    """One-way delays (ms) of ``n`` frames spaced far apart (no FIFO clamping between them)."""
    out = []
    for i in range(n):
        now = i * spacing
        if line.push(direction, b"f", now):
            (frame_due,) = [line.next_due()]
            assert frame_due is not None
            out.append((frame_due - now) * 1000.0)
            assert line.pop_due(direction, frame_due) == [b"f"]
    return out


def test_loss_is_random_at_the_asked_rate_per_direction() -> None:
    line = DelayLine(0.0, loss_pct=(10.0, 0.0), seed=1)
    kept = [sum(line.push(d, b"x", 0.0) for _ in range(10_000)) for d in (0, 1)]
    assert 8_700 < kept[0] < 9_300  # 10 % +- ~7 sigma
    assert kept[1] == 10_000
    s = line.stats()
    assert s.dropped_loss == [10_000 - kept[0], 0]
    assert s.dropped_full == [0, 0]
    assert s.loss_pct == [10.0, 0.0]


def test_uniform_jitter_spreads_around_the_delay_and_never_early() -> None:
    line = DelayLine(300.0, jitter_ms=20.0, seed=7)
    delays = _delays(line, 2_000)
    assert min(delays) >= 130.0 - 1e-6
    assert max(delays) <= 170.0 + 1e-6
    assert statistics.mean(delays) == pytest.approx(150.0, abs=1.5)
    assert statistics.stdev(delays) == pytest.approx(20.0 / 3**0.5, rel=0.1)  # uniform: w/sqrt(3)
    assert sum(d < 150.0 for d in delays) > 800  # both sides of the delay, not only above


def test_normal_jitter_has_the_asked_sigma_and_is_clamped_at_zero() -> None:
    line = DelayLine(300.0, jitter_ms=20.0, jitter_dist="normal", seed=7)
    delays = _delays(line, 4_000)
    assert statistics.mean(delays) == pytest.approx(150.0, abs=2.0)
    assert statistics.stdev(delays) == pytest.approx(20.0, rel=0.1)
    tiny = DelayLine(2.0, jitter_ms=50.0, jitter_dist="normal", seed=3)
    assert min(_delays(tiny, 500)) >= 0.0  # never released before it arrived


def test_jitter_keeps_the_order_of_back_to_back_frames() -> None:
    """Frames 1 ms apart with +-20 ms of jitter: released in order, never early."""
    line = DelayLine(100.0, jitter_ms=20.0, seed=5)
    for i in range(1_000):
        assert line.push(0, str(i).encode(), i / 1000.0)
    out: list[bytes] = []
    t = 0.0
    while (due := line.next_due()) is not None:
        t = max(t, due)
        batch = line.pop_due(0, t)
        out += batch
    assert out == [str(i).encode() for i in range(1_000)]


def test_the_same_seed_gives_the_same_losses_and_delays() -> None:
    def run(seed: int) -> tuple[list[bool], list[float]]:
        line = DelayLine(50.0, loss_pct=30.0, jitter_ms=10.0, seed=seed)
        kept = [line.push(1, b"x", float(i)) for i in range(200)]
        return kept, [due for due, _ in line._dirs[1].queue]

    assert run(42) == run(42)
    assert run(42) != run(43)
    line = DelayLine(0.0, loss_pct=50.0, seed=9)
    first = [line.lose(0) for _ in range(100)]
    line.reseed(9)
    assert [line.lose(0) for _ in range(100)] == first


def test_impairment_changes_one_direction_or_both_and_refuses_nonsense() -> None:
    line = DelayLine(10.0)
    assert not line.impaired
    line.set_impairment(loss_pct=2.0, jitter_ms=(20.0, 5.0))
    s = line.stats()
    assert (s.loss_pct, s.jitter_ms) == ([2.0, 2.0], [20.0, 5.0])
    line.set_impairment(loss_pct=0.0, direction=1, jitter_dist="normal")
    s = line.stats()
    assert (s.loss_pct, s.jitter_ms, s.jitter_dist) == ([2.0, 0.0], [20.0, 5.0], "normal")
    assert line.impaired
    for bad in (
        {"loss_pct": 101.0},
        {"loss_pct": -1.0},
        {"loss_pct": float("nan")},
        {"jitter_ms": delaybridge.MAX_JITTER_MS + 1},
        {"jitter_ms": (1.0, 2.0, 3.0)},
        {"jitter_dist": "pareto"},
        {"direction": 2},
    ):
        with pytest.raises(ConfigError):
            line.set_impairment(**bad)
    assert line.stats().loss_pct == [2.0, 0.0]  # a refused request changed nothing


# --------------------------------------------------------------------------- the real bridge

needs_root = pytest.mark.root  # network namespaces


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


@pytest.fixture
def udp_echo(rig: Rig) -> Iterator[int]:
    """A UDP echo server on the server side (one thread: it echoes in arrival order)."""
    server = netns.socket_in(rig.server_ns, type=socket.SOCK_DGRAM)
    server.bind(("10.251.251.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def echo() -> None:
        while True:
            try:
                data, peer = server.recvfrom(2048)
                server.sendto(data, peer)
            except OSError:
                return

    threading.Thread(target=echo, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def _udp_client(rig: Rig, port: int) -> socket.socket:
    sock = netns.socket_in(rig.client_ns, type=socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect(("10.251.251.1", port))
    sock.settimeout(10)
    sock.send(b"warm-up")  # resolve ARP before any loss: a lost ARP would distort the count
    assert sock.recv(64) == b"warm-up"
    return sock


def _burst(sock: socket.socket, n: int, pace_every: int = 50) -> list[int]:
    """Send ``n`` numbered probes, collect the echoes until the line has been quiet a while."""
    received: list[int] = []

    def read() -> None:
        sock.settimeout(3.0)  # quiet this long after the last echo: the burst is over
        with contextlib.suppress(TimeoutError):
            while len(received) < n:
                received.append(int(sock.recv(64)))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(n):
        sock.send(b"%d" % i)
        if i % pace_every == pace_every - 1:
            time.sleep(0.005)  # let the single-threaded echo server keep up
    reader.join(60)
    assert not reader.is_alive()
    return received


@needs_root
@pytest.mark.slow
def test_bridge_loses_the_asked_share_each_way(rig: Rig, udp_echo: int) -> None:
    """1000 UDP probes at 10 % loss each way: about 81 % come back (bounds: 70-90 %)."""
    sock = _udp_client(rig, udp_echo)
    try:
        before = delaybridge.set_impairment(rig.control, loss_pct=10.0)
        assert before.loss_pct == [10.0, 10.0]
        echoed = _burst(sock, 1000)
    finally:
        sock.close()
    after = delaybridge.set_impairment(rig.control, loss_pct=0.0)
    lost = [a - b for a, b in zip(after.dropped_loss, before.dropped_loss, strict=True)]
    print(f"1000 probes at 10 %/10 % loss: {len(echoed)} echoed, bridge lost {lost}")
    assert 700 <= len(echoed) <= 900
    assert 60 <= lost[0] <= 140, lost  # ~100 expected
    assert 50 <= lost[1] <= 130, lost  # ~90 expected (10 % of what got through)
    assert len(echoed) == len(set(echoed))  # lost, not duplicated
    assert after.dropped_full == [0, 0]
    assert after.send_errors == [0, 0]


@needs_root
@pytest.mark.slow
def test_bridge_jitters_around_the_delay_and_keeps_order(rig: Rig, udp_echo: int) -> None:
    """40 ms RTT with +-10 ms uniform jitter each way: 300 one-at-a-time probes spread on
    both sides of 40 ms (a busy machine only ever adds delay, so RTTs under 40 ms are the
    bridge's doing); then 1000 back-to-back probes come back in the order they were sent."""
    sock = _udp_client(rig, udp_echo)
    try:
        stats = delaybridge.set_rtt(rig.control, 40.0)
        stats = delaybridge.set_impairment(rig.control, jitter_ms=10.0, jitter_dist="uniform")
        assert stats.jitter_ms == [10.0, 10.0]
        delaybridge.reseed(rig.control, 1234)
        rtts = []
        for i in range(300):
            t0 = time.perf_counter()
            sock.send(b"%d" % i)
            while int(sock.recv(64)) != i:  # (nothing is lost here; never a stale echo)
                pass
            rtts.append((time.perf_counter() - t0) * 1000.0)
        echoed = _burst(sock, 1000, pace_every=100)
    finally:
        sock.close()
    below = sum(r < 40.0 for r in rtts)
    print(
        f"jitter: rtt min {min(rtts):.1f} median {statistics.median(rtts):.1f} "
        f"max {max(rtts):.1f} stdev {statistics.stdev(rtts):.1f} ms, {below}/300 under 40 ms; "
        f"burst {len(echoed)}/1000 echoed"
    )
    assert min(rtts) >= 20.0 - 0.5  # never earlier than the delay minus both jitters
    assert below >= 45  # ~150 expected with no scheduling noise at all
    assert statistics.stdev(rtts) > 3.0  # ~8.2 expected
    assert 25.0 <= statistics.median(rtts) <= 40.0 + SLACK_MS
    assert echoed == sorted(echoed)  # the order of the flow was kept
    assert len(echoed) >= 900  # (a loaded echo thread may drop a few at its socket)
    final = delaybridge.stats(rig.control)
    assert final.dropped_loss == [0, 0]
    assert final.seed == 1234


@needs_root
def test_control_rejects_bad_requests(rig: Rig) -> None:
    with pytest.raises(ConfigError, match="rtt"):
        delaybridge.set_rtt(rig.control, -5)
    with pytest.raises(ConfigError, match="unknown command"):
        delaybridge.control(rig.control, {"cmd": "reboot"})
    with pytest.raises(ConfigError, match="loss_pct"):
        delaybridge.set_impairment(rig.control, loss_pct=150.0)
    with pytest.raises(ConfigError, match="distribution"):
        delaybridge.control(rig.control, {"cmd": "set-impairment", "jitter_dist": "x"})
    with pytest.raises(ConfigError, match="seed"):
        delaybridge.control(rig.control, {"cmd": "seed", "seed": "abc"})
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
