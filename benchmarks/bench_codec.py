"""Messages per second of the sans-IO SPICE codec, body codec alone and through the framing.

Why: the embedded client reads every message of every channel in Python. A migration
under load (a port stream of 32-byte records, a busy display) must not make the client the
bottleneck, so decoding should stay well above what spice-server sends a passive client
(goal: >= 200 k messages/s decode on one core; >= 1 M messages/s through
the full framing path, ``receive_data`` + ``next_event``, on this mix).

The mix is what a passive client sees on a live session: mostly port records and display
drawing messages it does not interpret, some keep-alive traffic, and the main channel's
rare session and migration messages. Four measurements, each the median of ``--rounds``
runs of ``--messages`` messages:

* ``decode-body``: :func:`decode_server_message` on ready-cut bodies;
* ``encode-body``: ``Message.encode_body()`` plus :func:`encode_frame` (mini header);
* ``framing-bulk``: one big buffer of frames per channel fed to a linked
  :class:`ClientChannelConnection`, then ``next_event()`` until ``NEED_DATA``;
* ``framing-64k``: the same bytes fed in 64 KiB reads (what a socket hands the client),
  draining events after every read.

Run: ``.venv/bin/python benchmarks/bench_codec.py [--rounds N] [--messages N] [--json]
[--profile]``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import cProfile
import io
import pstats
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel

from benchmarks.benchutil import (
    Distribution,
    Machine,
    arg_parser,
    distribution,
    finish,
    machine,
    write_jsonl,
)
from spice_libvirt.spice.connection import (
    NEED_DATA,
    ClientChannelConnection,
    LinkEstablished,
    LinkReplyReceived,
    MessageReceived,
)
from spice_libvirt.spice.constants import ChannelType, CommonCap, MainCap
from spice_libvirt.spice.framing import encode_frame
from spice_libvirt.spice.link import LinkMess, LinkReply
from spice_libvirt.spice.messages import (
    DstInfo,
    MainChannelsList,
    MainInit,
    MainMigrateBeginSeamless,
    Message,
    Ping,
    SetAck,
    UnknownMessage,
    VmcData,
    decode_server_message,
    message_type,
)

GOAL_DECODE_PER_S = 200_000
GOAL_FRAMING_PER_S = 1_000_000
READ_SIZE = 64 * 1024

#: (weight in %, channel, factory). Display types 300-320 are drawing messages
#: (DRAW_FILL, DRAW_COPY, ...) that the client keeps as UnknownMessage.
MixEntry = tuple[int, ChannelType, Callable[[random.Random], Message]]


def _record(rng: random.Random) -> Message:
    counter = rng.randrange(10**12)
    return VmcData(f"{counter:020d} {rng.randrange(10**9):010d}\n".encode())


def _display(rng: random.Random) -> Message:
    return UnknownMessage(rng.randrange(300, 320), rng.randbytes(rng.randrange(150, 600)))


MIX: tuple[MixEntry, ...] = (
    (50, ChannelType.PORT, _record),
    (28, ChannelType.DISPLAY, _display),
    (8, ChannelType.DISPLAY, lambda r: Ping(r.randrange(1 << 32), r.randrange(1 << 63))),
    (4, ChannelType.MAIN, lambda r: Ping(r.randrange(1 << 32), r.randrange(1 << 63))),
    (3, ChannelType.DISPLAY, lambda r: SetAck(r.randrange(1, 100), 20)),
    (2, ChannelType.MAIN, lambda r: MainInit(r.randrange(1 << 32), 1, 3, 2, 0, 10, 1000, 0)),
    (
        2,
        ChannelType.MAIN,
        lambda r: MainChannelsList(((1, 0), (2, 0), (3, 0), (4, 0), (10, 0))),
    ),
    (
        3,
        ChannelType.MAIN,
        lambda r: MainMigrateBeginSeamless(DstInfo("127.0.0.1", r.randrange(5900, 6000), None)),
    ),
)


def build_mix(count: int, seed: int = 1) -> list[tuple[ChannelType, Message]]:
    """``count`` (channel, message) pairs drawn from :data:`MIX`, reproducibly."""
    rng = random.Random(seed)
    weights = [w for w, _, _ in MIX]
    picks = rng.choices(range(len(MIX)), weights=weights, k=count)
    return [(MIX[i][1], MIX[i][2](rng)) for i in picks]


# -- a linked connection without a socket -------------------------------------------------


def _server_pub_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def linked_connection(channel: ChannelType, pub_key: bytes) -> ClientChannelConnection:
    """A connection taken through the real link (reply, ticket, result) to READY."""
    common = frozenset({CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER})
    caps = frozenset({MainCap.SEAMLESS_MIGRATE}) if channel == ChannelType.MAIN else frozenset()
    conn = ClientChannelConnection(LinkMess(0, channel, 0, common, caps))
    conn.start()
    reply = LinkReply(0, pub_key, common | {CommonCap.AUTH_SPICE}, caps)
    conn.receive_data(reply.encode())
    event = conn.next_event()
    if not isinstance(event, LinkReplyReceived):
        raise RuntimeError(f"expected the link reply, got {event!r}")
    conn.authenticate(None)
    conn.receive_data(b"\0\0\0\0")
    event = conn.next_event()
    if not isinstance(event, LinkEstablished) or not event.mini_header:
        raise RuntimeError(f"link did not reach READY with mini headers: {event!r}")
    return conn


# -- the four measurements ----------------------------------------------------------------


class Series(BaseModel):
    name: str
    messages_per_run: int
    bytes_per_run: int
    msgs_per_s: Distribution
    mbytes_per_s_median: float
    runs_s: list[float]
    #: the same runs by this process's CPU time (time.process_time around each run, link
    #: setup included): what a busy machine's other jobs do not inflate as much
    msgs_per_cpu_s: Distribution | None = None
    cpu_runs_s: list[float] = []


class CodecSummary(BaseModel):
    benchmark: str = "codec"
    machine: Machine
    commit: str = ""
    mix: dict[str, int]
    series: list[Series]
    goal_decode_msgs_per_s: int = GOAL_DECODE_PER_S
    goal_met: bool
    #: the full framing path (both framing series' medians) at >= GOAL_FRAMING_PER_S
    goal_framing_msgs_per_s: int = GOAL_FRAMING_PER_S
    goal_framing_met: bool = False
    profile_top: list[str] = []


#: One run of a measurement: (messages handled, seconds spent on them).
Run = Callable[[], tuple[int, float]]


def _time(fn: Run, rounds: int) -> tuple[list[float], list[float], int]:
    """(wall seconds per run, CPU seconds per run, messages per run)."""
    fn()  # warm-up: caches, first allocations
    runs = []
    cpu_runs = []
    count = 0
    for _ in range(rounds):
        cpu = time.process_time()
        count, elapsed = fn()
        cpu_runs.append(time.process_time() - cpu)
        runs.append(elapsed)
    return runs, cpu_runs, count


def bench_decode_body(mix: list[tuple[ChannelType, Message]]) -> Run:
    cut = [(int(ch), message_type(m), m.encode_body()) for ch, m in mix]

    def run() -> tuple[int, float]:
        decode = decode_server_message
        start = time.perf_counter()
        for ch, mtype, body in cut:
            decode(ch, mtype, body)
        return len(cut), time.perf_counter() - start

    return run


def bench_encode(mix: list[tuple[ChannelType, Message]]) -> Run:
    messages = [m for _, m in mix]

    def run() -> tuple[int, float]:
        start = time.perf_counter()
        for m in messages:
            encode_frame(message_type(m), m.encode_body(), mini=True)
        return len(messages), time.perf_counter() - start

    return run


def _channel_streams(mix: list[tuple[ChannelType, Message]]) -> dict[ChannelType, bytes]:
    parts: dict[ChannelType, list[bytes]] = {}
    for ch, m in mix:
        parts.setdefault(ch, []).append(encode_frame(message_type(m), m.encode_body(), mini=True))
    return {ch: b"".join(p) for ch, p in parts.items()}


def bench_framing(
    streams: dict[ChannelType, bytes], pub_key: bytes, *, read_size: int | None
) -> Run:
    """Feeding + next_event() only: linking is done before the clock starts."""

    def run() -> tuple[int, float]:
        conns = {ch: linked_connection(ch, pub_key) for ch in streams}
        count = 0
        start = time.perf_counter()
        for ch, data in streams.items():
            conn = conns[ch]
            step = read_size or len(data)
            for offset in range(0, len(data), step):
                conn.receive_data(data[offset : offset + step])
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    assert isinstance(event, MessageReceived)
                    count += 1
        return count, time.perf_counter() - start

    return run


def _series(name: str, timed: tuple[list[float], list[float], int], nbytes: int) -> Series:
    runs, cpu_runs, count = timed
    rates = [count / r for r in runs]
    med = statistics.median(runs)
    return Series(
        name=name,
        messages_per_run=count,
        bytes_per_run=nbytes,
        msgs_per_s=distribution(rates, digits=0),
        mbytes_per_s_median=round(nbytes / med / 1e6, 2),
        runs_s=[round(r, 5) for r in runs],
        msgs_per_cpu_s=distribution([count / max(c, 1e-9) for c in cpu_runs], digits=0),
        cpu_runs_s=[round(c, 5) for c in cpu_runs],
    )


def profile_framing(streams: dict[ChannelType, bytes], pub_key: bytes) -> list[str]:
    """cProfile of one framing-64k run: the functions where the time goes."""
    fn = bench_framing(streams, pub_key, read_size=READ_SIZE)
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    return [ln.rstrip() for ln in out.getvalue().splitlines() if ln.strip()][-16:]


def run(rounds: int, messages: int, want_profile: bool) -> CodecSummary:
    mix = build_mix(messages)
    pub_key = _server_pub_key()
    streams = _channel_streams(mix)
    nbytes = sum(len(s) for s in streams.values())
    series = []
    body_bytes = sum(len(m.encode_body()) for _, m in mix)
    series.append(_series("decode-body", _time(bench_decode_body(mix), rounds), body_bytes))
    series.append(_series("encode-frame", _time(bench_encode(mix), rounds), nbytes))
    for name, size in (("framing-bulk", None), ("framing-64k", READ_SIZE)):
        timed = _time(bench_framing(streams, pub_key, read_size=size), rounds)
        if timed[2] != messages:
            raise RuntimeError(f"{name}: decoded {timed[2]} messages of {messages}")
        series.append(_series(name, timed, nbytes))
    decode_rates = [s.msgs_per_s.median or 0.0 for s in series if s.name != "encode-frame"]
    mix_share: dict[str, int] = {}
    for weight, ch, factory in MIX:
        sample = factory(random.Random(0))
        key = f"{ch.label}:{type(sample).__name__}"
        mix_share[key] = mix_share.get(key, 0) + weight
    framing_rates = [s.msgs_per_s.median or 0.0 for s in series if s.name.startswith("framing")]
    summary = CodecSummary(
        machine=machine(),
        commit=_commit(),
        mix=mix_share,
        series=series,
        goal_met=min(decode_rates) >= GOAL_DECODE_PER_S,
        goal_framing_met=min(framing_rates) >= GOAL_FRAMING_PER_S,
    )
    if want_profile or not summary.goal_met:
        summary.profile_top = profile_framing(streams, pub_key)
    return summary


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parents[1],
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def rows(summary: CodecSummary) -> list[dict[str, object]]:
    """One raw row per timed run: series, run index, seconds, messages, bytes."""
    return [
        {
            "series": s.name,
            "run": i,
            "seconds": r,
            "cpu_seconds": s.cpu_runs_s[i] if i < len(s.cpu_runs_s) else None,
            "messages": s.messages_per_run,
            "bytes": s.bytes_per_run,
            "msgs_per_s": round(s.messages_per_run / r),
            "commit": summary.commit,
            "load_1m": summary.machine.load_avg_1m,
        }
        for s in summary.series
        for i, r in enumerate(s.runs_s)
    ]


def markdown(summary: CodecSummary) -> str:
    m = summary.machine
    lines = [
        f"Commit {summary.commit}, Python {m.python}, {m.cpus} cores ({m.cpu_model}),"
        f" load {m.load_avg_1m};"
        f" {summary.series[0].messages_per_run} messages per run,"
        f" median of {len(summary.series[0].runs_s)} runs.",
        "",
        "| measurement | median msg/s | p90 msg/s | min..max msg/s | MB/s (median)"
        " | median msg per CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary.series:
        d = s.msgs_per_s
        lines.append(
            f"| {s.name} | {d.median:,.0f} | {d.p90:,.0f} | {d.min:,.0f}..{d.max:,.0f}"
            f" | {s.mbytes_per_s_median}"
            f" | {(s.msgs_per_cpu_s.median or 0) if s.msgs_per_cpu_s else 0:,.0f} |"
        )
    verdict = "met" if summary.goal_met else "MISSED"
    framing = "met" if summary.goal_framing_met else "MISSED"
    lines.append("")
    lines.append(f"Goal >= {summary.goal_decode_msgs_per_s:,} msg/s decode: {verdict}.")
    lines.append(
        f"Goal >= {summary.goal_framing_msgs_per_s:,} msg/s through the framing path"
        f" (median of both framing series): {framing}."
    )
    return "\n".join(lines)


def _print_profile(summary: CodecSummary) -> None:
    if summary.profile_top:
        print("\ncProfile (framing-64k, by own time):")
        print("\n".join(summary.profile_top))


#: One measurement of one tree, run in a child process: the tree's own bench_codec.run().
_VERSUS_CHILD = """
import json, os, sys
from benchmarks import bench_codec  # the tree the child runs in (cwd, first on sys.path)
import spice_libvirt.spice.connection as connection
assert connection.__file__.startswith(sys.argv[1]), connection.__file__
summary = bench_codec.run(int(sys.argv[2]), int(sys.argv[3]), False)
print(json.dumps({s.name: s.msgs_per_s.median for s in summary.series}))
"""


def versus(ref: str, alternations: int, rounds: int, messages: int) -> list[dict[str, Any]]:
    """This tree against git ``ref``, side by side: ``alternations`` times each, alternated,
    each a child process running that tree's own :func:`run`. Returns one raw row per run."""
    import json
    import os
    import sys
    import tarfile
    import tempfile

    here = Path(__file__).resolve().parents[1]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="codec-versus-") as tmp:
        archive = subprocess.run(
            ["git", "archive", ref, "spice_libvirt", "benchmarks"],
            cwd=here, capture_output=True, check=True,
        )  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        trees = {f"{ref} ({_rev(ref)})": tmp, f"HEAD ({_commit()})": str(here)}
        for i in range(alternations):
            for label, tree in trees.items():
                out = subprocess.run(
                    [sys.executable, "-c", _VERSUS_CHILD, tree, str(rounds), str(messages)],
                    capture_output=True, text=True, check=True, cwd=tree,
                )  # fmt: skip
                rates = json.loads(out.stdout)
                rows.append({"alternation": i, "tree": label, "load_1m": round(os.getloadavg()[0], 2),
                             "msgs_per_s": rates})  # fmt: skip
    return rows


def _rev(ref: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", ref], capture_output=True, text=True,
                         check=False, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    return out.stdout.strip() or ref


def versus_markdown(rows: list[dict[str, Any]]) -> str:
    trees = list(dict.fromkeys(str(r["tree"]) for r in rows))
    series = list(rows[0]["msgs_per_s"])
    med = {
        (t, s): statistics.median(float(r["msgs_per_s"][s]) for r in rows if r["tree"] == t)
        for t in trees
        for s in series
    }
    loads = [float(str(r["load_1m"])) for r in rows]
    lines = [
        f"Side by side, {len(rows) // len(trees)} alternations, load {min(loads)}..{max(loads)}"
        " (median msg/s of each tree's runs):",
        "",
        "| measurement | " + " | ".join(trees) + " | ratio |",
        "|---|" + "---:|" * (len(trees) + 1),
    ]
    for s in series:
        ratio = med[(trees[-1], s)] / med[(trees[0], s)]
        cells = " | ".join(f"{med[(t, s)]:,.0f}" for t in trees)
        lines.append(f"| {s} | {cells} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="runs per measurement (>= 5)")
    parser.add_argument("--messages", type=int, default=100_000, help="messages per run")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of framing")
    parser.add_argument(
        "--versus",
        metavar="GITREF",
        help="instead: this tree against GITREF side by side (alternated child processes; "
        "raw rows to results/codec-versus.jsonl)",
    )
    parser.add_argument("--alternations", type=int, default=5, help="with --versus (5)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.messages < 100:
        parser.error("--rounds >= 1 and --messages >= 100")
    if args.versus:
        versus_rows = versus(args.versus, args.alternations, args.rounds, args.messages)
        if args.save:
            write_jsonl("codec-versus", versus_rows)
        print(versus_markdown(versus_rows))
        return 0
    summary = run(args.rounds, args.messages, args.profile)
    return finish(
        "codec", summary, args, markdown, rows=("codec", rows(summary)), extra=_print_profile
    )


if __name__ == "__main__":
    raise SystemExit(main())
