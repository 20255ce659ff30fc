"""Hold the switchover, not the bulk: the speed plan's rules with made-up clocks
(migration/switchover.py), the agent's plan using it (agent/plan.py), and the kernel's RTT
of a socket (host/tcpinfo.py)."""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt.agent.plan import CallerValues, HeldMigration
from spice_libvirt.host import procnet, tcpinfo
from spice_libvirt.libvirt.connection import GraphicsEvent
from spice_libvirt.migration.switchover import (
    MIB,
    RESIDENT_ZERO_SHARE,
    GuestMemory,
    Progress,
    SwitchoverPlan,
    expected_link_s,
)

UNLIMITED = 8796093022207


def plan(caller: int = 52, link_s: float = 1.2, mode: str = "switchover") -> SwitchoverPlan:
    return SwitchoverPlan(mode=mode, caller_speed_mibs=caller, link_s=link_s)  # type: ignore[arg-type]


def test_link_time_follows_the_clients_rtt_or_the_assumption() -> None:
    assert expected_link_s(0.15, 2.5) == pytest.approx(7.2 * 0.15 + 0.1)
    assert expected_link_s(None, 2.5) == 2.5
    assert expected_link_s(0.0, 2.5) == pytest.approx(0.1)


DATA = GuestMemory(256 * MIB, tail_bytes=129 * MIB)  # a guest whose RAM is all data


def test_a_slow_caller_keeps_its_speed_for_the_bulk() -> None:
    p = plan(caller=52, link_s=1.2)
    assert p.start(10.0, DATA, 385 * MIB) is None  # 256 MiB at 52 MiB/s: 4.9 s > 1.2 s
    assert p.speed_mibs is None
    assert not p.holding


def test_an_unlimited_caller_is_paced_to_end_the_data_when_the_client_is_there() -> None:
    p = plan(caller=UNLIMITED, link_s=1.2)
    change = p.start(10.0, DATA, 385 * MIB)
    assert change is not None
    assert change.speed_mibs == 160  # 256 MiB over 1.2 s + the 0.4 s guard
    assert "paced at 160 MiB/s" in change.why
    assert p.ours(160)
    assert not p.ours(52)


def test_a_guest_with_little_data_is_paced_slowly_the_fallback_to_the_bulk_hold() -> None:
    p = plan(caller=52, link_s=2.3)
    change = p.start(10.0, GuestMemory(40 * MIB, 129 * MIB), 385 * MIB)
    assert change is not None
    assert change.speed_mibs == 15  # 40 MiB over 2.3 s + 0.4 s
    firmware = plan(caller=52, link_s=2.3)
    held = firmware.start(10.0, GuestMemory(6 * MIB, 129 * MIB), 385 * MIB)
    assert held is not None
    assert held.speed_mibs == 1  # near-empty: held from the start, as the bulk hold does
    assert firmware.holding
    unknown = plan(caller=UNLIMITED, link_s=2.3)
    paced = unknown.start(10.0, GuestMemory(None), 385 * MIB)  # no resident set: the total
    assert paced is not None
    assert paced.speed_mibs == 143


def test_bulk_mode_holds_from_the_start() -> None:
    p = plan(mode="bulk")
    change = p.start(10.0, DATA, 385 * MIB)
    assert change is not None
    assert change.speed_mibs == 1
    assert p.holding
    assert p.observe(Progress(10.2, 200 * MIB, 1)) == (None, None)
    assert p.held_ms(12.0) == 2000.0


def _run_at(p: SwitchoverPlan, speed: float, zero_from: int, t0: float = 10.0) -> tuple[float, int]:
    """Drive ``p`` with a made-up migration at ``speed`` B/s of data, zero pages (free to
    send) from byte ``zero_from`` of the guest RAM on; until the hold goes on. Returns
    (when, data bytes still ahead then)."""
    ram, tail = 256 * MIB, 129 * MIB
    scanned, sent, now = 0, 0, t0
    at: float | None = p.first_sample_at()
    while at is not None:
        step = at - now
        budget = speed * step
        while budget > 0 and scanned < ram:  # data costs its size, zero pages nothing
            if scanned < zero_from:
                chunk = min(budget, zero_from - scanned)
                budget -= chunk
                sent += int(chunk)
                scanned += int(chunk)
            else:
                scanned = ram
        assert scanned < ram or sent < zero_from, "the pass ended before the hold went on"
        now = at
        change, at = p.observe(Progress(now, ram + tail - scanned, 1, sent))
        if change is not None:
            assert change.speed_mibs == 1
            return now, zero_from - sent
    raise AssertionError("no hold")


def test_the_hold_goes_on_with_the_guards_worth_of_data_still_ahead() -> None:
    p = plan(caller=52, link_s=1.2)
    p.start(10.0, DATA, 385 * MIB)
    when, ahead = _run_at(p, 52 * MIB, 256 * MIB)
    # a quarter of a resident set may be zero pages: held with that and the guard ahead
    expected = (256 * (1 - RESIDENT_ZERO_SHARE) - 52 * (p.guard_s + p.min_sample_s)) / 52
    assert when == pytest.approx(10.0 + expected, abs=0.3)
    assert ahead >= 52 * MIB * p.guard_s  # enough data left to hold the switchover
    assert "switchover held" in p.notes[-1]
    assert p.held_ms(when + 0.5) == 500.0


def test_samples_come_soon_at_first_and_at_most_half_a_second_apart() -> None:
    p = plan(caller=52, link_s=1.2)
    p.start(10.0, DATA, 385 * MIB)
    assert p.first_sample_at() == pytest.approx(10.05)
    change, at = p.observe(Progress(10.05, 380 * MIB, 1, 2 * MIB))
    assert change is None
    assert at == pytest.approx(10.1)  # one sample: no pace yet
    change, at = p.observe(Progress(10.1, 377 * MIB, 1, 5 * MIB))
    assert change is None
    assert at == pytest.approx(10.6)


def test_a_guest_whose_data_ends_early_is_held_before_its_zero_pages_rush_by() -> None:
    """The lab's linux guest: ~70 MiB of data at the start of its RAM, zero after it; the
    resident set says so, and the hold goes on before the data runs out."""
    p = plan(caller=UNLIMITED, link_s=2.3)
    change = p.start(10.0, GuestMemory(84 * MIB, 129 * MIB), 385 * MIB)
    assert change is not None
    pace = change.speed_mibs * MIB
    _when, ahead = _run_at(p, pace, 70 * MIB)
    assert ahead > 0


def test_late_samples_widen_the_guard() -> None:
    memory = GuestMemory(160 * MIB, tail_bytes=129 * MIB)  # 120 MiB counted on as data

    def at_rate(lag: float) -> SwitchoverPlan:
        p = plan(caller=52, link_s=1.2)
        p.start(10.0, memory, 385 * MIB)
        p.observe(Progress(10.0, 380 * MIB, 1, 0, lag=0.01))
        p.observe(Progress(11.0, 328 * MIB, 1, 52 * MIB, lag=lag))  # 52 MiB/s measured
        return p

    quiet, busy = at_rate(0.01), at_rate(0.3)
    assert quiet.guard() == pytest.approx(0.42)
    assert busy.guard() == pytest.approx(1.0)
    # 42 MiB of data left, 0.8 s: the quiet host looks again, the busy one (its looks come
    # 300 ms late) holds now
    sample = Progress(11.5, 302 * MIB, 1, 78 * MIB)
    assert quiet.observe(sample)[0] is None
    change, _ = busy.observe(sample)
    assert change is not None
    assert change.speed_mibs == 1


def test_the_end_of_the_first_pass_holds_a_dirtying_guest_at_once() -> None:
    p = plan(caller=52)
    p.start(10.0, DATA, 385 * MIB)
    p.observe(Progress(10.05, 380 * MIB, 1, 2 * MIB))
    change, at = p.observe(Progress(10.1, 20 * MIB, 2, 300 * MIB))
    assert change is not None
    assert "first pass is over" in change.why
    assert at is None


def held(**kw: object) -> HeldMigration:
    return HeldMigration(
        domain="vm",
        started_at=100.0,
        caller=CallerValues(52, 101),
        client_channels=("10.0.0.3:1",),
        switchover=plan(caller=52),
        **kw,  # type: ignore[arg-type]
    )


def test_the_agents_plan_tells_pace_and_caller_speeds_apart() -> None:
    p = held()
    assert p.observe_values(52, 1).speed_mibs is None  # the caller's own speed: nothing to do
    adjust = p.observe_values(80, 1)  # VDSM's migrateChangeParams
    assert adjust.speed_mibs is None
    assert p.caller.speed_mibs == 80
    assert any("speed 80" in n for n in p.notes)


def test_a_caller_raising_the_downtime_before_the_hold_brings_the_hold_on() -> None:
    """QEMU switches over once what is left fits the downtime: with the caller's 5 s
    ("Suspend workload if needed") that is long before the end of the pass."""
    p = held()
    adjust = p.observe_values(52, 5000)
    assert adjust.speed_mibs == 1
    assert p.caller.downtime_ms == 5000  # kept, not fought
    assert p.switchover is not None
    assert p.switchover.holding
    assert p.observe_values(1, 5000).speed_mibs is None  # ours now; nothing more to do


def test_post_copy_switches_over_at_once_and_releases_the_hold() -> None:
    p = held()
    p.migration_status("active", 100.1)
    p.migration_status("postcopy-active", 101.0)
    when, reason = p.release_due(101.0)
    assert when is None
    assert reason is not None
    assert reason.kind == "postcopy"
    assert "post-copy" in reason.why
    assert p.postcopy_at == 101.0
    assert p.switchover_at == 101.0
    p.released(101.0, reason)
    # the client links while the guest already moved
    p.destination_event(GraphicsEvent("vm", "connect", "10.0.0.2:5900", "10.0.0.3:50001", 101.5))
    p.destination_event(GraphicsEvent("vm", "initialize", "10.0.0.2:5900", "10.0.0.3:50001", 101.8))
    p.migration_status("completed", 104.0)
    assert not p.linked_before_end
    assert p.verdict(110.0) == "not-linked"  # linked too late, and no reconnect seen
    assert p.throttled_ms() == 0.0
    assert p.held_ms() == 1000.0


# ---------------------------------------------------------------------------- tcpinfo


def _diag_message(inode: int, rtt_us: int) -> bytes:
    info = bytearray(8 + 16 * 4)
    struct.pack_into("=I", info, 8 + 15 * 4, rtt_us)
    attr = struct.pack("=HH", 4 + len(info), tcpinfo.INET_DIAG_INFO) + bytes(info)
    body = struct.pack("=BBBB48xIIIII", 2, 1, 0, 0, 0, 0, 0, 0, inode) + attr
    return struct.pack("=IHHII", 16 + len(body), tcpinfo.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def test_parse_dump_reads_the_rtt_of_the_wanted_sockets_only() -> None:
    done = struct.pack("=IHHII", 16, tcpinfo.NLMSG_DONE, 2, 1, 0)
    data = _diag_message(11, 150_000) + _diag_message(12, 300_000) + done
    found: dict[int, float] = {}
    assert tcpinfo.parse_dump(data, {12, 13}, found) is True
    assert found == {12: 0.3}
    assert tcpinfo.parse_dump(data[:20], {12}, {}) is True  # truncated: over, not an error
    assert tcpinfo.parse_dump(_diag_message(12, 1), {12}, {}) is False  # more to read


def test_socket_rtts_asks_the_kernel() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            for _ in range(3):
                client.send(b"x")
                peer.recv(1)
                peer.send(b"y")
                client.recv(1)
            inode = os.fstat(client.fileno()).st_ino
            rtts = tcpinfo.socket_rtts([inode, 1])
    assert set(rtts) == {inode}
    assert 0 < rtts[inode] < 0.05


def test_the_binary_dump_and_the_text_table_agree_on_this_process() -> None:
    """``procnet.snapshot`` reads sock_diag (cheap); it must see what /proc/net/tcp shows,
    and the RTT of each connection besides."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            fast = procnet.snapshot(os.getpid())
            text = [
                r
                for table in ("tcp", "tcp6")
                for r in procnet.parse_tcp_table(Path(f"/proc/self/net/{table}").read_text())
                if r.inode in {s.inode for s in fast.sockets}
            ]
            port = server.getsockname()[1]
    unsent = [dataclasses.replace(s, sent=None, rtt=None) for s in fast.sockets]
    assert all(s.rtt is not None for s in fast.established)  # what the text table lacks
    assert sorted(unsent, key=lambda s: s.inode) == sorted(text, key=lambda s: s.inode)
    assert port in fast.listening_ports
    assert len(fast.established) == 2  # both ends of the connection are ours


def _what_each_end_sent(netns: Path | None) -> tuple[dict[int, int | None], dict[int, int]]:
    """A loopback connection whose accepted end sent 300 bytes: (what the dump says each end
    sent, what each end did send -- the connecting end's SYN counts one)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            peer.sendall(b"r" * 300)
            got = b""
            while len(got) < 300:
                got += client.recv(300)
            time.sleep(0.05)  # the ACK
            sent = {os.fstat(peer.fileno()).st_ino: 300, os.fstat(client.fileno()).st_ino: 1}
            return {s.inode: s.acked for s in tcpinfo.tcp_sockets(sent, netns=netns)}, sent


def test_the_dump_says_what_each_end_sent() -> None:
    seen, sent = _what_each_end_sent(None)
    assert seen == sent


@pytest.mark.root  # entering a network namespace, even one's own, needs CAP_SYS_ADMIN
def test_the_dump_says_what_each_end_sent_in_a_namespace_entered_by_path() -> None:
    """Through a netlink socket made in a namespace entered by path (this process's own:
    the code path the controller takes for a lab host's QEMU)."""
    seen, sent = _what_each_end_sent(Path("/proc/self/ns/net"))
    assert seen == sent
    with pytest.raises(FileNotFoundError):
        tcpinfo.tcp_sockets(sent, netns=Path("/proc/self/no-such-namespace"))


_SMAPS_ENTRY = """{start:x}-{end:x} rw-p 00000000 00:00 0
Size:             {kib} kB
Rss:              {rss} kB
VmFlags: rd wr mr mw me ac sd
"""


def _fake_proc(root: Path, pid: int, mappings: list[tuple[int, int]]) -> None:
    """``maps`` and ``smaps`` of a process with mappings of (size MiB, resident MiB)."""
    at, maps, smaps = 0x7F0000000000, [], []
    for size, rss in mappings:
        end = at + size * MIB
        maps.append(f"{at:x}-{end:x} rw-p 00000000 00:00 0\n")
        smaps.append(_SMAPS_ENTRY.format(start=at, end=end, kib=size * 1024, rss=rss * 1024))
        at = end + 4096
    (root / str(pid)).mkdir()
    (root / str(pid) / "maps").write_text("".join(maps))
    (root / str(pid) / "smaps").write_text("".join(smaps))


def test_the_guest_rams_resident_set_is_read_from_its_own_mapping(tmp_path: Path) -> None:
    """The mapping of the guest RAM's size (up to 4 MiB more) counts, the others do not."""
    _fake_proc(tmp_path, 7, [(8, 8), (264, 100), (1024, 900), (2, 2)])
    assert procnet.guest_ram_resident(7, 264 * MIB, proc=tmp_path) == 100 * MIB
    assert procnet.guest_ram_resident(7, 262 * MIB, proc=tmp_path) == 100 * MIB
    assert procnet.guest_ram_resident(7, 512 * MIB, proc=tmp_path) is None
    assert procnet.guest_ram_resident(8, 264 * MIB, proc=tmp_path) is None  # no such process


def test_smaps_is_read_only_up_to_the_guest_rams_mapping() -> None:
    """With the count ``maps`` gave, nothing after the last guest RAM mapping is read (the
    kernel would walk every later mapping's pages to write it)."""
    entry = _SMAPS_ENTRY.format(start=0x1000, end=0x1000 + 264 * MIB, kib=264 * 1024, rss=5)

    def lines() -> Iterator[str]:
        yield from entry.splitlines()
        raise AssertionError("read past the guest RAM's mapping")

    assert procnet.parse_smaps_resident(lines(), 264 * MIB, expected=1) == 5 * 1024
