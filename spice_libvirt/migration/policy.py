"""The decisions of a migration that are arithmetic or rules, not I/O: pure functions.

* **Link-wait grace** (QEMU path): after the client linked, how long before ``migrate`` so
  that its MIGRATE_CONNECTED_SEAMLESS reaches the source.
* **Release point** (libvirt path): when to release the held migration, and when a client
  that never reached the destination is given up on (:func:`first_contact_deadline`).
* **Hold choice** (libvirt path): how to hold the switchover, if at all, and when the
  taint-free hold is about to run out (:class:`FloorWatch`).
* **TLS target** (both paths): which ports a client may be told, so that a client
  on TLS is never offered a plain port it would downgrade to.

Each is tested without QEMU in ``tests/test_policy.py``; the controllers only gather the
inputs and act on the answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Literal

from spice_libvirt.migration.evidence import (
    CHANNEL_TYPE_NAMES,
    Sessions,
    channel_names,
)
from spice_libvirt.migration.switchover import HOLD_DOWNTIME_MS, HOLD_SPEED_MIBS

# --------------------------------------------------------------------- link wait, release


def qmp_link_grace(link_s: float, *, floor: float, ceiling: float) -> float:
    """Grace after the destination showed every link (QMP signal only).

    The destination sees the last link about one RTT before the source gets
    MIGRATE_CONNECTED_SEAMLESS, and linking takes about 6 RTT + 50 ms (``rtt-seamless.md``:
    margins of RTT + 100..250 ms worked), so a fraction of the link time tracks the RTT
    without knowing it.
    """
    return min(ceiling, max(floor, 0.4 * link_s))


def embedded_link_grace(rtt_s: float, *, margin: float, ceiling: float) -> float:
    """Grace after our client *sent* CONNECTED_SEAMLESS: it reaches the source half an RTT
    later; a whole RTT (twice the one-way time) covers jitter on the way."""
    return min(ceiling, margin + rtt_s)


#: A client sent MIGRATE_BEGIN connects to the destination about one RTT later (its first
#: SYN; a lost one is sent again after 1 s). When nothing of it reached the destination in
#: this long, nothing will -- a firewall that drops its packets, a route that leads nowhere
#: -- and holding the migration longer only delays what happens to it anyway.
FIRST_CONTACT_S = 3.0
#: the cause a hold and a verdict name when that happened
NO_CONTACT = "no connection from the client reached the destination"


def first_contact_deadline(held_at: float, rtt_s: float | None = None) -> float:
    """By when the client's first connection must have reached the destination, counted
    from the moment the migration was held (after the client was told where to go): at
    least :data:`FIRST_CONTACT_S`, more for a client whose RTT says it needs longer."""
    return held_at + max(FIRST_CONTACT_S, 4.0 * (rtt_s or 0.0) + 1.0)


@dataclasses.dataclass(frozen=True)
class ReleasePoint:
    """When to release a held migration: ``at`` (monotonic seconds), ``grace`` after the signal."""

    at: float
    grace: float


def release_point(signal_at: float, wait_s: float, margin_ms: float) -> ReleasePoint:
    """The signal (our client answered the source / the destination initialized the last
    channel), plus the network wait it implies (one-way delay / RTT estimate), plus a
    margin. Releasing the moment the destination shows the links is *worse* than not
    waiting (11-13 s outages measured) when the switchover follows at once; but the
    transfer after a release takes a while too, so the margin may be negative: it is
    measured (``bench_libvirt_rtt.py``: each seamless run's spare time, ``slack_ms``), and
    the grace never goes below zero."""
    grace = max(0.0, max(0.0, wait_s) + margin_ms / 1000.0)
    return ReleasePoint(signal_at + grace, grace)


# --------------------------------------------------------------------- hold choice

HoldPolicy = Literal["auto", "qmp", "libvirt", "none"]
HoldApplied = Literal["qmp-throttle", "libvirt-floor", "none"]

#: escalate (allow_taint only) when the first pass is projected to end within this long
FLOOR_RUNWAY_S = 1.0

_FLOOR = (
    f"libvirt's public API: speed {HOLD_SPEED_MIBS} MiB/s and downtime {HOLD_DOWNTIME_MS} ms "
    "until the client is linked (taint-free)"
)


@dataclasses.dataclass(frozen=True)
class HoldChoice:
    """How to hold the switchover, why (for the report), and whether the hold may turn to
    the QMP throttle when the taint-free one is about to run out (:class:`FloorWatch`)."""

    applied: HoldApplied
    reason: str
    escalate: bool = False


def choose_hold(
    *, plain: bool, has_client: bool, policy: HoldPolicy, passthrough: bool
) -> HoldChoice:
    """The hold for one migration. ``passthrough``: the operator allowed the monitor
    passthrough (``allow_taint``) and it answers. The QMP throttle taints the domain, so it
    is never the default: ``auto`` holds through libvirt's public API and turns to it only
    for a guest that hold cannot keep, when allowed; ``qmp`` throttles from the start."""
    if plain:
        return HoldChoice("none", "plain libvirt migration (baseline): no hold, no wait")
    if not has_client:
        return HoldChoice("none", "no SPICE client connected: nothing to wait for")
    if policy == "none":
        return HoldChoice("none", "hold disabled: the client may miss the switchover")
    if policy == "libvirt" or not passthrough:
        return HoldChoice(
            "libvirt-floor",
            _FLOOR
            + (
                ""
                if policy == "libvirt"
                else "; a near-empty guest may switch over before its client linked "
                "(allow_taint would throttle it through QMP, which taints it)"
            ),
        )
    if policy == "qmp":
        return HoldChoice(
            "qmp-throttle",
            "QEMU's max-bandwidth through the monitor passthrough from the start (hold=qmp; "
            "allowed by allow_taint; taints the domain)",
        )
    return HoldChoice(
        "libvirt-floor",
        _FLOOR + "; QEMU's max-bandwidth through QMP only if the first pass is about to end "
        "before the client linked (allowed by allow_taint; taints the domain)",
        escalate=True,
    )


@dataclasses.dataclass
class FloorWatch:
    """Is the taint-free hold about to run out? Fed QEMU's remaining memory (libvirt's job
    statistics), pure.

    At libvirt's floor QEMU still skips zero pages at memory speed, so a guest with little
    non-zero memory finishes its first pass in about a second and, with nothing dirty,
    switches over at once (the lab's firmware guest: 1.4 s after ``active``, its remaining
    memory falling ~480 MB/s, measured); a guest with hundreds of MB to move stays in that
    pass for minutes (the lab's linux guest: ~1 MB/s). Only the memory left and how fast it
    shrinks tell them apart. QEMU updates the figure about every 100 ms.
    """

    runway_s: float = FLOOR_RUNWAY_S
    floor_bytes_per_s: int = HOLD_SPEED_MIBS << 20
    _last: tuple[float, int] | None = None

    def feed(self, at: float, remaining: int, total: int) -> str | None:
        """One sample (monotonic seconds, bytes); the reason to escalate now, or None."""
        if total <= 0:
            return None  # the job has no RAM figures yet (setup)
        if remaining <= self.floor_bytes_per_s * self.runway_s:
            return f"{remaining / 2**20:.1f} MiB left in the pass at libvirt's floor"
        last = self._last
        if last is None or remaining > last[1]:  # the first sample, or a new pass
            self._last = (at, remaining)
            return None
        if remaining == last[1]:
            return None
        rate = (last[1] - remaining) / max(at - last[0], 1e-3)
        self._last = (at, remaining)
        eta = remaining / rate
        if eta >= self.runway_s:
            return None
        return (
            f"{remaining / 2**20:.0f} MiB left, shrinking {rate / 2**20:.0f} MiB/s at libvirt's "
            f"floor (zero pages): the pass would end in ~{eta:.1f} s"
        )


# --------------------------------------------------------------------------------- TLS

TlsDowngradePolicy = Literal["warn", "refuse"]
ChannelMode = Literal["any", "secure", "insecure"]


@dataclasses.dataclass(frozen=True)
class ChannelSecurity:
    """Which channels a SPICE server accepts in plain text (QEMU's ``tls-channel`` and
    ``plaintext-channel``, libvirt's ``defaultMode`` and ``<channel mode>``)."""

    default: ChannelMode = "any"
    modes: Mapping[str, ChannelMode] = dataclasses.field(default_factory=dict)
    #: the server listens on a plain port at all
    plain_port: bool = True

    def accepts_plain(self, channel_type: int) -> bool:
        if not self.plain_port:
            return False
        name = CHANNEL_TYPE_NAMES.get(channel_type, str(channel_type))
        return self.modes.get(name, self.default) != "secure"


def security_from_qemu_spice(options: Iterable[str], *, plain_port: bool) -> ChannelSecurity:
    """From the ``-spice`` option list (``tls-channel=main``, ``plaintext-channel=default``)."""
    default: ChannelMode = "any"
    modes: dict[str, ChannelMode] = {}
    for opt in options:
        key, _, value = opt.partition("=")
        mode: ChannelMode
        if key == "tls-channel":
            mode = "secure"
        elif key == "plaintext-channel":
            mode = "insecure"
        else:
            continue
        if value == "default":
            default = mode
        else:
            modes[value] = mode
    return ChannelSecurity(default, modes, plain_port)


@dataclasses.dataclass(frozen=True)
class TlsTarget:
    """What a client may be told in ``client_migrate_info`` (or the graphics URI)."""

    port: int | None
    tls_port: int | None
    #: a downgrade this choice cannot rule out (warn or refuse by policy); None: none left
    risk: str | None = None
    #: channels on TLS at the source (what must stay on TLS)
    tls_channels: tuple[str, ...] = ()
    #: not a downgrade, but worth saying (e.g. a client that may not pre-link)
    caveat: str | None = None


#: how a TLS-only target reaches the client (measured with spice-gtk 0.42 and QEMU 7.2)
SPICE_GTK_TLS_ONLY = (
    "the plain port goes out as 0, which spice-gtk reads as 'no plain port' and pre-links on "
    "TLS (seamless, secure); left out, QEMU would pass it as -1, which reaches the client as "
    "port 65535: spice-gtk links in plain text there, fails and falls back to switch-host"
)


def tls_target(
    before: Sessions,
    port: int | None,
    tls_port: int | None,
    destination: ChannelSecurity | None,
) -> TlsTarget:
    """The ports to offer the clients ``before`` so that no TLS channel can go plain.

    * nobody on TLS: both ports as asked (nothing to protect);
    * a TLS client and no TLS port on the destination: a certain downgrade (a risk);
    * a channel on TLS that the destination is known to *refuse* in plain text
      (``tls-channel``): safe with both ports -- a plain link gets NEED_SECURED and the
      client retries on TLS (the only way spice-gtk 0.42 keeps TLS *and* pre-links);
    * every channel on TLS, the destination accepting plain (or unknown): the TLS port only
      (spice-gtk 0.42 links in plain text when it is told a plain port, even with
      ``--spice-secure-channels=all``);
    * mixed (some channels plain by the domain's choice): both ports, so each channel keeps
      its own security; a TLS channel the destination would accept in plain text is a risk
      left to the policy.

    ``destination``: which channels the destination accepts in plain (None: unknown).
    """
    tls_ch = [ch for s in before.values() for ch, tls in s.channels.items() if tls is True]
    plain_ch = [ch for s in before.values() for ch, tls in s.channels.items() if tls is False]
    names = tuple(channel_names(tls_ch))
    if not tls_ch:
        return TlsTarget(port, tls_port)
    if tls_port is None:
        return TlsTarget(
            port,
            None,
            f"the client is on TLS ({', '.join(names)}) but the destination offers no TLS "
            "port: it would link in plain text",
            names,
        )
    exposed = (
        names
        if destination is None
        else tuple(channel_names(ch for ch in tls_ch if destination.accepts_plain(ch[0])))
    )
    if not exposed or port is None:
        return TlsTarget(port, tls_port, None, names)
    if not plain_ch:
        return TlsTarget(None, tls_port, None, names, SPICE_GTK_TLS_ONLY)
    how = "may accept" if destination is None else "accepts"
    risk = (
        f"mixed client: {', '.join(channel_names(plain_ch))} plain, so the plain port is "
        f"offered; the destination {how} {', '.join(exposed)} in plain text too "
        "(make them secure there: tls-channel= / <channel mode='secure'>)"
    )
    return TlsTarget(port, tls_port, risk, names)


def libvirt_plain_port_risk(before: Sessions, destination: ChannelSecurity) -> str | None:
    """The libvirt path's downgrade risk: libvirt takes the plain port from its migration
    cookie even when the graphics URI names none, so the only protection is a destination
    that refuses plain links for every channel the client has on TLS."""
    tls_ch = [ch for s in before.values() for ch, tls in s.channels.items() if tls is True]
    exposed = channel_names(ch for ch in tls_ch if destination.accepts_plain(ch[0]))
    if not exposed:
        return None
    return (
        f"the client has {', '.join(exposed)} on TLS, and the destination graphics would "
        "still accept them in plain text (libvirt tells the client the plain port from its "
        "migration cookie even when the graphics URI names none): set defaultMode='secure' "
        "(or <channel mode='secure'>) on the domain's SPICE graphics"
    )


def counted_tls_risk(tls_channels: int, destination: ChannelSecurity) -> str | None:
    """The downgrade risk when the client's channels are only *counted* (the kernel's view,
    taint-free): which of them are on TLS is known, not their types, so unless the
    destination refuses every channel in plain text, any TLS channel may be exposed."""
    if not tls_channels or not destination.plain_port:
        return None
    if destination.default == "secure" and all(m == "secure" for m in destination.modes.values()):
        return None
    return (
        f"the client has {tls_channels} channel(s) on TLS, which ones cannot be told without "
        "the monitor passthrough, and the destination graphics accept some channels in plain "
        "text: set defaultMode='secure' on the domain's SPICE graphics, or allow the "
        "passthrough (allow_taint) so that each channel is checked"
    )


__all__ = [
    "FLOOR_RUNWAY_S",
    "SPICE_GTK_TLS_ONLY",
    "ChannelSecurity",
    "FloorWatch",
    "HoldApplied",
    "HoldChoice",
    "HoldPolicy",
    "ReleasePoint",
    "TlsDowngradePolicy",
    "TlsTarget",
    "choose_hold",
    "counted_tls_risk",
    "embedded_link_grace",
    "libvirt_plain_port_risk",
    "qmp_link_grace",
    "release_point",
    "security_from_qemu_spice",
    "tls_target",
]
