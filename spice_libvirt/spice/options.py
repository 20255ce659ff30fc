"""What a :class:`~spice_libvirt.spice.client.SpiceClient` is given and what it hands out:
its options, its events and the byte streams of port channels."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from spice_libvirt.spice.constants import ChannelType, MainCap
from spice_libvirt.spice.messages import DisplayInit

#: channels on which spice-server always sends a first message once the channel client
#: exists (SET_ACK, INPUTS_INIT, PORT_INIT)
GREETING_CHANNELS = frozenset(
    {
        ChannelType.DISPLAY,
        ChannelType.CURSOR,
        ChannelType.INPUTS,
        ChannelType.PORT,
        ChannelType.WEBDAV,
    }
)

#: how long close() waits for the client's tasks to end
CLOSE_TIMEOUT = 3.0

#: spice-server's own window for a client's answer to MIGRATE_BEGIN(_SEAMLESS): after
#: MIGRATE_TIMEOUT (10 s in reds) it stops waiting and the client can no longer follow
#: seamlessly. The client's pre-links must settle -- CONNECTED or CONNECT_ERROR sent --
#: well inside it, one-way delay and scheduling included.
SERVER_MIGRATE_WINDOW = 10.0

#: What all of a session's channels together may hold of messages not received in full
#: (bytes). A real server has one large message in flight at a time; a hostile one that
#: starts a near-maximal message on every channel is refused once the sum passes this,
#: so the client's memory is bounded per session, not per channel.
RECEIVE_BUDGET = 20 * 1024 * 1024

#: spice-gtk's display cache announcement (ids 1, 20 MiB of pixels, 16 MiB GLZ window).
DISPLAY_INIT = DisplayInit(1, 20 * 1024 * 1024 // 4, 1, 16 * 1024 * 1024 // 4)


class ClientOptions(BaseModel):
    """Where and how to connect, and which capabilities to announce.

    The capability switches exist so that tests can act as old clients (no SEAMLESS, no
    SEMI_SEAMLESS) and check that spice-server's fallback is reported truthfully.
    """

    model_config = ConfigDict(frozen=True)

    host: str
    port: int | None = None
    tls_port: int | None = None
    ticket: SecretStr | None = None
    ca_file: Path | None = None
    host_subject: str | None = None
    #: check record continuity on the port channel of this name (None: no stream check)
    stream_port_name: str | None = "org.spice-libvirt.stream"
    #: open (send PORT_EVENT OPENED on) every port channel, not only the stream port
    open_all_ports: bool = False
    seamless: bool = True
    semi_seamless: bool = True
    agent_connected_tokens: bool = True
    name_and_uuid: bool = True
    #: one channel's link (TCP, TLS, handshake) must be done within this
    link_timeout: float = Field(default=8.0, gt=0)
    #: a whole session (MAIN, INIT, channel list, every channel) must be up within this, at
    #: connect and at a switch-host relink: a server that keeps the client waiting longer
    #: counts as not answering (None: ``link_timeout``)
    connect_timeout: float | None = Field(default=None, gt=0)
    #: from MIGRATE_BEGIN(_SEAMLESS) to the client's answer to the source (every pre-link
    #: and the destination's ACK/NACK), inside spice-server's :data:`SERVER_MIGRATE_WINDOW`
    migrate_connect_timeout: float = Field(default=8.0, gt=0, lt=SERVER_MIGRATE_WINDOW)
    #: see :data:`RECEIVE_BUDGET`
    receive_budget: int = Field(default=RECEIVE_BUDGET, gt=0)
    #: limit the channels linked after MAIN (None: every channel the server lists)
    channel_types: frozenset[int] | None = None

    def main_caps(self) -> frozenset[int]:
        caps = set()
        if self.semi_seamless:
            caps.add(MainCap.SEMI_SEAMLESS_MIGRATE)
        if self.name_and_uuid:
            caps.add(MainCap.NAME_AND_UUID)
        if self.agent_connected_tokens:
            caps.add(MainCap.AGENT_CONNECTED_TOKENS)
        if self.seamless:
            caps.add(MainCap.SEAMLESS_MIGRATE)
        return frozenset(caps)

    @property
    def session_timeout(self) -> float:
        """The deadline of a whole session set-up (see ``connect_timeout``)."""
        return self.connect_timeout or self.link_timeout

    def password(self) -> str | None:
        return self.ticket.get_secret_value() if self.ticket else None

    @property
    def tls_configured(self) -> bool:
        """A CA file or a tls-port was given: every link and relink of the session uses TLS,
        and the plain port is never tried first (a downgrade an on-path attacker could force
        by refusing the TLS port)."""
        return self.ca_file is not None or self.tls_port is not None


@dataclass(frozen=True)
class ClientEvent:
    """Something the client saw or did, for :meth:`SpiceClient.events` subscribers."""

    kind: str
    channel: str = ""
    detail: str = ""
    at: float = field(default_factory=time.monotonic)


#: what a port stream keeps for a reader that does not keep up (or never reads): beyond
#: either bound the oldest chunks are dropped, so a guest (or a hostile server) streaming
#: into an unread port cannot grow the client without bound
PORT_QUEUE_BYTES = 16 * 1024 * 1024
PORT_QUEUE_CHUNKS = 4096


class PortStream:
    """The byte stream of one port channel, as an async iterator of chunks.

    Bounded in bytes and in chunks; what does not fit drops the oldest chunks (counted in
    :attr:`dropped`), keeping the newest data flowing rather than stalling the channel.
    """

    def __init__(
        self,
        name: str,
        *,
        max_bytes: int = PORT_QUEUE_BYTES,
        max_chunks: int = PORT_QUEUE_CHUNKS,
    ) -> None:
        self.name = name
        self.opened = asyncio.Event()
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._ready = asyncio.Event()
        self.dropped = 0
        #: someone asked for this stream (``SpiceClient.port_stream``): only then is its data
        #: kept, so a server with many ports cannot make the client queue for each of them
        self.wanted = False

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._size

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while len(self._chunks) > 1 and (
            self._size > self.max_bytes or len(self._chunks) > self.max_chunks
        ):
            self._size -= len(self._chunks.popleft())
            self.dropped += 1
        self._ready.set()

    async def _get(self) -> bytes:
        while not self._chunks:
            self._ready.clear()
            await self._ready.wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        return data

    async def read(self, timeout: float | None = None) -> bytes:
        async with asyncio.timeout(timeout):
            return await self._get()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            yield await self._get()
