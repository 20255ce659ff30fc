"""QMP negotiation against a busy QEMU: how often an event comes before the reply.

Why: QEMU 7.2 leaves capabilities-negotiation mode inside ``qmp_capabilities`` (run in a
bottom half) and writes the reply only when its monitor dispatcher runs again, so an event
raised in between reaches the new session first. ``qemu.qmp`` 0.0.6 takes the first
message after the command for the reply and fails the negotiation; our
:class:`~spice_libvirt.qemu.qmp.NegotiatingClient` hands such events to the listeners.

One firmware QEMU; a thread keeps an embedded SPICE client connecting and leaving (each
session raises SPICE_CONNECTED, SPICE_INITIALIZED and SPICE_DISCONNECTED per channel). Each
round opens three QMP sessions in turn, in a shuffled order so load changes hit them alike:

* ``raw``: a plain socket, greeting read, ``qmp_capabilities`` sent; the first message
  after it is recorded (``return`` or the event's name) -- what QEMU does, no library. The
  session is closed only after the reply came: QEMU writes a reply still in flight to the
  *next* client of the socket, before its greeting;
* ``qemu.qmp``: ``QMPClient.connect`` once, no retry: ok or the error;
* ``ours``: ``NegotiatingClient.connect`` once, no retry: ok or the error.

Raw rows: ``benchmarks/results/qmp-negotiation.jsonl`` (with the load and the commit).

    .venv/bin/python benchmarks/bench_qmp_negotiation.py --rounds 1000
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from qemu.qmp import QMPClient

from benchmarks.bench_libvirt_rtt import _commit
from benchmarks.benchutil import Machine, arg_parser, finish, machine
from spice_libvirt.qemu.qmp import NegotiatingClient
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt_lab.qemu_process import QemuGroup

METHODS = ("raw", "qemu.qmp", "ours")


def _messages(sock: socket.socket) -> Iterator[dict[str, Any]]:
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed the connection")
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line)


def raw_first_message(path: Path) -> str:
    """``return``, or the name of the event QEMU sent before its reply."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        messages = _messages(sock)
        next(messages)  # the greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        first = reply = next(messages)
        while "event" in reply:  # the reply is still to come: leave no reply in flight
            reply = next(messages)
    return "return" if "return" in first else f"event {first.get('event', first)}"


async def library_connect(client: QMPClient, path: Path) -> str:
    try:
        await asyncio.wait_for(client.connect(str(path)), 10)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    await client.disconnect()
    return "ok"


def churn(port: int, stop: threading.Event, sessions: list[int]) -> None:
    """An embedded SPICE client connecting and leaving until ``stop``."""

    async def loop() -> None:
        while not stop.is_set():
            client = SpiceClient(ClientOptions(host="127.0.0.1", port=port, stream_port_name=None))
            try:
                await client.connect(timeout=10)
            finally:
                await client.close()
            sessions[0] += 1

    asyncio.run(loop())


class Summary(BaseModel):
    benchmark: str = "qmp-negotiation"
    machine: Machine
    commit: str | None
    rounds: int
    spice_sessions: int
    #: method -> result -> count (raw: the first message after qmp_capabilities)
    results: dict[str, dict[str, int]]


async def run(rounds: int) -> tuple[Summary, list[dict[str, Any]]]:
    workdir = Path(tempfile.mkdtemp(prefix="slb-qmp-"))
    rows: list[dict[str, Any]] = []
    commit = _commit()
    try:
        async with QemuGroup(workdir) as vms:
            vm = await vms.start(name="negotiate", guest="firmware")
            stop, sessions = threading.Event(), [0]
            churner = threading.Thread(target=churn, args=(vm.spice_port, stop, sessions))
            churner.start()
            try:
                for i in range(rounds):
                    order = list(METHODS)
                    random.shuffle(order)
                    load = round(os.getloadavg()[0], 2)
                    for method in order:
                        if method == "raw":
                            result = await asyncio.to_thread(raw_first_message, vm.qmp_path)
                        elif method == "qemu.qmp":
                            result = await library_connect(QMPClient("bench"), vm.qmp_path)
                        else:
                            result = await library_connect(NegotiatingClient("bench"), vm.qmp_path)
                        rows.append(
                            {"round": i, "method": method, "result": result, "load_1m": load}
                            | {"commit": commit}
                        )
            finally:
                stop.set()
                await asyncio.to_thread(churner.join, 30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Counter[str]] = {m: Counter() for m in METHODS}
    for row in rows:
        results[row["method"]][row["result"]] += 1
    summary = Summary(
        machine=machine(tools=["qemu"]),
        commit=commit,
        rounds=rounds,
        spice_sessions=sessions[0],
        results={m: dict(c) for m, c in results.items()},
    )
    return summary, rows


def markdown(s: Summary) -> str:
    lines = [
        f"QMP negotiation at {s.commit}, {s.rounds} rounds, {s.spice_sessions} SPICE sessions "
        f"meanwhile, load {s.machine.load_avg_1m} at the end",
        "",
        "| session | result | count |",
        "|---|---|---|",
    ]
    for method, counts in s.results.items():
        for result, count in sorted(counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {method} | {result} | {count} |")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the QEMU is stopped on the way out, as on ^C


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=300, help="sessions of each kind")
    args = parser.parse_args(argv)
    try:
        summary, rows = asyncio.run(run(args.rounds))
    except KeyboardInterrupt:
        print("interrupted: the QEMU was stopped, nothing saved", file=sys.stderr)
        return 130
    return finish("qmp-negotiation", summary, args, markdown, rows=("qmp-negotiation", rows))


if __name__ == "__main__":
    sys.exit(main())
