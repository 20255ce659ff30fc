"""asyncio transport for one SPICE channel connection: TCP or TLS, link, then messages.

This is the only place in :mod:`spice_libvirt.spice` that touches sockets; all protocol
decisions are made by :class:`~spice_libvirt.spice.connection.ClientChannelConnection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from spice_libvirt.errors import (
    ConnectError,
    LocalProtocolError,
    RemoteProtocolError,
    TLSVerificationError,
)
from spice_libvirt.spice.connection import (
    NEED_DATA,
    ClientChannelConnection,
    LinkEstablished,
    LinkReplyReceived,
    MessageReceived,
)
from spice_libvirt.spice.constants import channel_label
from spice_libvirt.spice.framing import ReceiveBudget
from spice_libvirt.spice.link import LinkMess
from spice_libvirt.spice.messages import Message, message_name

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
#: a send whose bytes do not move for this long means the server stopped reading
SEND_STALL_TIMEOUT = 5.0
SEND_STALL_STEP = 0.5

#: The kinds of certificate failure, in every TLSVerificationError's text as "failed
#: (<kind>)": a migration report can then say *why* the client would not link to a
#: destination, from the one line the client records.
TLS_SUBJECT_MISMATCH = "subject mismatch"
TLS_UNKNOWN_CA = "not signed by a trusted CA"
TLS_REJECTED = "certificate rejected"
#: OpenSSL verify codes meaning the chain does not end at a CA we were given:
#: 2 unable to get issuer certificate, 18 self-signed leaf, 19 self-signed in chain,
#: 20 unable to get local issuer certificate, 21 unable to verify the first certificate
_UNTRUSTED_CHAIN = frozenset({2, 18, 19, 20, 21})


def verification_failure(text: str | None) -> str | None:
    """The kind of certificate failure a client's recorded error names (None: not one)."""
    if not text or "TLS verification of" not in text:
        return None
    for kind in (TLS_SUBJECT_MISMATCH, TLS_UNKNOWN_CA, TLS_REJECTED):
        if f"failed ({kind})" in text:
            return kind
    return TLS_REJECTED


@dataclass(frozen=True)
class TLSSettings:
    """How to verify the server: a CA file, and either the host name or a cert subject."""

    ca_file: Path | None = None
    host_subject: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        if self.host_subject:
            # spice-gtk semantics: with a subject given, the subject is checked instead of
            # the host name (the cert of a migration target need not match its address).
            ctx.check_hostname = False
        return ctx


def parse_subject(subject: str) -> frozenset[tuple[str, str]]:
    """``"C=XX,O=Org,CN=host"`` → {("C","XX"), ...}; order and spacing do not matter."""
    pairs = set()
    for part in subject.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise LocalProtocolError(f"cert subject part {part!r} is not KEY=VALUE")
        pairs.add((key.strip().upper(), value.strip()))
    return frozenset(pairs)


_OID_SHORT = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "emailAddress": "EMAILADDRESS",
}


def _peer_subject(writer: asyncio.StreamWriter) -> frozenset[tuple[str, str]]:
    cert = writer.get_extra_info("peercert") or {}
    pairs = set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            pairs.add((_OID_SHORT.get(key, key).upper(), value))
    return frozenset(pairs)


@dataclass
class ChannelLink:
    """A linked channel socket: send and receive typed messages."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: ClientChannelConnection
    host: str
    port: int
    tls: bool
    common_caps: frozenset[int] = field(default_factory=frozenset)
    channel_caps: frozenset[int] = field(default_factory=frozenset)
    #: TCP (and TLS) connect time: about one round trip to the server
    connect_seconds: float = 0.0
    #: the session's bound on unfinished messages, shared by all its links (None: this
    #: connection's own ``max_body`` only)
    budget: ReceiveBudget | None = None

    @property
    def label(self) -> str:
        return channel_label(self.conn.link.channel_type, self.conn.link.channel_id)

    @property
    def where(self) -> str:
        """``display:0 (10.0.0.1:5900)``: which channel of which server, for error lines."""
        return f"{self.label} ({self.host}:{self.port})"

    async def read(self) -> MessageReceived:
        """The next message; raises ConnectError when the server closes the socket and
        RemoteProtocolError (naming the channel and server) when it breaks the protocol."""
        try:
            return await self._read()
        except RemoteProtocolError as exc:
            if type(exc) is not RemoteProtocolError:
                raise
            raise RemoteProtocolError(f"{self.where}: {exc}") from exc

    async def _read(self) -> MessageReceived:
        conn, budget = self.conn, self.budget
        while True:
            event = conn.next_event()
            if isinstance(event, MessageReceived):
                return event
            if event is not NEED_DATA:
                raise RemoteProtocolError(f"unexpected {event!r} after the link")
            if budget is not None:
                budget.report(self, conn.buffered)
            data = await self.reader.read(READ_CHUNK)
            if not data:
                raise ConnectError(f"{self.where}: server closed the connection")
            conn.receive_data(data)
            if budget is not None:
                budget.report(self, conn.buffered)

    async def send(self, *messages: Message) -> None:
        """Send; a server that stops reading is a connect error once the bytes waiting for
        it have not moved for :data:`SEND_STALL_TIMEOUT` (its own flood cannot wedge us)."""
        for message in messages:
            log.debug("%s tx %s", self.label, message_name(message))
            self.writer.write(self.conn.send(message))
        try:
            await self._drain()
        except (ConnectionError, OSError) as exc:
            raise ConnectError(f"{self.where}: send failed: {exc}", exc) from exc

    async def _drain(self) -> None:
        transport = self.writer.transport
        unsent = transport.get_write_buffer_size()
        moved_at = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(SEND_STALL_STEP):
                    await self.writer.drain()
                return
            except TimeoutError:
                now, left = time.monotonic(), transport.get_write_buffer_size()
                if left < unsent:
                    unsent, moved_at = left, now
                elif now - moved_at >= SEND_STALL_TIMEOUT:
                    raise ConnectError(
                        f"{self.where}: the server stopped reading ({left} bytes unsent "
                        f"for {SEND_STALL_TIMEOUT:g} s)"
                    ) from None

    def abort(self) -> None:
        """Drop the connection at once (no drain, no TLS goodbye): the bounded close's end."""
        self.conn.close()
        if self.budget is not None:
            self.budget.forget(self)
        self.writer.transport.abort()

    async def close(self, *, drain_timeout: float = 0.0) -> None:
        """Close the socket; with ``drain_timeout``, half-close first and wait for the server.

        Waiting until the server has closed its side means it has finished tearing the
        channel client down. spice-server 0.15.1 crashed (segfault in ``reds`` char-device
        code) when a new MAIN link raced the teardown of the same session's links, so
        callers that link again right after use the draining close.
        """
        self.conn.close()
        if self.budget is not None:
            self.budget.forget(self)
        if drain_timeout > 0 and not self.tls and not self.writer.is_closing():
            with contextlib.suppress(TimeoutError, ConnectionError, OSError):
                self.writer.write_eof()
                async with asyncio.timeout(drain_timeout):
                    while await self.reader.read(READ_CHUNK):
                        pass
        if not self.writer.is_closing():
            self.writer.close()
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation
        # that arrives as the inner future completes, and a reader task cancelled while
        # closing would then never end
        with contextlib.suppress(TimeoutError, ConnectionError, OSError, ssl.SSLError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


async def open_link(
    host: str,
    port: int,
    link: LinkMess,
    *,
    password: str | None,
    tls: TLSSettings | None = None,
    timeout: float = 10.0,
    budget: ReceiveBudget | None = None,
) -> ChannelLink:
    """Connect and run the link handshake; raises typed errors for every failure.

    :raise ConnectError: host unreachable, refused, or the handshake timed out
    :raise TLSVerificationError: the certificate did not verify
    :raise LinkError: the server refused the link (AuthenticationError for a bad ticket)
    :raise RemoteProtocolError: the peer is not a SPICE server
    """
    label = channel_label(link.channel_type, link.channel_id)
    try:
        async with asyncio.timeout(timeout):
            opened = await _open_link(host, port, link, password=password, tls=tls)
    except TimeoutError as exc:
        raise ConnectError(
            f"{label}: no SPICE link to {host}:{port} within {timeout:g} s", exc
        ) from exc
    opened.budget = budget
    return opened


async def _open_link(
    host: str, port: int, link: LinkMess, *, password: str | None, tls: TLSSettings | None
) -> ChannelLink:
    label = channel_label(link.channel_type, link.channel_id)
    started = time.monotonic()
    try:
        if tls is None:
            reader, writer = await asyncio.open_connection(host, port)
        else:
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=tls.context(),
                server_hostname=host if not tls.host_subject else None,
            )
    except ssl.SSLCertVerificationError as exc:
        why = TLS_UNKNOWN_CA if exc.verify_code in _UNTRUSTED_CHAIN else TLS_REJECTED
        raise TLSVerificationError(
            f"TLS verification of {host}:{port} failed ({why}): {exc.verify_message or exc}",
            exc,
        ) from exc
    except ssl.SSLError as exc:
        raise TLSVerificationError(f"TLS handshake with {host}:{port} failed: {exc}", exc) from exc
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConnectError(f"cannot connect to {host}:{port}: {reason}", exc) from exc
    connect_seconds = time.monotonic() - started
    if tls is not None and tls.host_subject:
        want = parse_subject(tls.host_subject)
        got = _peer_subject(writer)
        if want != got:
            writer.close()
            shown = ",".join(f"{k}={v}" for k, v in sorted(got))
            raise TLSVerificationError(
                f"TLS verification of {host}:{port} failed ({TLS_SUBJECT_MISMATCH}): "
                f"subject {shown!r} is not {tls.host_subject!r}"
            )
    conn = ClientChannelConnection(link)
    ok = False
    try:
        writer.write(conn.start())
        await writer.drain()
        await _await_event(conn, reader, LinkReplyReceived, label, host, port)
        mechanism, ticket = conn.auth_chunks(password)
        if mechanism:
            # separate segments, as spice-gtk writes them (Wireshark depends on it)
            writer.write(mechanism)
            await writer.drain()
        writer.write(ticket)
        await writer.drain()
        established = await _await_event(conn, reader, LinkEstablished, label, host, port)
        ok = True
    except (ConnectionError, OSError) as exc:
        raise ConnectError(
            f"{label}: connection to {host}:{port} broke during the link: {exc}", exc
        ) from exc
    finally:
        if not ok:
            writer.close()
    assert isinstance(established, LinkEstablished)
    return ChannelLink(
        reader,
        writer,
        conn,
        host,
        port,
        tls is not None,
        established.common_caps,
        established.channel_caps,
        connect_seconds=connect_seconds,
    )


async def _await_event(
    conn: ClientChannelConnection,
    reader: asyncio.StreamReader,
    kind: type[LinkReplyReceived] | type[LinkEstablished],
    label: str,
    host: str,
    port: int,
) -> LinkReplyReceived | LinkEstablished:
    while True:
        event = conn.next_event()
        if isinstance(event, kind):
            return event
        if event is not NEED_DATA:
            raise RemoteProtocolError(f"{label}: unexpected {event!r} during the link")
        data = await reader.read(READ_CHUNK)
        if not data:
            raise RemoteProtocolError(
                f"{label}: {host}:{port} closed the connection during the link (not a SPICE server?)"
            )
        conn.receive_data(data)
