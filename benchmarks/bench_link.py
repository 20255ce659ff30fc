"""Time to link a full SPICE session: our embedded client vs remote-viewer (spice-gtk).

Why: the controller holds ``migrate`` until the client has linked every channel to the
destination, so the client's link time is added to every seamless migration. Ours must
stay close to the reference client's (goal: median within 1.5x of spice-gtk's).

One firmware QEMU (KVM when usable) and one Xvfb are started for the whole run; then, for
``--rounds`` rounds, our client and remote-viewer connect alternately to the same QEMU.
The clock is the QEMU's: the QMP events ``SPICE_CONNECTED`` (TCP accepted) and
``SPICE_INITIALIZED`` (channel linked) carry QEMU's wall-clock timestamps, compared with
``time.time()`` taken just before ``connect()`` / the process spawn. So neither client's own
event loop delays its measurement. Per round and client:

* ``total``: start -> the ``SPICE_INITIALIZED`` of the last of the 5 channels;
* ``first_event``: start -> the first ``SPICE_CONNECTED`` (remote-viewer: process start-up);
* ``link``: first ``SPICE_CONNECTED`` -> last ``SPICE_INITIALIZED`` (protocol work only).

Each client is disconnected fully (ours: ``close()``; remote-viewer: SIGTERM by PID), and
the next round starts only after every ``SPICE_DISCONNECTED`` arrived and ``query-spice``
lists no channel.

Run: ``.venv/bin/python benchmarks/bench_link.py [--rounds N] [--json]``.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from benchmarks.benchutil import (
    Distribution,
    Machine,
    arg_parser,
    distribution,
    finish,
    fmt,
    machine,
)
from spice_libvirt.migration.report import channel_name
from spice_libvirt.qemu.qmp import EventStream, QMPConnection, QMPEvent
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt_lab.qemu_process import QemuGroup, QemuInstance
from tests.rigs.viewer import RemoteViewer, missing_tools, start_viewer, xvfb

EXPECTED_CHANNELS = 5  # main, display, inputs, cursor, port
SPICE_EVENTS = ("SPICE_CONNECTED", "SPICE_INITIALIZED", "SPICE_DISCONNECTED")
GOAL_RATIO = 1.5
ClientKind = Literal["ours", "remote-viewer"]


class SpiceEventLog:
    """Every SPICE event of one QEMU, read in the background for the whole run."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.events: list[QMPEvent] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        while True:
            event = await self.stream.get(timeout=None)
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SpiceEventLog]:
        self._task = asyncio.create_task(self._pump(), name="spice-event-log")
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def wait(
        self,
        since: int,
        predicate: Callable[[list[QMPEvent]], bool],
        timeout: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> list[QMPEvent]:
        """Events since index ``since`` once ``predicate`` holds for them."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not predicate(self.events[since:]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"SPICE events not as expected within {timeout:g} s")
                if not alive():
                    raise RuntimeError("the client process exited before linking")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 0.2)):
                        await self._changed.wait()
            return self.events[since:]


def _initialized(events: list[QMPEvent]) -> dict[str, QMPEvent]:
    """channel name -> its first SPICE_INITIALIZED among ``events``."""
    out: dict[str, QMPEvent] = {}
    for ev in events:
        if ev.name == "SPICE_INITIALIZED":
            client = ev.data.get("client", {})
            name = channel_name(
                int(client.get("channel-type", 0)), int(client.get("channel-id", 0))
            )
            out.setdefault(name, ev)
    return out


def _count(events: list[QMPEvent], name: str) -> int:
    return sum(1 for ev in events if ev.name == name)


def _all_linked(events: list[QMPEvent]) -> bool:
    return len(_initialized(events)) >= EXPECTED_CHANNELS


def _all_gone(events: list[QMPEvent]) -> bool:
    return _count(events, "SPICE_DISCONNECTED") >= _count(events, "SPICE_CONNECTED")


class LinkRound(BaseModel):
    round: int
    client: ClientKind
    total_ms: float
    first_event_ms: float
    link_ms: float
    channels: list[str]
    connection_id: int | None = None


async def _no_channels(qmp: QMPConnection, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = await qmp.execute("query-spice")
        if not info.get("channels"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"query-spice still lists {len(info['channels'])} channels")
        await asyncio.sleep(0.05)


def _round_result(
    number: int, kind: ClientKind, started: float, events: list[QMPEvent]
) -> LinkRound:
    linked = _initialized(events)
    first = min(ev.timestamp for ev in events if ev.name == "SPICE_CONNECTED")
    last = max(ev.timestamp for ev in linked.values())
    ids = {ev.data.get("client", {}).get("connection-id") for ev in linked.values()}
    return LinkRound(
        round=number,
        client=kind,
        total_ms=round((last - started) * 1000, 3),
        first_event_ms=round((first - started) * 1000, 3),
        link_ms=round((last - first) * 1000, 3),
        channels=sorted(linked),
        connection_id=ids.pop() if len(ids) == 1 else None,
    )


async def round_ours(
    number: int, vm: QemuInstance, log: SpiceEventLog, qmp: QMPConnection
) -> LinkRound:
    mark = len(log.events)
    client = SpiceClient(ClientOptions(host="127.0.0.1", port=vm.spice_port))
    started = time.time()
    try:
        await client.connect(timeout=15)
        events = await log.wait(mark, _all_linked, timeout=15)
    finally:
        await client.close()
    result = _round_result(number, "ours", started, events)
    await log.wait(mark, _all_gone, timeout=15)
    await _no_channels(qmp)
    return result


async def round_viewer(
    number: int,
    vm: QemuInstance,
    log: SpiceEventLog,
    qmp: QMPConnection,
    display: str,
    workdir: Path,
) -> LinkRound:
    mark = len(log.events)
    viewer: RemoteViewer = start_viewer(
        f"spice://127.0.0.1:{vm.spice_port}", display, workdir, name=f"rv-{number}", debug=False
    )
    try:
        try:
            events = await log.wait(mark, _all_linked, timeout=30, alive=viewer.alive)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(
                f"remote-viewer round {number}: {exc}\n{viewer.log_text()[-1500:]}"
            ) from exc
        result = _round_result(number, "remote-viewer", viewer.started, events)
    finally:
        await asyncio.to_thread(viewer.stop)
    await log.wait(mark, _all_gone, timeout=15)
    await _no_channels(qmp)
    return result


class ClientSummary(BaseModel):
    total_ms: Distribution
    first_event_ms: Distribution
    link_ms: Distribution


class LinkSummary(BaseModel):
    benchmark: str = "link"
    machine: Machine
    accel: str
    rounds: int
    ours: ClientSummary
    remote_viewer: ClientSummary
    ratio_total_median: float | None
    ratio_link_median: float | None
    goal_ratio: float = GOAL_RATIO
    goal_met: bool
    notes: list[str] = []
    samples: list[LinkRound] = []


def _summarise(rows: list[LinkRound]) -> ClientSummary:
    return ClientSummary(
        total_ms=distribution([r.total_ms for r in rows]),
        first_event_ms=distribution([r.first_event_ms for r in rows]),
        link_ms=distribution([r.link_ms for r in rows]),
    )


async def run(rounds: int, keep: bool) -> LinkSummary:
    workdir = Path(tempfile.mkdtemp(prefix="slb-link-"))
    rows: list[LinkRound] = []
    try:
        with xvfb(workdir) as xserver:
            async with QemuGroup(workdir) as vms:
                vm = await vms.start(name="linkbench", guest="firmware")
                async with (
                    QMPConnection.open(vm.qmp_path, name="bench") as qmp,
                    qmp.events(SPICE_EVENTS) as stream,
                    SpiceEventLog(stream).running() as log,
                ):
                    # one unmeasured warm-up of each: page cache, spice-gtk's first GTK start
                    await round_ours(0, vm, log, qmp)
                    await round_viewer(0, vm, log, qmp, xserver.display, workdir)
                    for number in range(1, rounds + 1):
                        rows.append(await round_ours(number, vm, log, qmp))
                        rows.append(
                            await round_viewer(number, vm, log, qmp, xserver.display, workdir)
                        )
                accel = vm.accel
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ours = _summarise([r for r in rows if r.client == "ours"])
    rv = _summarise([r for r in rows if r.client == "remote-viewer"])

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    ratio_total = ratio(ours.total_ms.median, rv.total_ms.median)
    notes = []
    bad = [r for r in rows if len(r.channels) != EXPECTED_CHANNELS]
    if bad:
        notes.append(f"{len(bad)} rounds linked an unexpected channel set: {bad[0].channels}")
    return LinkSummary(
        machine=machine(tools=("qemu", "remote-viewer")),
        accel=accel,
        rounds=rounds,
        ours=ours,
        remote_viewer=rv,
        ratio_total_median=ratio_total,
        ratio_link_median=ratio(ours.link_ms.median, rv.link_ms.median),
        goal_met=ratio_total is not None and ratio_total <= GOAL_RATIO,
        notes=notes,
        samples=rows,
    )


def markdown(s: LinkSummary) -> str:
    m = s.machine
    head = (
        f"{s.rounds} rounds each, alternating, one firmware QEMU ({s.accel}); "
        f"{m.cpus} cores, Python {m.python}; {m.versions.get('qemu', '')}; "
        f"spice-server {m.versions.get('spice-server', '?')}; "
        f"{m.versions.get('remote-viewer', '')} (spice-gtk {m.versions.get('spice-gtk', '?')})."
    )
    lines = [
        head,
        "",
        "| client | total median | total p90 | start->first event median | link median | link p90 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, c in (("ours (embedded)", s.ours), ("remote-viewer", s.remote_viewer)):
        lines.append(
            f"| {label} | {fmt(c.total_ms.median, ' ms')} | {fmt(c.total_ms.p90, ' ms')}"
            f" | {fmt(c.first_event_ms.median, ' ms')} | {fmt(c.link_ms.median, ' ms')}"
            f" | {fmt(c.link_ms.p90, ' ms')} |"
        )
    lines += [
        "",
        f"Ratio ours/remote-viewer (median): total {s.ratio_total_median},"
        f" link only {s.ratio_link_median}; goal <= {s.goal_ratio}:"
        f" {'met' if s.goal_met else 'MISSED'}.",
    ]
    lines += [f"Note: {n}" for n in s.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="rounds per client (>= 10)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install xvfb virt-viewer)")
        return 2
    summary = asyncio.run(run(args.rounds, args.keep))
    rows = [r.model_dump() for r in summary.samples]
    return finish("link", summary, args, markdown, rows=("link-rounds", rows))


if __name__ == "__main__":
    raise SystemExit(main())
