"""The pure decisions of ``migration/policy.py`` (and the libvirt preflight's pure parts),
without QEMU or libvirt: grace, release point, hold choice, and the TLS target (never a plain port for a TLS client)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from spice_libvirt.libvirt.errors import PreflightError
from spice_libvirt.libvirt.preflight import (
    check_tls,
    graphics_security,
    graphics_uri_without_plain_port,
)
from spice_libvirt.libvirt.request import LibvirtMigrationRequest
from spice_libvirt.migration.evidence import (
    SpiceSession,
    channel_name,
    parse_channel_name,
    sessions_from_query_spice,
)
from spice_libvirt.migration.policy import (
    ChannelSecurity,
    FloorWatch,
    choose_hold,
    embedded_link_grace,
    libvirt_plain_port_risk,
    qmp_link_grace,
    release_point,
    security_from_qemu_spice,
    tls_target,
)

# ------------------------------------------------------------------ grace and release


@pytest.mark.parametrize(
    ("link_s", "expected"),
    [(0.1, 0.25), (1.0, 0.4), (4.0, 1.6), (10.0, 2.0)],
)
def test_qmp_grace_tracks_the_link_time_within_bounds(link_s: float, expected: float) -> None:
    assert qmp_link_grace(link_s, floor=0.25, ceiling=2.0) == pytest.approx(expected)


def test_embedded_grace_is_margin_plus_rtt_capped() -> None:
    assert embedded_link_grace(0.05, margin=0.005, ceiling=2.0) == pytest.approx(0.055)
    assert embedded_link_grace(5.0, margin=0.005, ceiling=2.0) == 2.0


def test_release_point_adds_the_network_wait_and_the_margin() -> None:
    point = release_point(10.0, 0.15, 100.0)
    assert point.grace == pytest.approx(0.25)
    assert point.at == pytest.approx(10.25)
    assert release_point(1.0, -1.0, -5.0).grace == 0.0
    # a negative margin releases before the estimated arrival (the transfer after the
    # release still takes a while: measured), never before the signal itself
    assert release_point(10.0, 0.15, -100.0).grace == pytest.approx(0.05)
    assert release_point(10.0, 0.15, -400.0).grace == 0.0


@pytest.mark.parametrize(
    ("plain", "client", "policy", "passthrough", "applied", "escalate"),
    [
        (True, True, "auto", True, "none", False),
        (False, False, "auto", True, "none", False),
        (False, True, "none", True, "none", False),
        # taint-free unless the operator allowed the passthrough (and it answers)
        (False, True, "auto", False, "libvirt-floor", False),
        (False, True, "qmp", False, "libvirt-floor", False),
        (False, True, "libvirt", True, "libvirt-floor", False),
        # allowed: the floor first, the QMP throttle only when the floor runs out
        (False, True, "auto", True, "libvirt-floor", True),
        (False, True, "qmp", True, "qmp-throttle", False),
    ],
)
def test_hold_choice(
    plain: bool, client: bool, policy: str, passthrough: bool, applied: str, escalate: bool
) -> None:
    choice = choose_hold(
        plain=plain,
        has_client=client,
        policy=policy,  # type: ignore[arg-type]
        passthrough=passthrough,
    )
    assert (choice.applied, choice.escalate) == (applied, escalate)
    assert choice.reason
    assert ("taint-free" in choice.reason) == (applied == "libvirt-floor")


# QEMU's remaining memory at libvirt's floor, sampled every 30 ms (seconds after migrateToURI3,
# bytes): the lab's firmware guest and its linux guest, measured on this machine
FIRMWARE_AT_FLOOR = [
    (0.453, 402268160), (0.485, 402268160), (0.558, 380637184), (0.592, 380637184),
    (0.657, 332914688), (0.69, 332914688), (0.755, 285192192), (1.543, 598016), (1.842, 0),
]  # fmt: skip
LINUX_AT_FLOOR = [
    (0.416, 402432000), (0.62, 386408448), (0.824, 386195456), (1.031, 385982464),
    (2.056, 384917504), (3.896, 383000576),
]  # fmt: skip


def _first_escalation(samples: list[tuple[float, int]]) -> float | None:
    watch = FloorWatch()
    for at, remaining in [(0.2, 0), *samples]:
        if watch.feed(at, remaining, 0 if remaining == 0 and at < 0.3 else 403259392):
            return at
    return None


def test_floor_watch_escalates_a_near_empty_guest_early_and_a_full_one_never() -> None:
    # the firmware guest switched over at 1.84 s: the watch fires 1.2 s before
    assert _first_escalation(FIRMWARE_AT_FLOOR) == 0.657
    assert _first_escalation(LINUX_AT_FLOOR) is None
    # little left at the floor is the end of the pass whatever the rate
    assert FloorWatch().feed(1.0, 512 * 1024, 1 << 30)
    # a new pass (the figure goes up) starts the rate afresh
    watch = FloorWatch()
    assert watch.feed(0.0, 300 << 20, 1 << 30) is None
    assert watch.feed(0.1, 299 << 20, 1 << 30) is None  # 10 MiB/s: 30 s to go
    assert watch.feed(0.2, 400 << 20, 1 << 30) is None
    assert watch.feed(0.3, 399 << 20, 1 << 30) is None
    assert watch.feed(0.4, 100 << 20, 1 << 30)  # 2990 MiB/s: 33 ms to go


# ------------------------------------------------------------------ evidence parsing


def test_query_spice_parsed_once_unsigned_with_tls() -> None:
    reply = {
        "channels": [
            {"connection-id": -2, "channel-type": 1, "channel-id": 0, "tls": True},
            {"connection-id": -2, "channel-type": 12, "channel-id": 0, "tls": False},
            {"host": "127.0.0.1"},  # no channel: ignored
        ]
    }
    got = sessions_from_query_spice(reply)
    assert list(got) == [0xFFFFFFFE]
    s = got[0xFFFFFFFE]
    assert s.names == ["main:0", "12:0"]
    assert s.all_tls is False
    assert s.tls_names(True) == ["main:0"]
    assert sessions_from_query_spice({"return": reply}).keys() == got.keys()


def test_one_channel_naming_reads_the_clients_form_too() -> None:
    assert channel_name(12, 0) == "12:0"
    assert parse_channel_name("12:0") == (12, 0)
    assert parse_channel_name("type12:0") == (12, 0)  # spice.constants' label for unknown types
    assert parse_channel_name("usbredir:1") == (9, 1)


# ------------------------------------------------------------------------------ TLS target


def _clients(channels: Mapping[tuple[int, int], bool | None]) -> dict[int, SpiceSession]:
    return {5: SpiceSession(5, dict(channels))}


ALL_TLS = {(1, 0): True, (2, 0): True, (3, 0): True}
MIXED = {(1, 0): True, (2, 0): False}
PLAIN = {(1, 0): False, (2, 0): False}
ANY = ChannelSecurity()
MAIN_SECURE = ChannelSecurity(modes={"main": "secure"})
ALL_SECURE = ChannelSecurity(default="secure")


@pytest.mark.parametrize(
    ("channels", "port", "tls_port", "dst", "want_port", "want_tls", "risk"),
    [
        (PLAIN, 5900, 5901, ANY, 5900, 5901, False),  # nothing to protect
        (ALL_TLS, 5900, 5901, ANY, None, 5901, False),  # TLS port only: the fix
        (ALL_TLS, 5900, 5901, None, None, 5901, False),
        (ALL_TLS, 5900, 5901, ALL_SECURE, 5900, 5901, False),  # NEED_SECURED keeps TLS
        (ALL_TLS, None, 5901, ANY, None, 5901, False),
        (ALL_TLS, 5900, None, ANY, 5900, None, True),  # no TLS port there: certain downgrade
        (MIXED, 5900, 5901, ANY, 5900, 5901, True),  # main would be accepted in plain
        (MIXED, 5900, 5901, MAIN_SECURE, 5900, 5901, False),  # main is secure there: kept
        (MIXED, 5900, 5901, None, 5900, 5901, True),  # unknown: assume the worst
        ({}, 5900, 5901, ANY, 5900, 5901, False),
    ],
)
def test_tls_target(
    channels: dict[tuple[int, int], bool | None],
    port: int | None,
    tls_port: int | None,
    dst: ChannelSecurity | None,
    want_port: int | None,
    want_tls: int | None,
    risk: bool,
) -> None:
    target = tls_target(_clients(channels), port, tls_port, dst)
    assert (target.port, target.tls_port) == (want_port, want_tls)
    assert (target.risk is not None) is risk
    # a TLS-only target says what it may cost a spice-gtk client
    assert (target.caveat is not None) is (want_port is None and port is not None)


def test_qemu_spice_options_to_channel_security() -> None:
    sec = security_from_qemu_spice(
        ["port=5900", "tls-channel=main", "plaintext-channel=display"], plain_port=True
    )
    assert not sec.accepts_plain(1)
    assert sec.accepts_plain(2)
    assert sec.accepts_plain(3)  # default "any"
    strict = security_from_qemu_spice(["tls-channel=default"], plain_port=True)
    assert not any(strict.accepts_plain(t) for t in range(1, 12))
    assert not security_from_qemu_spice([], plain_port=False).accepts_plain(2)


GRAPHICS = """<domain><devices>
<graphics type='spice' port='{port}' tlsPort='5901' autoport='no' {mode}>
{channels}
</graphics></devices></domain>"""


def test_libvirt_graphics_security_and_risk() -> None:
    any_mode = graphics_security(GRAPHICS.format(port=5900, mode="", channels=""))
    assert any_mode is not None
    assert libvirt_plain_port_risk(_clients(ALL_TLS), any_mode) is not None
    assert libvirt_plain_port_risk(_clients(PLAIN), any_mode) is None
    secure = graphics_security(GRAPHICS.format(port=-1, mode="defaultMode='secure'", channels=""))
    assert secure is not None
    assert not secure.plain_port
    assert libvirt_plain_port_risk(_clients(ALL_TLS), secure) is None
    per_channel = graphics_security(
        GRAPHICS.format(
            port=5900,
            mode="",
            channels="<channel name='main' mode='secure'/><channel name='display' mode='secure'/>",
        )
    )
    assert per_channel is not None
    assert libvirt_plain_port_risk(_clients(MIXED), per_channel) is None
    risk = libvirt_plain_port_risk(_clients(ALL_TLS), per_channel)
    assert risk is not None
    assert "inputs:0" in risk
    assert "main:0" not in risk
    assert graphics_security("<domain><devices/></domain>") is None


def test_graphics_uri_loses_only_its_plain_port() -> None:
    assert (
        graphics_uri_without_plain_port("spice://10.0.0.2:5900?tlsPort=5901&tlsSubject=C%3DXX")
        == "spice://10.0.0.2?tlsPort=5901&tlsSubject=C%3DXX"
    )
    assert (
        graphics_uri_without_plain_port("spice://[::1]:5900?tlsPort=1") == "spice://[::1]?tlsPort=1"
    )


def test_libvirt_tls_check_refuses_by_default_and_warns_on_request() -> None:
    exposed = GRAPHICS.format(port=5900, mode="", channels="")
    secure = GRAPHICS.format(port=5900, mode="defaultMode='secure'", channels="")
    uri = "spice://10.0.0.2:5900?tlsPort=5901"
    notes: list[str] = []
    req = LibvirtMigrationRequest(
        domain="vm", destination_uri="qemu+tcp://b/system", graphics_uri=uri
    )
    assert req.tls_downgrade_policy == "refuse"
    with pytest.raises(PreflightError, match="TLS downgrade risk"):
        check_tls(req, _clients(ALL_TLS), exposed, notes.append)
    # nothing on TLS, or a destination that refuses plain text: the URI as given
    assert check_tls(req, _clients(PLAIN), exposed, notes.append) == uri
    assert check_tls(req, _clients(ALL_TLS), secure, notes.append) == uri
    assert notes == []
    warn = req.model_copy(update={"tls_downgrade_policy": "warn"})
    assert (
        check_tls(warn, _clients(ALL_TLS), exposed, notes.append) == "spice://10.0.0.2?tlsPort=5901"
    )
    assert any("tls_downgrade_policy=warn" in n for n in notes)
    strict = warn.model_copy(update={"require_seamless": True})
    with pytest.raises(PreflightError):
        check_tls(strict, _clients(ALL_TLS), exposed, notes.append)
