"""The timeline SVG of a migration, drawn from real reports (``tests/data/report-*.json``:
``lab migrate --json`` of the built-in QEMU lab and of the libvirt lab) and read back with
``xml.etree``: the lanes are there, the events are where the report puts them, and the
reasons for a fall-back are written out."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from spice_libvirt.cli import main as cli_main
from spice_libvirt.cli.render import save_timeline
from spice_libvirt.libvirt.request import LibvirtMigrationReport
from spice_libvirt.migration.report import MigrationReport
from spice_libvirt.migration.timeline import (
    client_anchor,
    reasons,
    render_timeline,
    switchover_ms,
    write_timeline,
)

DATA = Path(__file__).with_name("data")
NS = {"svg": "http://www.w3.org/2000/svg"}
CHANNELS = ["main:0", "display:0", "inputs:0", "cursor:0", "port:0"]


def _report(name: str) -> MigrationReport:
    text = (DATA / f"report-{name}.json").read_text()
    if name.startswith("libvirt"):
        return LibvirtMigrationReport.model_validate_json(text)
    return MigrationReport.model_validate_json(text)


def _svg(report: MigrationReport) -> ET.Element:
    return ET.fromstring(render_timeline(report))


def _lanes(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("id", ""): g for g in root.iter(f"{{{NS['svg']}}}g") if g.get("class") == "lane"}


def _steps(lane: ET.Element) -> list[tuple[str, str, str, float]]:
    return [
        (g.get("data-message", ""), g.get("data-side", ""), g.get("data-direction", ""),
         float(g.get("data-t", "nan")))
        for g in lane.iter(f"{{{NS['svg']}}}g")
        if g.get("class") == "step"
    ]  # fmt: skip


def _texts(root: ET.Element, cls: str | None = None) -> list[str]:
    return [
        "".join(t.itertext())
        for t in root.iter(f"{{{NS['svg']}}}text")
        if cls is None or t.get("class") == cls
    ]


def test_seamless_qemu_migration_has_every_lane_and_the_switchover() -> None:
    report = _report("qemu-seamless")
    root = _svg(report)
    assert root.get("data-outcome") == "seamless"
    lanes = _lanes(root)
    for lane in ("lane-overview", "lane-controller", "lane-source", "lane-destination"):
        assert lane in lanes
    for channel in CHANNELS:
        assert f"lane-client0-{channel}" in lanes
        assert f"lane-closeup0-{channel}" in lanes  # the switchover is a few ms: zoomed
    phases = {
        r.get("data-name") for r in lanes["lane-overview"].iter() if r.get("class") == "phase"
    }
    assert {p.name for p in report.phases} <= phases
    # the client's clock is placed at the end of client_migrate_info
    offset, anchor = client_anchor(report, report.clients[0])
    cmi = next(p for p in report.phases if p.name == "client_migrate_info")
    assert offset == pytest.approx(cmi.start_ms + cmi.duration_ms)
    assert "client_migrate_info" in anchor
    main = _steps(lanes["lane-client0-main:0"])
    assert main[0][:3] == ("MIGRATE_BEGIN_SEAMLESS", "src", "rx")
    assert main[0][3] == pytest.approx(offset)
    assert ("MIGRATE_CONNECTED_SEAMLESS", "src", "tx") in [s[:3] for s in main]
    # the switchover is the first MIGRATE the client read, inside the transfer phase
    switch = root.find(".//svg:line[@id='switchover']", NS)
    assert switch is not None
    t = float(switch.get("data-t", "nan"))
    assert t == pytest.approx(switchover_ms(report) or -1)
    transfer = next(p for p in report.phases if p.name == "transfer")
    assert transfer.start_ms < t <= transfer.start_ms + transfer.duration_ms + 1
    # every channel's blackout, with the report's figure
    dark = {
        r.get("data-channel"): float(r.get("data-ms", "nan"))
        for r in lanes["lane-closeup0-main:0"].iter()
        if r.get("class") == "blackout"
    }
    assert dark == {"main:0": pytest.approx(report.clients[0].blackout_ms["main:0"], abs=1e-3)}
    states = [
        r.get("data-state") for r in lanes["lane-destination"].iter() if r.get("class") == "state"
    ]
    assert states == ["inmigrate", "running"]
    assert any("kept its session" in line for line in _texts(root, "reason"))


def test_switch_host_says_why_the_client_fell_back() -> None:
    report = _report("qemu-switch-host")
    root = _svg(report)
    assert root.get("data-outcome") == "switch-host"
    why = " ".join(_texts(root, "reason"))
    assert "did not wait for the client's links" in why
    assert "SWITCH_HOST" in why
    assert "new session" in why
    lanes = _lanes(root)
    main = _steps(lanes["lane-client0-main:0"])
    switch_host = [s for s in main if s[0] == "MIGRATE_SWITCH_HOST"]
    assert len(switch_host) == 1
    assert switchover_ms(report) == pytest.approx(switch_host[0][3])
    # channels linked to the destination only after the switchover: the race, visible
    linked_late = [
        s for channel in CHANNELS[1:] for s in _steps(lanes[f"lane-client0-{channel}"])
        if s[0] == "LINKED" and s[3] > switch_host[0][3]
    ]  # fmt: skip
    assert linked_late
    # a new session: every channel dark from the switchover until the client relinked
    for channel in CHANNELS:
        [bar] = [r for r in lanes[f"lane-client0-{channel}"].iter() if r.get("class") == "blackout"]
        assert float(bar.get("data-ms", "0")) == pytest.approx(
            report.clients[0].blackout_ms[channel]
        )
    assert "lane-closeup0-main:0" not in lanes  # 285 ms dark: nothing to zoom on


def test_cancelled_migration_marks_the_failed_phase_and_no_switchover() -> None:
    report = _report("qemu-cancelled")
    root = _svg(report)
    assert root.get("data-outcome") == "cancelled"
    failed = [r for r in root.iter() if r.get("class") == "phase" and r.get("data-ok") == "false"]
    assert {r.get("data-name") for r in failed} == {"link-wait"}
    assert root.find(".//svg:line[@id='switchover']", NS) is None
    assert switchover_ms(report) is None
    why = reasons(report)
    assert any("link-wait:" in line and "--require-seamless" in line for line in why)
    assert any("linked 0 of 5 channels" in line for line in why)
    lanes = _lanes(root)
    states = [r.get("data-state") for r in lanes["lane-source"].iter() if r.get("class") == "state"]
    assert states == ["running"]  # the VM never left the source
    assert "lane-client0" in lanes  # the embedded client, without a record


def test_libvirt_migration_shows_the_hold_and_the_destination_events() -> None:
    report = _report("libvirt-seamless")
    assert isinstance(report, LibvirtMigrationReport)
    root = _svg(report)
    lanes = _lanes(root)
    assert "lane-hold" in lanes
    [hold] = [r for r in lanes["lane-hold"].iter() if r.get("class") == "hold"]
    assert "answered the source" in "".join(hold.itertext())
    ticks = [
        g.get("data-kind")
        for g in lanes["lane-destination"].iter()
        if g.get("class") == "graphics-event"
    ]
    assert ticks.count("connect") == 5
    assert ticks.count("initialize") == 5
    # the client's clock is aligned on the destination's first initialize
    _offset, anchor = client_anchor(report, report.clients[0])
    assert "initialize" in anchor
    migrate = next(p for p in report.phases if p.name == "migrate")
    main_linked = next(
        s for s in _steps(lanes["lane-client0-main:0"]) if s[0] == "LINKED"
    )  # fmt: skip
    assert main_linked[3] == pytest.approx(migrate.start_ms + 448.2, abs=0.01)
    # the hold was released before the switchover
    assert report.hold.released_after_ms is not None
    switch = switchover_ms(report)
    assert switch is not None
    assert migrate.start_ms + report.hold.released_after_ms < switch


def test_write_timeline_and_the_cli_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = write_timeline(_report("qemu-seamless"), tmp_path / "t.svg")
    assert ET.parse(out).getroot().get("data-outcome") == "seamless"
    with pytest.raises(SystemExit):
        cli_main(["migrate", "--help"])
    assert "--timeline FILE.svg" in capsys.readouterr().out


def test_save_timeline_reports_an_unwritable_file_without_failing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_timeline(_report("qemu-seamless"), tmp_path / "no-such-dir" / "t.svg")
    assert "timeline not written" in capsys.readouterr().err
    save_timeline(_report("qemu-seamless"), tmp_path / "t.svg")
    assert "timeline: " in capsys.readouterr().err
    assert (tmp_path / "t.svg").read_text().startswith("<svg")


def test_untrusted_text_is_escaped() -> None:
    report = _report("qemu-cancelled").model_copy(update={"error": "<script>&'\""})
    text = render_timeline(report)
    root = ET.fromstring(text)  # still well-formed
    assert "<script>" not in text
    assert any("<script>" in line for line in _texts(root, "reason"))


def test_failed_migration_says_what_qemu_said_and_where_the_vm_runs() -> None:
    """The destination QEMU was killed mid-transfer (a real lab run)."""
    report = _report("qemu-failed")
    root = _svg(report)
    assert root.get("data-outcome") == "failed"
    why = " ".join(_texts(root, "reason"))
    assert "QEMU: migration failed: Unable to write to socket" in why
    assert "the VM runs on: source" in why
    failed = [r for r in root.iter() if r.get("class") == "phase" and r.get("data-ok") == "false"]
    assert {r.get("data-name") for r in failed} == {"transfer"}
    assert switchover_ms(report) is None
    lanes = _lanes(root)
    dst = [
        r.get("data-state") for r in lanes["lane-destination"].iter() if r.get("class") == "state"
    ]
    assert dst == ["inmigrate → absent"]
    src = [r.get("data-state") for r in lanes["lane-source"].iter() if r.get("class") == "state"]
    assert src == ["running"]
    # the source cancelled the client's pre-links when the transfer failed
    assert "MIGRATE_CANCEL" in [s[0] for s in _steps(lanes["lane-client0-main:0"])]
