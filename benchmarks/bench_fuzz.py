"""A million hostile inputs through the sans-IO SPICE codec, with peak memory reported.

Why: every byte the client reads comes from a server it may not trust (a
4-million-entry CHANNELS_LIST grew a probe to 3.6 GB). The codec must answer anything with
its own :class:`RemoteProtocolError` (never another exception), and bounded input must
mean bounded memory. Four kinds of input, mutated from valid messages or random:

* ``body``: :func:`decode_server_message` on a (channel, type, body), most of them
  mutations of valid bodies (flipped bytes, cut or extended, size/offset/count fields
  overwritten with huge values);
* ``stream``: frames (valid, mutated, or random bytes) fed in random chunks to a linked
  :class:`ClientChannelConnection` (main channel with its 256 KiB message limit included);
* ``link``: random or mutated link replies to a connection awaiting one;
* ``migrate-data``: :func:`check_migrate_data` on mutated MIGRATE_DATA envelopes.

Each input's outcome is counted: accepted, refused with the protocol error, or
*unexpected* (any other exception: a bug, printed and failing the run). Rows are batches
of ``--batch`` inputs with the process's resident set size after each; the peak RSS
(``ru_maxrss``) is the figure to read.

Run: ``.venv/bin/python benchmarks/bench_fuzz.py [--inputs 1000000] [--seed N] [--json]``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import random
import resource
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from benchmarks.benchutil import Machine, arg_parser, finish, machine
from spice_libvirt.errors import ProtocolError
from spice_libvirt.spice import messages as m
from spice_libvirt.spice.connection import NEED_DATA, ClientChannelConnection, ConnState
from spice_libvirt.spice.constants import ChannelType, CommonCap, MainCap
from spice_libvirt.spice.framing import FrameDecoder, encode_frame
from spice_libvirt.spice.link import LinkMess, LinkReply
from spice_libvirt.spice.migrate_data import check_migrate_data

KINDS = ("body", "stream", "link", "migrate-data")
WEIGHTS = (55, 30, 8, 7)
HUGE = (0xFFFFFFFF, 0x7FFFFFFF, 0x10000000, 4_000_000, 65536, 256, 0)


def _corpus() -> list[tuple[int, m.Message]]:
    """Valid server messages of every modelled kind, per channel."""
    dst = m.DstInfo("10.0.0.9", 5901, 5902, "C=XX,O=Org,CN=host")
    samples: list[tuple[int, m.Message]] = [
        (ChannelType.MAIN, m.MainInit(0x1234, 1, 3, 2, 1, 10, 99, 0)),
        (ChannelType.MAIN, m.MainChannelsList(((2, 0), (3, 0), (4, 0), (10, 0)))),
        (ChannelType.MAIN, m.MainMigrateBeginSeamless(dst, 1)),
        (ChannelType.MAIN, m.MainMigrateBegin(dst)),
        (ChannelType.MAIN, m.MainMigrateSwitchHost(dst)),
        (ChannelType.MAIN, m.MainName("a-vm-name")),
        (ChannelType.MAIN, m.MainUuid(bytes(range(16)))),
        (ChannelType.MAIN, m.MainAgentData(b"\x01" * 64)),
        (ChannelType.PORT, m.PortInit("org.spice-libvirt.stream", True)),
        (ChannelType.PORT, m.VmcData(b"%020d %010d\n" % (7, 8))),
        (ChannelType.DISPLAY, m.UnknownMessage(302, bytes(48))),
        (ChannelType.INPUTS, m.InputsInit(3)),
    ]
    for channel in (ChannelType.MAIN, ChannelType.DISPLAY, ChannelType.PORT):
        samples += [
            (channel, m.SetAck(1, 20)),
            (channel, m.Ping(5, 123456, b"p" * 16)),
            (channel, m.Notify(1, 2, 3, 4, "notice")),
            (channel, m.WaitForChannels(((2, 0, 5),))),
            (channel, m.Migrate(3)),
            (channel, m.MigrateData(b"MNMD" + struct.pack("<I", 1) + bytes(64))),
        ]
    return samples


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(5)
        if op == 0 and buf:
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            del buf[rng.randrange(len(buf)) :]
        elif op == 2:
            buf += rng.randbytes(rng.randint(1, 32))
        elif op == 3 and len(buf) >= 4:
            at = rng.randrange(0, len(buf) - 3)
            buf[at : at + 4] = struct.pack("<I", rng.choice(HUGE))
        else:
            buf = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(buf)


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.corpus = _corpus()
        reply = LinkReply(0, bytes(162), frozenset({CommonCap.MINI_HEADER}), frozenset())
        self.link_reply = reply.encode()
        self.unexpected: list[str] = []

    def _linked(self, channel: int) -> ClientChannelConnection:
        """A connection in the data phase, without the RSA ticket (fuzzing starts after it)."""
        conn = ClientChannelConnection(LinkMess(7, channel, 0))
        conn.state = ConnState.READY
        conn.mini_header = True
        conn._decoder = FrameDecoder(mini=True, max_body=conn.max_body)
        return conn

    def body(self) -> None:
        channel, message = self.rng.choice(self.corpus)
        body = message.encode_body()
        if self.rng.random() < 0.8:
            body = _mutate(self.rng, body)
        m.decode_server_message(channel, m.message_type(message), body)

    def stream(self) -> None:
        rng = self.rng
        channel, message = rng.choice(self.corpus)
        conn = self._linked(channel)
        data = b"".join(
            encode_frame(m.message_type(message), message.encode_body(), mini=True)
            for _ in range(rng.randint(1, 4))
        )
        if rng.random() < 0.7:
            data = _mutate(rng, data)
        if rng.random() < 0.05:  # a size field past the channel's limit
            data = struct.pack("<HI", m.message_type(message), rng.choice(HUGE)) + data[6:]
        cut = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3)))
        for start, end in zip([0, *cut], [*cut, len(data)], strict=True):
            conn.receive_data(data[start:end])
            for _ in range(64):
                if conn.next_event() is NEED_DATA:
                    break

    def link(self) -> None:
        conn = ClientChannelConnection(
            LinkMess(0, ChannelType.MAIN, 0, channel_caps=frozenset({MainCap.SEAMLESS_MIGRATE}))
        )
        conn.start()
        data = (
            _mutate(self.rng, self.link_reply)
            if self.rng.random() < 0.8
            else self.rng.randbytes(40)
        )
        conn.receive_data(data)
        conn.next_event()

    def migrate_data(self) -> None:
        channel = self.rng.choice(list(ChannelType))
        head = self.rng.choice((b"MNMD", b"DCMD", b"SVMD", b"ICMD", b"SCMD"))
        body = (
            head + struct.pack("<I", self.rng.choice((1, 1, 2, 0))) + bytes(self.rng.randint(0, 80))
        )
        check_migrate_data(channel, _mutate(self.rng, body))

    def run_one(self, kind: str, step: Callable[[], None], outcome: Counter[str]) -> None:
        try:
            step()
        except ProtocolError:
            outcome["refused"] += 1
        except Exception:
            outcome["unexpected"] += 1
            if len(self.unexpected) < 5:
                self.unexpected.append(f"{kind}: {traceback.format_exc(limit=3)}")
        else:
            outcome["accepted"] += 1


class Row(BaseModel):
    batch: int
    kind: str
    inputs: int
    accepted: int
    refused: int
    unexpected: int
    seconds: float
    rss_mib: float


class Summary(BaseModel):
    machine: Machine
    seed: int
    inputs: int
    seconds: float
    inputs_per_s: int
    unexpected: int
    peak_rss_mib: float
    start_rss_mib: float
    by_kind: dict[str, dict[str, int]]
    first_unexpected: list[str]
    rows: list[Row]


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run(inputs: int, batch: int, seed: int) -> Summary:
    fuzzer = Fuzzer(seed)
    steps: dict[str, Callable[[], None]] = {
        "body": fuzzer.body,
        "stream": fuzzer.stream,
        "link": fuzzer.link,
        "migrate-data": fuzzer.migrate_data,
    }
    start_rss = _rss_mib()
    rows: list[Row] = []
    totals: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    started = time.perf_counter()
    done = 0
    while done < inputs:
        size = min(batch, inputs - done)
        kinds = fuzzer.rng.choices(KINDS, WEIGHTS, k=size)
        t0 = time.perf_counter()
        outcome: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
        for kind in kinds:
            fuzzer.run_one(kind, steps[kind], outcome[kind])
        seconds = time.perf_counter() - t0
        rss = _rss_mib()
        for kind in KINDS:
            c = outcome[kind]
            totals[kind].update(c)
            rows.append(
                Row(
                    batch=len(rows) // len(KINDS),
                    kind=kind,
                    inputs=sum(c.values()),
                    accepted=c["accepted"],
                    refused=c["refused"],
                    unexpected=c["unexpected"],
                    seconds=round(seconds, 3),
                    rss_mib=rss,
                )
            )
        done += size
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Summary(
        machine=machine(),
        seed=seed,
        inputs=done,
        seconds=round(elapsed, 2),
        inputs_per_s=int(done / elapsed),
        unexpected=sum(t["unexpected"] for t in totals.values()),
        peak_rss_mib=round(peak, 1),
        start_rss_mib=start_rss,
        by_kind={k: dict(v) for k, v in totals.items()},
        first_unexpected=fuzzer.unexpected,
        rows=rows,
    )


def markdown(s: Summary) -> str:
    lines = [
        f"{s.inputs:,} fuzz inputs in {s.seconds:.1f} s ({s.inputs_per_s:,}/s), seed {s.seed}; "
        f"peak RSS {s.peak_rss_mib:.1f} MiB (start {s.start_rss_mib:.1f} MiB); "
        f"unexpected exceptions: {s.unexpected}",
        "",
        "| input kind | inputs | accepted | refused (protocol error) | unexpected |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, c in s.by_kind.items():
        total = sum(c.values())
        lines.append(
            f"| {kind} | {total:,} | {c.get('accepted', 0):,} | {c.get('refused', 0):,} "
            f"| {c.get('unexpected', 0)} |"
        )
    return "\n".join([*lines, *s.first_unexpected])


def main() -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=20261129)
    args = parser.parse_args()
    summary = run(args.inputs, args.batch, args.seed)
    finish("fuzz", summary, args, markdown)
    return 1 if summary.unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
