"""Our embedded SPICE client as a migration witness, running where the client really is.

In the lab the client's traffic must leave from namespace C (behind the delaying bridge),
while the controller talks to the libvirtds from the root namespace. So the client gets its
own asyncio loop in a thread that lives in C (every socket it opens is then C's), and this
adapter exposes it to the controller's loop with the
:class:`~spice_libvirt.migration.witness.MigrationWitness` shape. How the thread enters its place
is a parameter (``enter``): :class:`ThreadedWitness` itself knows nothing of namespaces;
:func:`netns_witness` is the lab's network-namespace flavour. It also measures its own one-way
delay to the source (half a TCP connect), which the controller adds to the moment the
client answered the source -- the client *knows* when it sent MIGRATE_CONNECTED_SEAMLESS.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from spice_libvirt.errors import ConnectError
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt.spice.record import ClientMigrationRecord, StreamStats
from spice_libvirt_lab import netns

T = TypeVar("T")

#: Runs the witness thread's loop somewhere: ``enter(run_loop)`` returns when the loop stops.
Enter = Callable[[Callable[[], None]], None]


class ThreadedWitness:
    """A :class:`SpiceClient` on a private loop in its own thread; ``enter`` puts the thread
    where the client is (e.g. :func:`netns_witness` for a network namespace)."""

    def __init__(self, options: ClientOptions, *, enter: Enter | None = None) -> None:
        self.options = options
        self._enter = enter
        self.client = SpiceClient(options)
        self.rtt_ms: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle --------------------------------------------------------------------

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _thread_main(self) -> None:
        if self._enter is None:
            self._run_loop()
        else:
            self._enter(self._run_loop)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def start(self, timeout: float = 20.0) -> None:
        """Start the loop, measure the RTT to the server, link every channel."""
        self._thread = threading.Thread(target=self._thread_main, name="witness", daemon=True)
        self._thread.start()
        if not await asyncio.to_thread(self._ready.wait, 5.0):
            raise ConnectError("embedded client loop did not start")
        port = self.options.port or self.options.tls_port
        assert port is not None
        self.rtt_ms = await asyncio.wrap_future(self._submit(self._measure(port)))
        try:
            await asyncio.wrap_future(self._submit(self.client.connect(timeout)))
        except BaseException:
            await self.stop()
            raise

    async def _measure(self, port: int, samples: int = 3) -> float:
        """Median TCP connect time to the SPICE server (one round trip), in ms."""
        values: list[float] = []
        for _ in range(samples):
            t = time.perf_counter()
            try:
                _reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.options.host, port), 5.0
                )
            except (OSError, TimeoutError) as exc:
                raise ConnectError(f"{self.options.host}:{port} unreachable: {exc}", exc) from exc
            values.append((time.perf_counter() - t) * 1000.0)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        return round(statistics.median(values), 3)

    async def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(self._submit(self.client.close())), 10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        self._loop = None

    async def __aenter__(self) -> ThreadedWitness:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the MigrationWitness shape ---------------------------------------------------

    @property
    def session_id(self) -> int:
        return self.client.session_id

    @property
    def channels(self) -> list[str]:
        return list(self.client.channels)

    @property
    def migration_count(self) -> int:
        return self.client.migration_count

    @property
    def last_link_error(self) -> str | None:
        return self.client.last_link_error

    @property
    def one_way_ms(self) -> float:
        return (self.rtt_ms or 0.0) / 2.0

    async def wait_migration_connected(
        self, timeout: float, after: int | None = None
    ) -> float | None:
        return await asyncio.wrap_future(
            self._submit(self.client.wait_migration_connected(timeout, after))
        )

    async def next_migration(self, timeout: float) -> ClientMigrationRecord:
        return await asyncio.wrap_future(self._submit(self.client.next_migration(timeout)))

    def stream_stats(self) -> StreamStats:
        return self.client.stream_stats()


def netns_enter(name: str) -> Enter:
    """Run the witness loop inside network namespace ``name`` (every socket is then its)."""

    def enter(run_loop: Callable[[], None]) -> None:
        netns.call_in(name, run_loop, timeout=24 * 3600)

    return enter


def netns_witness(options: ClientOptions, netns_name: str) -> ThreadedWitness:
    """The embedded client as a witness from the lab's client namespace."""
    return ThreadedWitness(options, enter=netns_enter(netns_name))
