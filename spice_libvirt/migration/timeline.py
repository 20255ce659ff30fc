"""One migration as a picture: the report drawn as lanes on a time axis, in SVG.

Why: a report is a few hundred numbers. Where the time went (a 7 s preflight, a hold that
waited for the client, libvirt's finish phase after the switchover) and why a client fell
back (it had not linked when the switchover came) are relations *in time* between what the
controller, both QEMUs and the client did; a picture shows them at a glance. It is plain
SVG built as strings (no plotting library: the CLI must not need one), one file that any
browser opens, with a tooltip (``<title>``) on every mark.

Layout, top to bottom: the title and the verdict (with the reasons for a fall-back); an
overview axis with the controller's phases over the whole migration, the detail window
shaded; then the detail, zoomed on what happened around the switchover:

* ``controller``: the phases (a failed one outlined in red);
* ``hold`` (libvirt): from QEMU "active" to the release, and why it was released;
* ``source`` and ``destination``: each QEMU's state before and after the switchover, the
  destination's graphics events (libvirt) as ticks;
* one lane per channel of each embedded client: what it received (circles) and sent
  (triangles) on the source (blue) or the destination (green), its own events (squares),
  and its blackout (red), labelled;
* a dashed line at the switchover: the first ``MIGRATE`` (or ``SWITCH_HOST``) the client
  read, else the end of the transfer.

Clocks: the report's phases count from the controller's start; the client's steps from the
first migration message it read. The client's clock is placed on the controller's at an
anchor the report carries, and the picture says which: on the QEMU path the end of
``client_migrate_info`` (spice-server sends ``MIGRATE_BEGIN*`` while QEMU runs it), on the
libvirt path the destination's first ``initialize`` event against the client's own
``LINKED`` on ``main``. Either is good to a few milliseconds on a LAN.

Elements carry ``id`` / ``class`` / ``data-*`` attributes (``lane-source``,
``class="step" data-message="MIGRATE"``, ``class="blackout" data-channel="display:0"``...)
so that tests and tools can read the picture back.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from spice_libvirt.migration.report import ClientVerdict, MigrationReport

WIDTH = 1200
LABEL_W = 150
RIGHT_PAD = 30
LANE_H = 26
#: a client channel's lane: two rows of labels above the marks, the blackout below
CLIENT_LANE_H = 34
FONT = "font-family='DejaVu Sans, Arial, sans-serif'"
#: colours: outcome, sides, marks
OUTCOME_COLOUR = {
    "seamless": "#2e7d32",
    "semi-seamless": "#f9a825",
    "switch-host": "#e65100",
    "cancelled": "#6d4c41",
    "failed": "#c62828",
    "no-client": "#546e7a",
}
SIDE_COLOUR = {"src": "#1565c0", "dst": "#2e7d32"}
PHASE_COLOURS = ("#90caf9", "#a5d6a7", "#ffe082", "#ce93d8", "#80cbc4", "#ffab91", "#b0bec5")
BLACKOUT = "#d32f2f"
#: client steps labelled in their lane (the others are marks with a tooltip only)
KEY_MESSAGES = (
    "MIGRATE_BEGIN_SEAMLESS", "MIGRATE_BEGIN", "MIGRATE_DST_SEAMLESS_ACK",
    "MIGRATE_DST_SEAMLESS_NACK", "MIGRATE_CONNECTED_SEAMLESS", "MIGRATE_CONNECTED",
    "MIGRATE_SWITCH_HOST", "MIGRATE_CANCEL", "MIGRATE", "RECONNECTED",
)  # fmt: skip
_DST_EVENT = re.compile(r"^(\S+)\s+(\S+)\s+@\s+([0-9.]+)$")


@dataclass(frozen=True)
class _Scale:
    """Milliseconds of the report's clock -> x pixels, over [t0, t1]."""

    t0: float
    t1: float
    x0: float = LABEL_W
    x1: float = WIDTH - RIGHT_PAD

    def x(self, t: float) -> float:
        span = max(self.t1 - self.t0, 1e-6)
        return self.x0 + (min(max(t, self.t0), self.t1) - self.t0) / span * (self.x1 - self.x0)

    def inside(self, t: float) -> bool:
        return self.t0 <= t <= self.t1


@dataclass(frozen=True)
class _Step:
    t: float  # report clock, ms
    channel: str
    side: str
    direction: str
    message: str
    detail: str


class _Svg:
    """An SVG document as a list of element strings."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def text(self, x: float, y: float, s: str, *, size: int = 11, anchor: str = "start",
             fill: str = "#212121", weight: str = "normal", attrs: str = "") -> None:  # fmt: skip
        self.add(
            f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' "
            f"fill='{fill}' font-weight='{weight}' {FONT}{attrs}>{escape(s)}</text>"
        )

    def rect(self, x: float, y: float, w: float, h: float, fill: str, *, title: str = "",
             attrs: str = "", stroke: str = "none") -> None:  # fmt: skip
        tip = f"<title>{escape(title)}</title>" if title else ""
        self.add(
            f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(w, 0.0):.1f}' height='{h:.1f}' "
            f"fill='{fill}' stroke='{stroke}'{attrs}>{tip}</rect>"
        )


def _ms(value: float) -> str:
    if abs(value) >= 10:
        return f"{value:.0f} ms"
    return f"{value:.1f} ms" if abs(value) >= 1 else f"{value:.2f} ms"


def _nice_step(span: float, ticks: int = 8) -> float:
    raw = max(span, 1e-3) / ticks
    magnitude: float = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _phase(report: MigrationReport, name: str) -> tuple[float, float] | None:
    for p in report.phases:
        if p.name == name:
            return p.start_ms, p.start_ms + p.duration_ms
    return None


def _hold(report: MigrationReport) -> Any:
    """The libvirt report's hold details (duck-typed: this module does not import libvirt)."""
    return getattr(report, "hold", None)


def _destination_events(report: MigrationReport) -> list[tuple[float, str, str]]:
    """(report ms, kind, address) of the libvirt destination's graphics events."""
    hold = _hold(report)
    base = _phase(report, "migrate")
    if hold is None or base is None:
        return []
    out = []
    for line in getattr(hold, "destination_events", []) or []:
        m = _DST_EVENT.match(line.strip())
        if m:
            out.append((base[0] + float(m.group(3)), m.group(1), m.group(2)))
    return out


def client_anchor(report: MigrationReport, client: ClientVerdict) -> tuple[float, str]:
    """Where the client's t=0 lies on the report's clock, and what it was aligned on."""
    steps = client.record.steps if client.record is not None else []
    linked = next(
        (s.t_ms for s in steps if s.channel.startswith("main") and s.message == "LINKED"), None
    )
    initialize = next(
        (t for t, kind, _ in _destination_events(report) if kind == "initialize"), None
    )
    if linked is not None and initialize is not None:
        return (
            initialize - linked,
            "the destination's first initialize = the client's LINKED on main",
        )
    cmi = _phase(report, "client_migrate_info")
    if cmi is not None:
        return cmi[1], "the end of client_migrate_info = the client's MIGRATE_BEGIN"
    migrate = _phase(report, "migrate")
    if migrate is not None:
        return migrate[0], "the start of migrate (no better anchor in this report)"
    return 0.0, "the controller's start (no anchor in this report)"


def _steps(report: MigrationReport, client: ClientVerdict) -> list[_Step]:
    if client.record is None:
        return []
    offset, _ = client_anchor(report, client)
    return [
        _Step(offset + s.t_ms, s.channel, s.side, s.direction, s.message, s.detail)
        for s in client.record.steps
    ]


def switchover_ms(report: MigrationReport) -> float | None:
    """When the guest changed hosts, on the report's clock (see the module docstring)."""
    for client in report.clients:
        for s in _steps(report, client):
            if (
                s.side == "src"
                and s.direction == "rx"
                and s.message in ("MIGRATE", "MIGRATE_SWITCH_HOST")
            ):
                return s.t
    transfer = _phase(report, "transfer")
    if transfer is not None and report.migration.status == "completed":
        return transfer[1]
    return None


def reasons(report: MigrationReport) -> list[str]:
    """Why the migration ended as it did, in words, from the report's own evidence."""
    out: list[str] = []
    link = report.link_wait
    if report.error:
        out.append(f"{report.error_phase or 'error'}: {report.error}")
    fig = report.migration
    if fig.status not in (None, "completed") and fig.error_desc:
        out.append(f"QEMU: migration {fig.status}: {fig.error_desc}")
    if report.placement is not None:
        evidence = f" ({report.placement_evidence})" if report.placement_evidence else ""
        out.append(f"the VM runs on: {report.placement}{evidence}")
    for client in report.clients:
        who = f"{client.kind} client"
        if client.path == "seamless":
            kept = (
                f"connection id {client.connection_id_before}"
                if client.connection_id_before is not None
                else f"address {client.address}"
            )
            out.append(f"{who}: kept its session ({kept}), "
                       f"every channel linked to the destination before the switchover")  # fmt: skip
            continue
        steps = client.record.steps if client.record is not None else []
        messages = {s.message for s in steps}
        if "MIGRATE_DST_SEAMLESS_NACK" in messages:
            out.append(f"{who}: the destination refused seamless (DST_SEAMLESS_NACK)")
        if link.result == "skipped" and report.migration.status == "completed":
            out.append(f"{who}: the controller did not wait for the client's links "
                       "(link wait skipped): the switchover won the race")  # fmt: skip
        elif link.result == "timeout":
            linked = len(link.channels_linked)
            out.append(f"{who}: linked {linked} of {len(link.channels_expected)} channels "
                       f"within the link wait ({link.timeout_s:g} s)")  # fmt: skip
        if not client.linked_before_migrate and client.path in ("switch-host", "semi-seamless"):
            out.append(f"{who}: had not linked every channel when migrate was issued")
        if "MIGRATE_SWITCH_HOST" in messages:
            out.append(f"{who}: the source sent SWITCH_HOST: new session on the destination "
                       f"({client.identity})")  # fmt: skip
        if client.note:
            out.append(f"{who}: {client.note}")
        if client.record is not None and client.record.error:
            out.append(f"{who}: {client.record.error}")
    if report.tls_downgraded:
        out.append("TLS downgraded on " + ", ".join(report.tls_downgraded_channels))
    return out


def _detail_window(report: MigrationReport, steps: list[_Step]) -> tuple[float, float]:
    """The span the detail lanes show: the client's activity, the hold, the switchover."""
    marks = [s.t for s in steps]
    hold = _hold(report)
    migrate = _phase(report, "migrate")
    if hold is not None and migrate is not None:
        for key in ("active_after_ms", "released_after_ms"):
            value = getattr(hold, key, None)
            if value is not None:
                marks.append(migrate[0] + value)
        marks += [t for t, _, _ in _destination_events(report)]
    switch = switchover_ms(report)
    if switch is not None:
        marks.append(switch)
    for name in ("client_migrate_info", "link-wait", "transfer"):
        span = _phase(report, name)
        if span is not None:
            marks += list(span)
    if not marks:
        return 0.0, max(report.duration_ms, 1.0)
    lo, hi = min(marks), max(marks)
    pad = max((hi - lo) * 0.05, 1.0)
    return max(lo - pad, 0.0), hi + pad


def _axis(svg: _Svg, scale: _Scale, y: float, *, label: str) -> None:
    svg.add(f"<line x1='{scale.x0}' y1='{y}' x2='{scale.x1}' y2='{y}' stroke='#616161'/>")
    step = _nice_step(scale.t1 - scale.t0)
    t = math.ceil(scale.t0 / step) * step
    while t <= scale.t1 + 1e-9:
        x = scale.x(t)
        svg.add(f"<line x1='{x:.1f}' y1='{y}' x2='{x:.1f}' y2='{y + 4}' stroke='#616161'/>")
        svg.text(x, y + 15, f"{t:g}", size=9, anchor="middle", fill="#616161")
        t += step
    svg.text(scale.x0 - 8, y + 4, label, size=10, anchor="end", fill="#616161")


def _lane(svg: _Svg, lane_id: str, label: str, y: float, height: float = LANE_H) -> None:
    svg.add(f"<g class='lane' id={quoteattr(lane_id)} data-label={quoteattr(label)}>")
    svg.rect(LABEL_W, y, WIDTH - RIGHT_PAD - LABEL_W, height - 4, "#fafafa", stroke="#eeeeee")
    svg.text(LABEL_W - 8, y + height / 2 + 2, label, anchor="end", size=11)


def _side_label(svg: _Svg, x0: float, x1: float, y: float, text: str, **kw: Any) -> None:
    """``text`` right of [x0, x1]; left of it when it would run off the picture; over the
    span's start when neither fits."""
    width = 5.5 * len(text)
    if x1 + 4 + width < WIDTH - 4:
        svg.text(x1 + 4, y, text, **kw)
    elif x0 - 4 - width > LABEL_W:
        svg.text(x0 - 4, y, text, anchor="end", **kw)
    else:
        svg.text(x0 + 4, y, text, **kw)


def _phase_bars(svg: _Svg, report: MigrationReport, scale: _Scale, y: float, h: float) -> None:
    for i, p in enumerate(report.phases):
        start, end = p.start_ms, p.start_ms + p.duration_ms
        if end < scale.t0 or start > scale.t1:
            continue
        x0, x1 = scale.x(start), scale.x(end)
        tip = f"{p.name}: {_ms(p.duration_ms)} from {_ms(start)}" + (
            f" ({p.detail})" if p.detail else ""
        )
        stroke = "#c62828" if not p.ok else "#ffffff"
        attrs = f" class='phase' data-name={quoteattr(p.name)} data-ok='{str(p.ok).lower()}'"
        if not p.ok:
            attrs += " stroke-width='2.5'"
        svg.rect(x0, y, max(x1 - x0, 1.5), h, PHASE_COLOURS[i % len(PHASE_COLOURS)],
                 title=tip, attrs=attrs, stroke=stroke)  # fmt: skip
        if x1 - x0 > 7 * len(p.name):
            svg.text((x0 + x1) / 2, y + h / 2 + 4, p.name, size=10, anchor="middle")


def _state_bar(
    svg: _Svg, scale: _Scale, y: float, spans: list[tuple[float, float, str, str]]
) -> None:
    for start, end, label, colour in spans:
        x0, x1 = scale.x(start), scale.x(end)
        svg.rect(x0, y + 4, x1 - x0, LANE_H - 12, colour, title=f"{label}: {_ms(start)} - {_ms(end)}",
                 attrs=f" class='state' data-state={quoteattr(label)}")  # fmt: skip
        if x1 - x0 > 7 * len(label):
            svg.text(
                (x0 + x1) / 2, y + LANE_H / 2 + 2, label, size=9, anchor="middle", fill="#263238"
            )


def _marker(step: _Step, x: float, y: float) -> str:
    colour = SIDE_COLOUR.get(step.side, "#424242")
    tip = escape(
        f"{_ms(step.t)}  {step.side} {step.direction} {step.message} {step.detail}".strip()
    )
    attrs = (f"class='step' data-message={quoteattr(step.message)} data-side={quoteattr(step.side)} "
             f"data-direction={quoteattr(step.direction)} data-t='{step.t:.3f}'")  # fmt: skip
    if step.direction == "rx":
        shape = f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3.5' fill='{colour}'/>"
    elif step.direction == "tx":
        shape = (f"<polygon points='{x - 4:.1f},{y + 4:.1f} {x + 4:.1f},{y + 4:.1f} "
                 f"{x:.1f},{y - 4:.1f}' fill='{colour}'/>")  # fmt: skip
    else:
        shape = f"<rect x='{x - 3:.1f}' y='{y - 3:.1f}' width='6' height='6' fill='none' stroke='{colour}'/>"
    return f"<g {attrs}><title>{tip}</title>{shape}</g>"


def _client_lanes(svg: _Svg, report: MigrationReport, client: ClientVerdict, lane_prefix: str,
                  scale: _Scale, y: float) -> float:  # fmt: skip
    """Draw one embedded client's channels on ``scale``; return the y below them."""
    steps = _steps(report, client)
    channels = list(dict.fromkeys([*client.channels_before, *(s.channel for s in steps)]))
    switch = switchover_ms(report)
    h = CLIENT_LANE_H
    for channel in channels:
        mine = [s for s in steps if s.channel == channel]
        _lane(svg, f"{lane_prefix}-{channel}", f"client {channel}", y, h)
        mid = y + 19
        row_end = [-1e9, -1e9]
        seen: set[str] = set()
        for s in mine:
            if not scale.inside(s.t):
                continue
            x = scale.x(s.t)
            svg.add(_marker(s, x, mid))
            if s.message in KEY_MESSAGES and s.message not in seen:
                seen.add(s.message)
                label = "MIGRATE" if s.message == "MIGRATE" else s.message.removeprefix("MIGRATE_")
                row = 0 if x > row_end[0] else 1
                if x > row_end[row]:
                    right_edge = x - 2 + 5 * len(label) > WIDTH - 2
                    svg.text(x + 2 if right_edge else x - 2, y + (9 if row == 0 else 16) - 1, label,
                             size=8, fill=SIDE_COLOUR.get(s.side, "#424242"),
                             anchor="end" if right_edge else "start")  # fmt: skip
                    row_end[row] = x + 5 * len(label) + 4
        dark = client.blackout_ms.get(channel)
        start = _blackout_start(client, mine, switch)
        if dark is not None and start is not None and scale.inside(start):
            x0 = scale.x(start)
            x1 = max(scale.x(start + dark), x0 + 2.0)
            svg.rect(x0, y + 24, x1 - x0, 4, BLACKOUT, title=f"{channel} dark for {_ms(dark)}",
                     attrs=f" class='blackout' data-channel={quoteattr(channel)} "
                     f"data-ms='{dark:.3f}'")  # fmt: skip
            _side_label(svg, x0, x1, y + 29, f"dark {_ms(dark)}", size=8, fill=BLACKOUT)
        svg.add("</g>")
        y += h
    return y


def _blackout_start(client: ClientVerdict, mine: list[_Step], switch: float | None) -> float | None:
    """Where a channel's blackout starts: its last step on the source (a kept session), or
    the switchover (a new session: dark from there until it is linked again)."""
    if client.path != "seamless" and switch is not None:
        return switch
    src = [s.t for s in mine if s.side == "src"]
    return max(src) if src else switch


def _closeup_window(
    report: MigrationReport, steps: list[_Step], detail: tuple[float, float]
) -> tuple[float, float] | None:
    """A window on the switchover itself (MIGRATE, MIGRATE_DATA, the swaps, the blackouts),
    when it is much shorter than the detail window; None when zooming would show nothing new."""
    switch = switchover_ms(report)
    if switch is None:
        return None
    ends = [s.t for s in steps if s.t >= switch]
    for client in report.clients:
        mine = _steps(report, client)
        for channel, dark in client.blackout_ms.items():
            start = _blackout_start(client, [s for s in mine if s.channel == channel], switch)
            if start is not None:
                ends.append(start + dark)
    end = max([switch, *ends])
    span = end - switch
    if span <= 0 or span > 0.25 * (detail[1] - detail[0]):
        return None
    pad = max(span * 0.08, 0.05)
    return switch - pad, end + pad


def render_timeline(report: MigrationReport) -> str:
    """The SVG document (a string) for ``report``: the verdict and its facts, the whole
    migration, the detail lanes (controller, hold, both QEMUs, every client), a close-up of
    the switchover when it is short, and the legend."""
    svg = _Svg()
    all_steps = [s for c in report.clients for s in _steps(report, c)]
    y = _header(svg, report)
    window = _detail_window(report, all_steps)
    y = _overview(svg, report, all_steps, window, y)
    y = _detail(svg, report, _Scale(*window), y)
    y = _closeup(svg, report, all_steps, window, y)
    y = _legend(svg, report, y)
    height = y + 16
    head = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height:.0f}' "
            f"viewBox='0 0 {WIDTH} {height:.0f}' data-outcome={quoteattr(report.outcome)}>"
            f"<rect width='100%' height='100%' fill='white'/>")  # fmt: skip
    return head + "\n".join(svg.parts) + "</svg>\n"


def _header(svg: _Svg, report: MigrationReport) -> float:
    """The outcome, the migration's facts and the verdict's reasons; the next free y."""
    colour = OUTCOME_COLOUR.get(report.outcome, "#424242")
    name = getattr(report, "domain", None) or report.migrate_uri
    y = 24.0
    svg.text(12, y, f"{report.outcome}", size=18, weight="bold", fill=colour,
             attrs=" id='outcome'")  # fmt: skip
    fig = report.migration
    facts = [name, f"{report.started_at:%Y-%m-%d %H:%M:%S} UTC", f"total {_ms(report.duration_ms)}"]
    if fig.downtime_ms is not None:
        facts.append(f"downtime {fig.downtime_ms} ms")
    if fig.passes is not None:
        facts.append(f"{fig.passes} passes")
    if report.link_wait.duration_ms is not None:
        facts.append(f"link wait {report.link_wait.result} in {_ms(report.link_wait.duration_ms)}")
    svg.text(150, y, "  ·  ".join(facts), size=12)
    y += 8
    svg.add("<g id='verdict'>")
    for line in reasons(report) or ["no client was connected"]:
        y += 15
        svg.text(12, y, "• " + line, size=11, attrs=" class='reason'")
    svg.add("</g>")
    return y


def _overview(
    svg: _Svg,
    report: MigrationReport,
    all_steps: list[_Step],
    window: tuple[float, float],
    y: float,
) -> float:
    """The whole migration on one lane, the detail window marked on it."""
    # overview: the whole migration
    y += 22
    overview = _Scale(0.0, max(report.duration_ms, max((s.t for s in all_steps), default=0.0), 1.0))
    svg.add("<g class='lane' id='lane-overview' data-label='overview'>")
    svg.text(LABEL_W - 8, y + 12, "whole migration", anchor="end")
    _phase_bars(svg, report, overview, y, 18)
    wx0, wx1 = overview.x(window[0]), overview.x(window[1])
    svg.rect(wx0, y - 3, max(wx1 - wx0, 2.0), 24, "none", stroke="#37474f",
             title=f"detail below: {_ms(window[0])} - {_ms(window[1])}",
             attrs=" id='detail-window' stroke-dasharray='3,2'")  # fmt: skip
    svg.add("</g>")
    _axis(svg, overview, y + 24, label="ms")
    return y


def _detail(svg: _Svg, report: MigrationReport, scale: _Scale, y: float) -> float:
    """The detail lanes: controller phases, the hold, both QEMUs, every client."""
    y += 54
    top = y
    _lane(svg, "lane-controller", "controller", y)
    _phase_bars(svg, report, scale, y + 3, LANE_H - 10)
    svg.add("</g>")
    y += LANE_H
    y = _hold_lane(svg, report, scale, y)
    y = _qemu_lanes(svg, report, scale, y)
    switch = switchover_ms(report)
    for index, client in enumerate(report.clients):
        if client.record is None:
            _lane(svg, f"lane-client{index}", f"{client.kind} client", y)
            why = ({"qmp": "QMP evidence only", "graphics-events": "libvirt's graphics events only"}
                   .get(client.evidence, "") if client.kind == "external"
                   else "no record: it read no migration message")  # fmt: skip
            svg.text(LABEL_W + 6, y + LANE_H / 2 + 2,
                     f"{client.path}: {client.identity} ({why})", size=10)  # fmt: skip
            svg.add("</g>")
            y += LANE_H
            continue
        y = _client_lanes(svg, report, client, f"lane-client{index}", scale, y)
    if switch is not None and scale.inside(switch):
        x = scale.x(switch)
        svg.add(f"<line id='switchover' data-t='{switch:.3f}' x1='{x:.1f}' y1='{top - 4}' "
                f"x2='{x:.1f}' y2='{y + 2}' stroke='#263238' stroke-dasharray='5,3'>"
                f"<title>switchover at {_ms(switch)}</title></line>")  # fmt: skip
        svg.text(x + 3, top - 6, "switchover", size=9, fill="#263238")
    _axis(svg, scale, y + 4, label="ms")
    y += 32
    return y


def _hold_lane(svg: _Svg, report: MigrationReport, scale: _Scale, y: float) -> float:
    """The hold, from when it took effect to its release and why (none: no lane)."""
    hold = _hold(report)
    migrate = _phase(report, "migrate")
    if hold is not None and migrate is not None:
        _lane(svg, "lane-hold", f"hold ({hold.applied})", y)
        active, released = hold.active_after_ms, hold.released_after_ms
        if active is not None and released is not None:
            x0, x1 = scale.x(migrate[0] + active), scale.x(migrate[0] + released)
            svg.rect(x0, y + 4, max(x1 - x0, 2.0), LANE_H - 12, "#ffb300",
                     title=f"held {_ms(released - active)} at {hold.hold_bytes_per_s} B/s: "
                     f"{hold.release_reason}", attrs=" class='hold'")  # fmt: skip
            _side_label(svg, x0, x1, y + LANE_H / 2 + 2,
                        f"released: {hold.release_reason or '?'}", size=9)  # fmt: skip
        svg.add("</g>")
        y += LANE_H
    return y


def _qemu_lanes(svg: _Svg, report: MigrationReport, scale: _Scale, y: float) -> float:
    """Each QEMU's state before and after the switchover; the destination's graphics events."""
    switch = switchover_ms(report)
    completed = report.migration.status == "completed"
    src_after = report.source.status_after or ("migrated away" if completed else "running")
    dst_after = report.destination.status_after or ("running" if completed else "incoming")
    gone = re.search(r"destination (\w+)", report.placement_evidence or "")
    if not completed and report.destination.status_after is None and gone:
        dst_after = gone.group(1)  # what the placement check found there, e.g. "absent"
    for side, before, after in (
        ("source", "running", src_after),
        ("destination", report.destination.status_before or "incoming", dst_after),
    ):
        _lane(svg, f"lane-{side}", f"{side} QEMU", y)
        if switch is not None and completed:
            spans = [(scale.t0, switch, before, "#c8e6c9" if side == "source" else "#eceff1"),
                     (switch, scale.t1, after, "#eceff1" if side == "source" else "#c8e6c9")]  # fmt: skip
        else:
            label = (
                after if side == "source" else f"{before} → {after}" if after != before else before
            )
            spans = [(scale.t0, scale.t1, label, "#c8e6c9" if side == "source" else "#eceff1")]
        _state_bar(svg, scale, y, spans)
        if side == "destination":
            for t, kind, address in _destination_events(report):
                if scale.inside(t):
                    x = scale.x(t)
                    svg.add(f"<g class='graphics-event' data-kind={quoteattr(kind)}><title>"
                            f"{escape(f'{kind} {address} at {_ms(t)}')}</title><line x1='{x:.1f}' "
                            f"y1='{y + 2}' x2='{x:.1f}' y2='{y + LANE_H - 6}' "
                            f"stroke='{SIDE_COLOUR['dst']}' stroke-width='1.5'/></g>")  # fmt: skip
        svg.add("</g>")
        y += LANE_H
    return y


def _closeup(
    svg: _Svg,
    report: MigrationReport,
    all_steps: list[_Step],
    window: tuple[float, float],
    y: float,
) -> float:
    """The switchover close up, when it is short next to the detail window."""
    switch = switchover_ms(report)
    closeup = _closeup_window(report, all_steps, window)
    if closeup is not None:
        zoom = _Scale(*closeup)
        y += 14
        svg.text(12, y, f"the switchover, close up ({_ms(closeup[1] - closeup[0])}): what each "
                 "channel read from the source and handed to the destination, and how long it "
                 "was dark", size=11, weight="bold", attrs=" id='closeup'")  # fmt: skip
        y += 10
        ctop = y
        for index, client in enumerate(report.clients):
            if client.record is not None:
                y = _client_lanes(svg, report, client, f"lane-closeup{index}", zoom, y)
        if switch is not None:
            x = zoom.x(switch)
            svg.add(f"<line x1='{x:.1f}' y1='{ctop - 2}' x2='{x:.1f}' y2='{y + 2}' "
                    "stroke='#263238' stroke-dasharray='5,3'/>")  # fmt: skip
        _axis(svg, zoom, y + 4, label="ms")
        y += 32
    return y


def _legend(svg: _Svg, report: MigrationReport, y: float) -> float:
    legend = [("#1565c0", "source"), ("#2e7d32", "destination"), (BLACKOUT, "blackout")]
    if _destination_events(report):
        legend.append(("#2e7d32", "| destination graphics event"))
    x = LABEL_W
    svg.text(12, y, "● received  ▲ sent  □ client event  ·", size=10, fill="#424242")
    x = 230
    for fill, label in legend:
        svg.rect(x, y - 8, 10, 10, fill)
        svg.text(x + 14, y, label, size=10)
        x += 24 + 7 * len(label)
    for client in report.clients:
        if client.record is not None:
            _, anchor = client_anchor(report, client)
            svg.text(x + 10, y, f"client clock aligned on {anchor}", size=9, fill="#616161",
                     attrs=" id='anchor'")  # fmt: skip
            break
    return y


def write_timeline(report: MigrationReport, path: Path | str) -> Path:
    """Write :func:`render_timeline` of ``report`` to ``path`` (UTF-8, 0600: it names the
    guest and its clients; :func:`spice_libvirt.files.write_file` refuses a symlink or a
    directory others can write); return the path."""
    from spice_libvirt.files import PRIVATE_FILE, write_file

    write_file(path, render_timeline(report), PRIVATE_FILE)
    return Path(path)


__all__ = ["client_anchor", "reasons", "render_timeline", "switchover_ms", "write_timeline"]
