"""The host agent's decisions without I/O: release, caller changes, verdicts (agent/plan.py),
the kernel's socket tables (host/procnet.py), hold records, settings and the claim mark."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spice_libvirt.agent import holdfile
from spice_libvirt.agent.hold import spice_ports
from spice_libvirt.agent.plan import CallerValues, HeldMigration, Release
from spice_libvirt.agent.settings import AgentSettings, load_agent_settings
from spice_libvirt.errors import AgentError, ConfigError
from spice_libvirt.host import procnet
from spice_libvirt.libvirt.claim import claim_active, claim_xml
from spice_libvirt.libvirt.connection import GraphicsEvent, parse_migration_details

CHANNELS = ("10.0.0.3:40001", "10.0.0.3:40002", "10.0.0.3:40003")


def plan(**kw: object) -> HeldMigration:
    args: dict[str, object] = {
        "domain": "vm",
        "started_at": 100.0,
        "caller": CallerValues(8796093022207, 300),
        "client_channels": CHANNELS,
        "hold_timeout_s": 15.0,
        "margin_ms": 100.0,
    }
    args.update(kw)
    return HeldMigration(**args)  # type: ignore[arg-type]


def ev(phase: str, port: int, at: float, domain: str = "vm") -> GraphicsEvent:
    return GraphicsEvent(domain, phase, "10.0.0.2:5900", f"10.0.0.3:{port}", at)


def link_all(p: HeldMigration, start: float, rtt: float) -> None:
    for i, port in enumerate((50001, 50002, 50003)):
        p.destination_event(ev("connect", port, start + i * 0.01))
        p.destination_event(ev("initialize", port, start + i * 0.01 + rtt))


def test_holds_until_every_channel_initialized_then_rtt_plus_margin() -> None:
    p = plan()
    # nothing reached the destination yet: ask again when the first contact is due
    assert p.release_due(100.5) == (103.0, None)
    link_all(p, 101.0, 0.3)
    last = 101.02 + 0.3
    when, reason = p.release_due(last)
    assert reason is None
    assert when == pytest.approx(last + 0.3 + 0.1)
    when, reason = p.release_due(last + 0.41)
    assert when is None
    assert reason is not None
    assert reason.kind == "linked"
    assert "3/3 channels" in reason.why


def test_a_half_linked_client_is_held_to_the_bound() -> None:
    p = plan()
    p.destination_event(ev("connect", 50001, 101.0))
    p.destination_event(ev("initialize", 50001, 101.3))
    assert p.release_due(110.0) == (115.0, None)
    when, reason = p.release_due(115.0)
    assert when is None
    assert reason is not None
    assert reason.kind == "timeout"
    assert "bound of 15 s" in reason.why


def test_other_domains_events_do_not_count() -> None:
    p = plan()
    for port in (1, 2, 3):
        p.destination_event(ev("connect", port, 101.0, domain="other"))
        p.destination_event(ev("initialize", port, 101.3, domain="other"))
    p.destination_event(ev("connect", 50001, 101.0))  # the client is on its way
    assert p.release_due(105.0) == (115.0, None)


def test_forced_release_and_migration_end_release_at_once() -> None:
    p = plan()
    unreachable = Release("no-destination", "destination unreachable")
    p.force_release(unreachable)
    assert p.release_due(100.1) == (None, unreachable)
    q = plan()
    q.migration_status("failed", 101.0)
    when, reason = q.release_due(101.0)
    assert when is None
    assert reason is not None
    assert reason.kind == "migration-ended"
    assert "failed" in reason.why


def test_a_released_plan_has_nothing_more_to_say() -> None:
    p = plan()
    p.released(101.0, Release("linked", "x"))
    assert p.release_due(200.0) == (None, None)
    assert p.held_ms() == 1000.0


def test_the_caller_stepping_the_downtime_is_kept_and_restored_last() -> None:
    p = plan()
    assert p.observe_values(1, 1).speed_mibs is None  # our own hold values
    for downtime in (50, 100, 200):
        assert p.observe_values(1, downtime).speed_mibs is None  # not fought
    assert p.caller.downtime_ms == 200
    assert sum("downtime" in n for n in p.notes) == 3


def test_a_qmp_throttle_read_back_as_0_mib_s_is_ours_not_the_callers() -> None:
    p = plan()
    assert p.observe_values(0, 1).speed_mibs is None
    assert p.caller.speed_mibs == 8796093022207
    assert p.notes == []


def test_the_caller_changing_the_speed_is_remembered_and_the_hold_put_back() -> None:
    p = plan()
    adjust = p.observe_values(100, 1)
    assert adjust.speed_mibs == 1
    assert p.caller.speed_mibs == 100
    assert p.observe_values(100, 1).speed_mibs == 1  # still held, noted once
    assert sum("speed" in n for n in p.notes) == 1
    p.released(101.0, Release("linked", "x"))
    assert p.observe_values(100, 300).speed_mibs is None  # after the release: theirs


# ------------------------------------------------------------------ /proc/net/tcp

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100FB0A:170C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1
   1: 0100FB0A:170C 0300FB0A:9C41 01 00000000:00000000 00:00000000 00000000     0        0 1002 1
   2: 0100FB0A:170C 0300FB0A:9C42 01 00000000:00000000 00:00000000 00000000     0        0 1003 1
   3: 0100FB0A:D2F0 0200FB0A:C001 01 00000000:00000000 00:00000000 00000000     0        0 1004 1
   4: 0100FB0A:170C 0300FB0A:9C43 06 00000000:00000000 00:00000000 00000000     0        0 1005 1
   5: 0100FB0A:170C 0300FB0A:9C44 01 00000000:00000000 00:00000000 00000000     0        0 9999 1
   6: garbage
"""
TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 0000000000000000FFFF00000100FB0A:170C 0000000000000000FFFF00000300FB0A:9C45 01 00000000:00000000 00:00000000 00000000     0        0 1006 1
"""


def sockets() -> procnet.ProcessSockets:
    rows = procnet.parse_tcp_table(TCP) + procnet.parse_tcp_table(TCP6)
    mine = {1001, 1002, 1003, 1004, 1005, 1006}
    return procnet.ProcessSockets(42, tuple(r for r in rows if r.inode in mine))


def test_tcp_tables_parse_ipv4_and_mapped_ipv6() -> None:
    rows = procnet.parse_tcp_table(TCP)
    assert len(rows) == 6  # the garbage row is skipped
    assert rows[1].local == "10.251.0.1"
    assert rows[1].local_port == 5900
    assert rows[1].remote == "10.251.0.3"
    assert rows[1].remote_port == 40001
    v6 = procnet.parse_tcp_table(TCP6)[0]
    assert v6.remote == "10.251.0.3"
    assert v6.remote_port == 40005


def test_spice_channels_are_the_established_connections_on_spice_ports() -> None:
    s = sockets()
    assert s.listening_ports == frozenset({5900})
    # TIME_WAIT (06) and another process's socket (inode 9999) are not channels
    assert procnet.spice_channels(s, [5900]) == [
        "10.251.0.3:40001",
        "10.251.0.3:40002",
        "10.251.0.3:40005",
    ]
    assert procnet.spice_channels(s, [5901]) == []


def test_the_migration_peer_is_where_the_process_connected_out() -> None:
    assert procnet.migration_peers(sockets()) == ["10.251.0.2"]


def test_snapshot_reads_this_process_for_real(tmp_path: Path) -> None:
    own = procnet.snapshot(os.getpid())
    assert own.pid == os.getpid()
    with pytest.raises(AgentError, match="cannot read the sockets"):
        procnet.snapshot(2**22 + 12345)


def test_spice_ports_from_domain_xml() -> None:
    xml = (
        "<domain><devices><graphics type='vnc' port='5901'/>"
        "<graphics type='spice' port='5900' tlsPort='5902' autoport='no'/>"
        "</devices></domain>"
    )
    assert spice_ports(xml) == [5900, 5902]
    assert spice_ports("<domain><graphics type='spice' port='-1'/></domain>") == []
    assert spice_ports("<not xml") == []


# ------------------------------------------------------------------ records, settings, mark


def test_hold_records_round_trip_and_bad_files_are_reported(tmp_path: Path) -> None:
    record = holdfile.HoldRecord(
        domain="vm", uuid="u-1", speed_mibs=100, downtime_ms=300, held_since=1.0, agent_pid=7
    )
    holdfile.write(tmp_path, record)
    assert (tmp_path.stat().st_mode & 0o777) == 0o700
    (tmp_path / "holds" / "broken.json").write_text("{")
    records, problems = holdfile.pending(tmp_path)
    assert records == [record]
    assert len(problems) == 1
    assert "broken.json" in problems[0]
    holdfile.remove(tmp_path, "u-1")
    assert holdfile.pending(tmp_path)[0] == []
    with pytest.raises(AgentError, match="not a domain UUID"):
        holdfile.remove(tmp_path, "../x")


def test_settings_file_then_overrides_and_typed_errors(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('peers = ["qemu+tcp://hostB/system"]\nhold_timeout_s = 20\n')
    s = load_agent_settings(conf, {"margin_ms": 50.0, "connect": None})
    assert s.peers == ("qemu+tcp://hostB/system",)
    assert s.hold_timeout_s == 20
    assert s.margin_ms == 50.0
    assert s.connect == "qemu:///system"
    conf.write_text('destination_uri = "qemu+tcp://x/system"\n')
    with pytest.raises(ConfigError, match="destination_uri"):
        load_agent_settings(conf, {})
    conf.write_text("hold_timeouts = 3\n")
    with pytest.raises(ConfigError, match="hold_timeouts"):
        load_agent_settings(conf, {})
    conf.write_text("not toml [")
    with pytest.raises(ConfigError):
        load_agent_settings(conf, {})
    with pytest.raises(ConfigError, match="no such file"):
        load_agent_settings(tmp_path / "missing.toml", {})


def test_claim_mark_expires() -> None:
    xml = claim_xml("spice-libvirt migrate pid 5", until=1000.0)
    assert claim_active(xml, 999.0) == "spice-libvirt migrate pid 5"
    assert claim_active(xml, 1000.0) is None
    assert claim_active(None, 0.0) is None
    assert claim_active("<claim until='x'/>", 0.0) is None
    assert claim_active("not xml", 0.0) is None


def test_migration_event_details() -> None:
    assert parse_migration_details('{"status": "setup"}') == "setup"
    assert parse_migration_details("{}") is None
    assert parse_migration_details("[1]") is None
    assert parse_migration_details("nonsense") is None
    assert parse_migration_details(None) is None


# ------------------------------------------------------------------ shipped files


def test_the_systemd_unit_starts_the_agent_and_restarts_it() -> None:
    from spice_libvirt.cli.agent import unit_text

    text = unit_text("/opt/sl/bin/spice-libvirt")
    lines = text.splitlines()
    assert "ExecStart=/opt/sl/bin/spice-libvirt agent run" in lines
    assert "Restart=always" in lines
    assert "KillSignal=SIGTERM" in lines
    assert "@EXEC@" not in text
    sections = [x for x in lines if x.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]


def test_every_line_of_the_example_agent_toml_is_a_valid_setting(tmp_path: Path) -> None:
    from importlib.resources import files

    example = files("spice_libvirt.agent").joinpath("agent.example.toml").read_text()
    conf = tmp_path / "agent.toml"
    conf.write_text(example)
    assert load_agent_settings(conf, {}) == AgentSettings()  # all commented out: defaults
    settings_lines = [
        x[2:] for x in example.splitlines() if x.startswith("# ") and " = " in x.split("#")[1]
    ]
    assert {x.split(" = ")[0] for x in settings_lines} == set(AgentSettings.model_fields)
    conf.write_text("\n".join(settings_lines) + "\n")
    s = load_agent_settings(conf, {})
    assert s.destination_uri == "qemu+tls://{peer}/system"
    assert len(s.peers) == 2
