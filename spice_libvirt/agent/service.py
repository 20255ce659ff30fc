"""The host agent: watch the local libvirtd, hold every outgoing migration with SPICE clients.

One asyncio service per host (``spice-libvirt agent run``, a systemd unit on hypervisors).
It never blocks libvirt -- libvirt's callbacks only queue events, every call runs bounded
in a worker thread -- and it is never worse than no agent:

* it starts by undoing what a previous agent left (holds written down in its state
  directory): the caller's speed and downtime come back, the migration completes;
* a libvirtd that restarts closes the connection: the agent reconnects (with backoff) and
  undoes again whatever it could not release meanwhile;
* a destination it cannot reach, or a client that never links, ends in a release within
  the bound; SIGTERM releases every hold before the agent exits.

What it saw is counted for Prometheus (:mod:`spice_libvirt.agent.metrics`) unless
``metrics = false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import functools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential

from spice_libvirt import errors
from spice_libvirt.agent import holdfile
from spice_libvirt.agent.hold import MigrationHold
from spice_libvirt.agent.metrics import AgentMetrics, MetricsServer
from spice_libvirt.agent.plan import Release
from spice_libvirt.agent.record import (
    AgentStatus,
    AgentVerdict,
    journal_verdict,
    syslog_verdict,
    write_status,
)
from spice_libvirt.agent.settings import AgentSettings
from spice_libvirt.agent.watch import Destination, on_close, pump_source_events
from spice_libvirt.files import PRIVATE_FILE, open_file
from spice_libvirt.libvirt.claim import ClaimClock
from spice_libvirt.libvirt.connection import Connection, GraphicsEvent, MigrationEvent
from spice_libvirt.libvirt.hold import FINAL_STATES
from spice_libvirt.libvirt.real_clients import SourceChannels

log = logging.getLogger(__name__)

#: QEMU statuses that start a hold (``active`` too: an agent that came up a moment late)
START_STATUSES = ("setup", "active")
#: how long the service waits for its holds to release on the way out
STOP_GRACE_S = 10.0
#: How long a configured peer may take to open from the background (an ssh handshake between
#: busy hosts takes seconds; a hold cannot wait that long, the subscription at start can).
PEER_OPEN_TIMEOUT_S = 30.0
#: A configured peer that could not be opened is tried again after this, doubling up to
#: PEER_RETRY_MAX_S while it stays unreachable (a warning per try, not a flood).
PEER_RETRY_S = 5.0
PEER_RETRY_MAX_S = 300.0


def _addresses(uri: str) -> set[str]:
    host = urlsplit(uri).hostname
    if not host:
        return set()
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


class Agent:
    """The service. :meth:`run` until ``stop`` is set."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.local: Connection | None = None
        self.holds: dict[str, MigrationHold] = {}
        self.tasks: set[asyncio.Task[AgentVerdict]] = set()
        self.destinations: dict[str, Destination] = {}
        self.status = AgentStatus(
            pid=os.getpid(),
            started_at=dt.datetime.now(dt.UTC).isoformat(),
            connect=settings.connect,
        )
        self._recent: deque[AgentVerdict] = deque(maxlen=20)
        self.claims = ClaimClock()
        #: which connections to local SPICE ports linked a channel (renewed per connection)
        self.sources = SourceChannels()
        self.metrics = AgentMetrics()
        #: domains whose current migration has its verdict: QEMU's later ``active`` must
        #: not start a second hold (and a second verdict) for a migration skipped at ``setup``
        self._judged: set[str] = set()
        #: problems that last as long as the agent (a metrics address it could not bind)
        self._standing_problems: list[str] = []

    # ------------------------------------------------------------ destinations

    def _uri_for(self, peer: str) -> str:
        for uri in self.settings.peers:
            if peer in _addresses(uri):
                return uri
        host = f"[{peer}]" if ":" in peer else peer
        return self.settings.destination_uri.format(peer=host)

    async def destination(self, peer: str, timeout: float | None = None) -> Destination | None:
        """The subscribed destination libvirtd at ``peer`` (opened on first use, then kept).
        ``timeout``: how long opening may take; by default what a hold can afford."""
        uri = self._uri_for(peer)
        dest = self.destinations.get(uri)
        if dest is not None and dest.alive:
            return dest
        if dest is not None:  # dropped: forgotten before another is opened
            del self.destinations[uri]
            await dest.close()
        if timeout is None:
            timeout = min(5.0, self.settings.hold_timeout_s / 3)
        try:
            opened = await Destination.open(uri, timeout)
        except errors.LibvirtError as exc:
            log.warning("agent: destination %s: %s", uri, exc)
            return None
        current = self.destinations.get(uri)
        if current is not None and current.alive:  # opened meanwhile (a hold, the peers' task)
            await opened.close()
            return current
        if current is not None:
            await current.close()
        self.destinations[uri] = opened
        self._publish()
        return opened

    async def known(self) -> list[Destination]:
        """Every destination watched now (the configured peers, once subscribed)."""
        return [d for d in self.destinations.values() if d.alive]

    async def _subscribe_peers(self) -> None:
        """Keep every configured peer subscribed: a peer that cannot be opened at start (it
        reboots, its ssh handshake is slower than a hold may wait) or whose connection drops
        is tried again, with :data:`PEER_OPEN_TIMEOUT_S` and a growing pause, until the agent
        stops; a hold never waits on this (it opens what it needs itself)."""
        pause = PEER_RETRY_S
        while True:
            missing = 0
            for uri in self.settings.peers:
                for address in sorted(_addresses(uri))[:1]:
                    if await self.destination(address, timeout=PEER_OPEN_TIMEOUT_S) is None:
                        missing += 1
            pause = min(pause * 2, PEER_RETRY_MAX_S) if missing else PEER_RETRY_S
            await asyncio.sleep(pause)

    # ------------------------------------------------------------ recovery

    async def recover(self, local: Connection) -> None:
        """Undo the holds a previous agent (or this one, before libvirtd restarted) left."""
        records, problems = holdfile.pending(self.settings.state_dir)
        self.status.problems = [*self._standing_problems, *problems]
        for record in records:
            if record.uuid in {h.uuid for h in self.holds.values()}:
                continue
            note = await self._restore(local, record)
            verdict = AgentVerdict(
                domain=record.domain,
                uuid=record.uuid,
                outcome="error",
                held_by="agent",
                release="recovered",
                released_why=f"recovered after the agent lost its hold: {note}",
                caller_restored={
                    "speed_mibs": record.speed_mibs,
                    "downtime_ms": record.downtime_ms,
                },
            )
            self._finish(verdict)

    async def _restore(self, local: Connection, record: holdfile.HoldRecord) -> str:
        try:
            dom = await local.lookup(record.uuid)
            active = bool(await local.call(dom.isActive, "domain state"))
        except errors.LibvirtError:
            holdfile.remove(self.settings.state_dir, record.uuid)
            return "the domain is no longer on this host (nothing to restore)"
        if not active:  # migrated away (still defined here) or stopped: nothing is held
            holdfile.remove(self.settings.state_dir, record.uuid)
            return "the domain no longer runs on this host (nothing to restore)"
        try:
            await local.call(lambda: dom.migrateSetMaxSpeed(record.speed_mibs, 0), "restore speed")
            await local.call(
                lambda: dom.migrateSetMaxDowntime(record.downtime_ms, 0), "restore downtime"
            )
        except errors.LibvirtError as exc:
            return f"could not restore yet: {exc}"
        holdfile.remove(self.settings.state_dir, record.uuid)
        return "the caller's speed and downtime restored"

    # ------------------------------------------------------------ holds

    def _on_migration(self, local: Connection, event: MigrationEvent) -> None:
        hold = self.holds.get(event.domain)
        if hold is not None:
            hold.status(event.status, event.at)
            return
        if event.status == "setup" or event.status in FINAL_STATES:
            self._judged.discard(event.domain)  # a new migration, or this one's end
        elif event.domain in self._judged:
            return  # this migration has its verdict already (skipped, no client...)
        if event.status not in START_STATUSES:
            return
        hold = MigrationHold(
            self.settings,
            local,
            event.domain,
            event.at,
            self.destination,
            self.claims,
            self.sources,
            self.known,
        )
        self.holds[event.domain] = hold
        task = asyncio.create_task(hold.run(), name=f"hold {event.domain}")
        self.tasks.add(task)
        task.add_done_callback(functools.partial(self._done, hold))
        self._publish()

    def _source_event(self, event: GraphicsEvent) -> None:
        """A graphics event of the local libvirtd, to the hold of its domain."""
        hold = self.holds.get(event.domain)
        if hold is not None:
            hold.source_event(event)

    def _done(self, hold: MigrationHold, task: asyncio.Task[AgentVerdict]) -> None:
        self.tasks.discard(task)
        self._judged.add(hold.domain)
        if self.holds.get(hold.domain) is hold:
            del self.holds[hold.domain]
        if task.cancelled():
            return
        exc = task.exception()
        verdict = task.result() if exc is None else hold.verdict
        if exc is not None:
            verdict.notes.append(f"agent error: {exc!r}")
        self._finish(verdict)

    def _finish(self, verdict: AgentVerdict) -> None:
        # an incoming migration is not ours to judge: no record, no line
        if verdict.outcome == "skipped" and not verdict.released_why:
            self._publish()
            return
        self.status.seen += 1
        self._recent.append(verdict)
        self.metrics.verdict(verdict)
        log.info("%s", verdict.line())
        journal_verdict(self.settings.journal_path, verdict)
        syslog_verdict(self.settings.syslog_socket, verdict)
        self._publish()

    def _publish(self) -> None:
        self.status.connected = self.local is not None
        self.status.holding = sorted(h.domain for h in self.holds.values() if h.plan is not None)
        self.status.destinations = sorted(u for u, d in self.destinations.items() if d.alive)
        self.status.recent = list(self._recent)
        self.metrics.state(connected=self.status.connected, holds=len(self.status.holding))
        write_status(self.settings.state_dir, self.status)

    async def release_all(self, reason: str) -> None:
        """Release every hold now (the agent stops); bounded."""
        holds = list(self.holds.values())
        release = Release("stopping", reason)
        for hold in holds:
            if hold.plan is not None:
                hold.plan.force_release(release)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STOP_GRACE_S):
                for hold in holds:
                    with contextlib.suppress(errors.SpiceLibvirtError):
                        await hold.release(release)

    # ------------------------------------------------------------ the loop

    async def _connect(self) -> Connection:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(errors.LibvirtError),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            stop=stop_never,
            reraise=True,
        ):
            with attempt:
                return await Connection.open(self.settings.connect, timeout=10.0, call_timeout=10.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _serve(self, local: Connection, stop: asyncio.Event) -> None:
        # the graphics events first: a connection accepted after this is reported, so one
        # the agent never heard of predates it and the kernel decides (see SourceChannels)
        self.sources = SourceChannels()
        source_events = asyncio.create_task(
            pump_source_events(await local.graphics_events(), self.sources, self._source_event),
            name="local graphics events",
        )
        events = await local.migration_events()
        closed = on_close(local)
        await self.recover(local)
        peers = asyncio.create_task(self._subscribe_peers(), name="subscribe peers")
        log.info("agent: watching %s", self.settings.connect)
        ended = asyncio.ensure_future(_first(closed.wait(), stop.wait()))
        try:
            while not ended.done():
                getter = asyncio.ensure_future(events.get(timeout=1.0))
                await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done() and not getter.cancelled() and getter.exception() is None:
                    self._on_migration(local, getter.result())
                else:
                    getter.cancel()
        finally:
            ended.cancel()
            peers.cancel()
            source_events.cancel()
            events.close()

    def _abandon(self) -> None:
        """The connection is gone: the holds cannot act on it. Their records stay and
        :meth:`recover` restores them once libvirtd answers again."""
        for task in list(self.tasks):
            task.cancel()
        self.holds.clear()
        self._judged.clear()

    async def run(self, stop: asyncio.Event) -> None:
        holdfile.ensure_dir(self.settings.state_dir)
        with single_instance(self.settings.state_dir), self._serve_metrics():
            await self._run(stop)

    @contextlib.contextmanager
    def _serve_metrics(self) -> Iterator[None]:
        if not self.settings.metrics:
            yield
            return
        try:
            server = MetricsServer(self.metrics.registry, self.settings.metrics_address)
        except errors.AgentError as exc:
            # holding matters more than counting: run on, say it (Prometheus sees the
            # target down, ``agent status`` shows the problem)
            log.error("agent: %s; running without metrics", exc)
            self._standing_problems.append(str(exc))
            self.status.problems = list(self._standing_problems)
            yield
            return
        self.status.metrics_address = server.address
        log.info("agent: metrics on http://%s/metrics", server.address)
        try:
            yield
        finally:
            server.stop()

    async def _run(self, stop: asyncio.Event) -> None:
        self._publish()
        connections = 0
        try:
            while not stop.is_set():
                local = await self._connect()
                connections += 1
                if connections > 1:
                    self.metrics.reconnected()
                self.local = local
                self._publish()
                try:
                    await self._serve(local, stop)
                finally:
                    if stop.is_set():
                        await self.release_all("the agent is stopping")
                    else:
                        self._abandon()
                    self.local = None
                    self._publish()
                    await local.close()
                if not stop.is_set():
                    log.warning("agent: lost %s; reconnecting", self.settings.connect)
                    await asyncio.sleep(0.5)
        finally:
            for task in list(self.tasks):
                task.cancel()
            for dest in list(self.destinations.values()):
                await dest.close()
            self.destinations.clear()
            self.status.holding = []
            self._publish()


@contextlib.contextmanager
def single_instance(state_dir: Path) -> Iterator[None]:
    """One agent per state directory: two agents holding one migration would each take
    the other's hold for the caller's values and leave the migration at 1 MiB/s."""
    path = state_dir / "agent.lock"
    fd = open_file(path, PRIVATE_FILE, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.AgentError(f"another agent runs with {state_dir} (lock {path})") from None
        yield
    finally:
        os.close(fd)


async def _first(*aws: Coroutine[Any, Any, Any]) -> None:
    """Return when the first of ``aws`` does; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM (systemd) and SIGINT set ``stop``: holds are released, then the agent exits."""
    import signal

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


async def serve(settings: AgentSettings) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    started = time.monotonic()
    await Agent(settings).run(stop)
    log.info("agent: stopped after %.0f s", time.monotonic() - started)
