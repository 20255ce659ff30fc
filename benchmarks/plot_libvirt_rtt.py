"""Plots of the libvirt RTT benchmark, drawn from its raw rows: plain SVG, no plotting library.

Two charts against the client RTT, one line per method (plain vs ours), for one client kind:

* the **seamless rate** (share of runs the client's own oracle called seamless);
* the **wall time** a user waits (median ``total_s``), and ours' added wall time over plain
  with the added-wall goal drawn as a step.

    .venv/bin/python benchmarks/plot_libvirt_rtt.py benchmarks/results/libvirt-rtt.jsonl \\
        --out-dir benchmarks/results

The charts are written next to each other as ``<stem>-seamless.svg`` and ``<stem>-wall.svg``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

#: one colour per series, in order of appearance
COLOURS = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 560, 340, 60, 150, 36, 46
GOAL_S = {0.0: 0.1, 50.0: 0.3, 150.0: 0.6, 300.0: 1.2}

Series = tuple[str, list[tuple[float, float]]]


def load(path: Path, client: str) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("client") == client]


def _by_cell(rows: list[dict[str, object]]) -> dict[str, dict[float, list[dict[str, object]]]]:
    cells: dict[str, dict[float, list[dict[str, object]]]] = {}
    for r in rows:
        cells.setdefault(str(r["method"]), {}).setdefault(float(str(r["rtt_ms"])), []).append(r)
    return cells


def seamless_series(rows: list[dict[str, object]]) -> list[Series]:
    return [
        (
            m,
            [
                (rtt, 100.0 * sum(r["outcome"] == "seamless" for r in rs) / len(rs))
                for rtt, rs in sorted(by.items())
            ],
        )
        for m, by in _by_cell(rows).items()
    ]


def _median_total(rs: list[dict[str, object]]) -> float | None:
    vs = [float(str(r["total_s"])) for r in rs if r.get("total_s") is not None]
    return statistics.median(vs) if vs else None


def wall_series(rows: list[dict[str, object]]) -> list[Series]:
    """Median total wall per method, and each non-plain method's added wall over plain."""
    cells = _by_cell(rows)
    out: list[Series] = []
    plain = {rtt: _median_total(rs) for rtt, rs in cells.get("plain", {}).items()}
    for method, by in cells.items():
        points = [
            (rtt, v) for rtt, rs in sorted(by.items()) if (v := _median_total(rs)) is not None
        ]
        out.append((f"{method} (total)", points))
        if method != "plain" and plain:
            added = [(rtt, v - base) for rtt, v in points if (base := plain.get(rtt)) is not None]
            out.append((f"{method} added over plain", added))
    return out


def svg(title: str, y_label: str, series: Sequence[Series], goal: dict[float, float] | None) -> str:
    xs = sorted({x for _, pts in series for x, _ in pts} | set(goal or {}))
    ys = [y for _, pts in series for _, y in pts] + list((goal or {}).values()) + [0.0]
    x_max = max(xs, default=1.0) or 1.0
    y_lo, y_hi = min(ys), max(ys) * 1.1 or 1.0
    span = (y_hi - y_lo) or 1.0

    def px(x: float) -> float:
        return PAD_L + (W - PAD_L - PAD_R) * x / x_max

    def py(y: float) -> float:
        return H - PAD_B - (H - PAD_T - PAD_B) * (y - y_lo) / span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2 - PAD_R / 2}" y="18" text-anchor="middle" font-size="13">'
        f"{escape(title)}</text>",
        f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" stroke="black"/>',
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="black"/>',
        f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 10}" text-anchor="middle">'
        "client RTT (ms)</text>",
        f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">'
        f"{escape(y_label)}</text>",
    ]
    for x in xs:
        parts.append(
            f'<text x="{px(x):.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{x:g}</text>'
        )
    for i in range(5):
        y = y_lo + span * i / 4
        parts.append(
            f'<line x1="{PAD_L}" y1="{py(y):.1f}" x2="{W - PAD_R}" y2="{py(y):.1f}" '
            'stroke="#dddddd"/>'
            f'<text x="{PAD_L - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>'
        )
    legend = list(series)
    if goal:
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(goal.items()))
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="#999999" stroke-dasharray="4 3"/>'
        )
    for n, (name, points) in enumerate(legend):
        colour = COLOURS[n % len(COLOURS)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in points
        ]
        ly = PAD_T + 16 * n
        parts.append(
            f'<line x1="{W - PAD_R + 8}" y1="{ly}" x2="{W - PAD_R + 24}" y2="{ly}" '
            f'stroke="{colour}" stroke-width="2"/>'
            f'<text x="{W - PAD_R + 28}" y="{ly + 4}">{escape(name)}</text>'
        )
    if goal:
        ly = PAD_T + 16 * len(legend)
        parts.append(
            f'<line x1="{W - PAD_R + 8}" y1="{ly}" x2="{W - PAD_R + 24}" y2="{ly}" '
            'stroke="#999999" stroke-dasharray="4 3"/>'
            f'<text x="{W - PAD_R + 28}" y="{ly + 4}">goal (added)</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("rows", type=Path, help="JSON lines of bench_libvirt_rtt.py")
    parser.add_argument("--client", default="remote-viewer")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: beside the rows")
    args = parser.parse_args(argv)
    rows = load(args.rows, args.client)
    if not rows:
        parser.error(f"no {args.client} rows in {args.rows}")
    out_dir = args.out_dir or args.rows.parent
    stem = f"{args.rows.stem}-{args.client}"
    seamless = out_dir / f"{stem}-seamless.svg"
    seamless.write_text(
        svg(f"Seamless rate, {args.client}", "seamless runs (%)", seamless_series(rows), None)
    )
    wall = out_dir / f"{stem}-wall.svg"
    wall.write_text(
        svg(f"Wall time, {args.client} (medians)", "seconds", wall_series(rows), GOAL_S)
    )
    print(f"wrote {seamless} and {wall}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
