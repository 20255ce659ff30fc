"""Plain libvirt migration vs. the seamless controller, at several client RTTs, measured.

One two-host libvirt lab (:mod:`spice_libvirt.lab.libvirt_lab`); for each client RTT (set on
the lab's delaying bridge) and each method (``plain``: libvirt's own p2p migration, the
baseline; ``ours``: :func:`spice_libvirt.lab.libvirt_migrate.lab_migrate` with the hold) and each
client kind, N ping-pong migrations of the idle 256 MiB firmware guest:

* ``remote-viewer``: a *fresh* remote-viewer per run (a viewer that once fell back to
  switch-host refuses every later seamless migration, ``rtt-seamless.md`` pitfall 2), in the
  lab's client namespace C, under an Xvfb this script starts on a free display. Its
  ``SPICE_DEBUG=1`` log is the oracle: ``migrate-begin-seamless`` ... ``all channel
  migrated, success`` = seamless; ``migrate-switch-host`` = switch-host (display outage =
  from that line to the next ``display-2:0: channel up``); ``migrate-end`` = semi-seamless.
* ``embedded``: our own client (a fresh one per run) in C; its protocol record is the
  oracle and its display-channel blackout the outage.

Wall time is libvirt's ``migrateToURI3`` call. Everything started here is ended by PID; the
lab is torn down at the end (``--keep-lab`` keeps it).

``--tls`` runs the same on a TLS lab (``lab up --libvirt --tls``: per-host certificates,
``defaultMode='secure'``, the graphics URI with ``tlsPort``/``tlsSubject``): remote-viewer
then verifies the lab CA and each host's subject with every channel secure, our client
the same; each row records ``tls``, and the TLS handshakes' cost shows in the wall time
and the client's link time next to the plain-TCP table.

    .venv/bin/python benchmarks/bench_libvirt_rtt.py --rtts 0,50,150,300 --runs 10
    .venv/bin/python benchmarks/bench_libvirt_rtt.py --tls --rtts 0,50,150,300 --runs 10 \
        --out benchmarks/results/libvirt-rtt-tls.jsonl
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import contextlib
import datetime as dt
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from benchmarks.benchutil import arg_parser
from spice_libvirt.lab import libvirt_lab, netns
from spice_libvirt.lab.libvirt_migrate import lab_migrate

RESULTS_MD = Path(__file__).resolve().with_name("RESULTS-libvirt.md")
#: the TLS table goes beside the plain-TCP one, never over it
RESULTS_TLS_MD = RESULTS_MD.with_name("RESULTS-libvirt-tls.md")
#: method -> (plain, controller options, table label)
METHODS: dict[str, tuple[bool, dict[str, Any], str]] = {
    "plain": (True, {}, "plain `virsh migrate` (libvirt p2p)"),
    "ours": (False, {}, "ours (QMP hold, released on the client's links)"),
    "ours-floor": (False, {"hold": "libvirt"}, "ours, taint-free hold (libvirt's 1 MiB/s floor)"),
}
TS = re.compile(r"GSpice-DEBUG: (\d\d):(\d\d):(\d\d\.\d+):")


class Run(BaseModel):
    rtt_ms: float
    method: str
    client: str
    index: int
    outcome: str
    #: the lab ran SPICE over TLS (every channel secure, CA and subject verified)
    tls: bool = False
    wall_s: float | None = None
    display_outage_s: float | None = None
    client_link_s: float | None = None
    held_ms: float | None = None
    released_after_ms: float | None = None
    rtt_estimate_ms: float | None = None
    release_reason: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------- X server, viewer


def _free_display() -> int:
    for n in range(120, 400):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display number")


@contextlib.contextmanager
def xvfb(log_dir: Path) -> Iterator[int]:
    """An Xvfb on a free display (ended by PID afterwards)."""
    display = _free_display()
    with (log_dir / "xvfb.log").open("wb") as log:
        proc = subprocess.Popen(
            ["Xvfb", f":{display}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/tmp/.X11-unix/X{display}").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Xvfb :{display} did not start")
            time.sleep(0.05)
        yield display
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Viewer:
    """A fresh remote-viewer in the client namespace, its SPICE_DEBUG log as the oracle."""

    def __init__(self, ns: str, display: int, uri: str, log: Path, tls: list[str]) -> None:
        self.log = log
        env = dict(os.environ, DISPLAY=f":{display}", SPICE_DEBUG="1")
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                netns.exec_argv(ns, ["remote-viewer", *tls, uri]),
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self, channels: int = 5, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"remote-viewer exited ({self.proc.returncode}): {self.log}")
            if self.text().count("channel up") >= channels:
                return
            time.sleep(0.05)
        raise RuntimeError(f"remote-viewer did not link {channels} channels: {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _t(line: str) -> float | None:
    m = TS.search(line)
    if not m:
        return None
    return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])


def classify(segment: str) -> tuple[str | None, float | None, float | None]:
    """(outcome, display outage s, client link s) from the log after the migration began."""
    lines = segment.splitlines()
    begin = next((_t(x) for x in lines if "migrate-begin-seamless" in x), None)
    allok = next((_t(x) for x in lines if "connections all ok" in x), None)
    link = round(allok - begin, 3) if begin is not None and allok is not None else None
    for i, line in enumerate(lines):
        if "migrate-switch-host" in line:
            t0 = _t(line)
            up = next((_t(x) for x in lines[i + 1 :] if "display-2:0: channel up" in x), None)
            if up is None or t0 is None:
                return None, None, link
            return "switch-host", round(up - t0, 3), link
        if "migration message: migrate-end" in line:
            return "semi-seamless", None, link
    if any("all channel migrated, success" in x for x in lines):
        return "seamless", 0.0, link
    return None, None, link


# ---------------------------------------------------------------------- runs


def run_viewer(lab_dir: Path, display: int, rtt: float, method: str, i: int, log_dir: Path) -> Run:
    state = libvirt_lab.load_state(lab_dir)
    assert state is not None
    where = state.active_host or "A"
    endpoint = libvirt_lab.spice_endpoint(state, where)
    assert endpoint is not None
    log = log_dir / f"rv-{int(rtt)}-{method}-{i}.log"
    tls: list[str] = []
    if state.tls is not None:
        tls = [
            f"--spice-ca-file={state.tls.ca_cert}",
            f"--spice-host-subject={endpoint.subject}",
            "--spice-secure-channels=all",
        ]
    viewer = Viewer(state.client.netns, display, endpoint.uri, log, tls)
    run = Run(
        rtt_ms=rtt,
        method=method,
        client="remote-viewer",
        index=i,
        outcome="?",
        tls=state.tls is not None,
    )
    try:
        viewer.wait_up()
        time.sleep(0.3)
        mark = len(viewer.text())
        plain, options, _ = METHODS[method]
        report = lab_migrate(lab_dir, watch=False, plain=plain, options=options)
        run.wall_s = round((report.wall_ms or 0) / 1000.0, 3)
        run.held_ms = report.hold.held_ms
        run.released_after_ms = report.hold.released_after_ms
        run.rtt_estimate_ms = report.hold.client_rtt_estimate_ms
        run.release_reason = report.hold.release_reason
        run.error = report.error
        deadline = time.monotonic() + 25.0
        while True:
            outcome, outage, link = classify(viewer.text()[mark:])
            if outcome is not None or time.monotonic() > deadline:
                break
            if viewer.proc.poll() is not None:
                outcome = "lost"
                break
            time.sleep(0.1)
        run.outcome = outcome or "unknown"
        run.display_outage_s, run.client_link_s = outage, link
    except Exception as exc:  # a broken run is recorded, not fatal
        run.outcome, run.error = "error", f"{type(exc).__name__}: {exc}"
    finally:
        viewer.stop()
    return run


def run_embedded(lab_dir: Path, rtt: float, method: str, i: int) -> Run:
    state = libvirt_lab.load_state(lab_dir)
    tls = state is not None and state.tls is not None
    run = Run(rtt_ms=rtt, method=method, client="embedded", index=i, outcome="?", tls=tls)
    try:
        plain, options, _ = METHODS[method]
        report = lab_migrate(lab_dir, watch=True, plain=plain, options=options)
        run.outcome = report.outcome
        run.wall_s = round((report.wall_ms or 0) / 1000.0, 3)
        run.held_ms = report.hold.held_ms
        run.released_after_ms = report.hold.released_after_ms
        run.rtt_estimate_ms = report.hold.client_rtt_estimate_ms
        run.release_reason = report.hold.release_reason
        run.error = report.error
        for client in report.clients:
            if client.record is not None:
                black = client.record.blackout_ms.get("display:0")
                run.display_outage_s = round(black / 1000.0, 3) if black is not None else None
                rec = client.record
                if rec.connected_reply_at is not None and rec.started_at is not None:
                    run.client_link_s = round(rec.connected_reply_at - rec.started_at, 3)
    except Exception as exc:
        run.outcome, run.error = "error", f"{type(exc).__name__}: {exc}"
    return run


# ---------------------------------------------------------------------- summary


def _med(values: list[float | None]) -> str:
    vs = [v for v in values if v is not None]
    if not vs:
        return "-"
    return f"{statistics.median(vs):.2f} ({min(vs):.2f}-{max(vs):.2f})"


def table(runs: list[Run]) -> str:
    head = (
        "| RTT ms | client | method | n | seamless | switch-host | other | "
        "migrateToURI3 wall s, median (range) | display outage s, median (range) | "
        "held ms, median |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    keys = sorted(
        {(r.rtt_ms, r.client, r.method) for r in runs},
        key=lambda k: (k[0], k[1], list(METHODS).index(k[2])),
    )
    for rtt, client, method in keys:
        rs = [r for r in runs if (r.rtt_ms, r.client, r.method) == (rtt, client, method)]
        seam = sum(r.outcome == "seamless" for r in rs)
        sw = sum(r.outcome == "switch-host" for r in rs)
        other = len(rs) - seam - sw
        outages = [r.display_outage_s for r in rs]
        held = [r.held_ms for r in rs if r.held_ms is not None]
        name = METHODS[method][2]
        rows.append(
            f"| {rtt:g} | {client} | {name} | {len(rs)} | **{seam}** | {sw} | {other} | "
            f"{_med([r.wall_s for r in rs])} | {_med(outages)} | "
            f"{statistics.median(held):.0f} |"
            if held
            else f"| {rtt:g} | {client} | {name} | {len(rs)} | **{seam}** | {sw} | {other} | "
            f"{_med([r.wall_s for r in rs])} | {_med(outages)} | - |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__, summary=False)
    parser.add_argument("--rtts", default="0,50,150,300")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--methods", default="plain,ours")
    parser.add_argument("--clients", default="remote-viewer,embedded")
    parser.add_argument("--lab-dir", type=Path, default=None)
    parser.add_argument("--keep-lab", action="store_true")
    parser.add_argument(
        "--tls", action="store_true", help="a TLS lab (lab up --libvirt --tls, all secure)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file of the runs")
    parser.add_argument("--write-results", action="store_true", help=f"write {RESULTS_MD.name}")
    args = parser.parse_args(argv)
    rtts = [float(x) for x in args.rtts.split(",")]
    methods = args.methods.split(",")
    clients = args.clients.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-libvirt-rtt-"))
    lab_dir = (args.lab_dir or work / "lab").absolute()
    out = args.out or work / "runs.jsonl"
    runs: list[Run] = []
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    own_lab = libvirt_lab.load_state(lab_dir) is None
    if own_lab:
        libvirt_lab.up(lab_dir, client_rtt_ms=rtts[0], tls=args.tls)
    elif args.tls != (libvirt_lab.load_state(lab_dir).tls is not None):  # type: ignore[union-attr]
        parser.error(f"--tls does not match the lab already up in {lab_dir}")
    try:
        with xvfb(work) as display:
            for rtt in rtts:
                libvirt_lab.set_client_rtt(lab_dir, rtt)
                for method in methods:
                    for client in clients:
                        for i in range(args.runs):
                            if client == "remote-viewer":
                                run = run_viewer(lab_dir, display, rtt, method, i, work)
                            else:
                                run = run_embedded(lab_dir, rtt, method, i)
                            runs.append(run)
                            with out.open("a") as fh:
                                fh.write(run.model_dump_json() + "\n")
                            print(
                                f"{time.monotonic() - t0:7.1f}s rtt {rtt:g} {method:5} "
                                f"{client:13} #{i}: {run.outcome:12} wall {run.wall_s} "
                                f"outage {run.display_outage_s} held {run.held_ms} "
                                f"{run.error or ''}",
                                flush=True,
                            )
    finally:
        if own_lab and not args.keep_lab:
            libvirt_lab.down(lab_dir)
    text = table(runs)
    print(text)
    print(f"runs: {out}; logs: {work}; {time.monotonic() - t0:.0f} s")
    if args.write_results:
        body = (
            "# Plain libvirt migration vs. the seamless controller, by client RTT"
            f"{' (SPICE over TLS)' if args.tls else ''}\n\n"
            f"Measured {started:%Y-%m-%d %H:%M} UTC by `benchmarks/bench_libvirt_rtt.py "
            f"{'--tls ' if args.tls else ''}"
            f"--rtts {args.rtts} --runs {args.runs}` ({time.monotonic() - t0:.0f} s), "
            "two-host libvirt lab, idle 256 MiB firmware guest.\n\n" + text
        )
        target = RESULTS_TLS_MD if args.tls else RESULTS_MD
        target.write_text(body)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
