"""Sans-IO state machine of one client channel connection (h11-style).

The caller owns the socket: it sends the bytes this object returns and feeds it the bytes
it reads, then asks for events::

    conn = ClientChannelConnection(LinkMess(0, ChannelType.MAIN, 0, caps...))
    sock.send(conn.start())
    while (event := conn.next_event()) is NEED_DATA: conn.receive_data(sock.recv(...))
    # event is LinkReplyReceived
    sock.send(conn.authenticate(password))
    ...  # LinkEstablished, then MessageReceived events; conn.send(msg) -> bytes

All transitions live in this file and the table :data:`TRANSITIONS`. Illegal calls by us
raise :class:`LocalProtocolError`; illegal bytes from the peer raise
:class:`RemoteProtocolError` (or :class:`LinkError` for refused links) and move the
connection to ``ERROR`` for good.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from spice_libvirt.errors import (
    AuthenticationError,
    LinkError,
    LocalProtocolError,
    RemoteProtocolError,
)
from spice_libvirt.spice.constants import (
    MAIN_MAX_BODY,
    ChannelType,
    CommonCap,
    LinkErr,
    MigrateFlags,
)
from spice_libvirt.spice.framing import (
    DEFAULT_MAX_BODY,
    MINI_HEADER,
    FrameDecoder,
    ReceiveBuffer,
    encode_frame,
    oversized,
)
from spice_libvirt.spice.link import (
    LINK_HEADER,
    U32,
    LinkHeader,
    LinkMess,
    LinkReply,
    encode_auth_mechanism,
    encrypt_ticket,
)
from spice_libvirt.spice.messages import (
    Ack,
    AckSync,
    Message,
    MessageClass,
    Migrate,
    MigrateData,
    Ping,
    Pong,
    RawMessage,
    SetAck,
    UnknownMessage,
    fast_init,
    message_name,
    message_type,
    server_table,
)


class ConnState(enum.Enum):
    IDLE = "idle"
    AWAIT_LINK_REPLY = "await-link-reply"
    LINK_REPLY_RECEIVED = "link-reply-received"
    AWAIT_LINK_RESULT = "await-link-result"
    READY = "ready"
    #: the server sent MIGRATE with NEED_DATA_TRANSFER: the next message must be MIGRATE_DATA
    AWAIT_MIGRATE_DATA = "await-migrate-data"
    #: MIGRATE was fully handled; the channel will move to the destination socket
    MIGRATED = "migrated"
    CLOSED = "closed"
    ERROR = "error"


#: (state, input) -> next state. Inputs: method names for our calls, message names for the
#: peer's. Anything missing is illegal.
TRANSITIONS: dict[tuple[ConnState, str], ConnState] = {
    (ConnState.IDLE, "start"): ConnState.AWAIT_LINK_REPLY,
    (ConnState.AWAIT_LINK_REPLY, "link-reply"): ConnState.LINK_REPLY_RECEIVED,
    (ConnState.LINK_REPLY_RECEIVED, "authenticate"): ConnState.AWAIT_LINK_RESULT,
    (ConnState.AWAIT_LINK_RESULT, "link-result"): ConnState.READY,
    (ConnState.READY, "MIGRATE+data"): ConnState.AWAIT_MIGRATE_DATA,
    (ConnState.READY, "MIGRATE"): ConnState.MIGRATED,
    (ConnState.AWAIT_MIGRATE_DATA, "MIGRATE_DATA"): ConnState.MIGRATED,
}


# Enum members and class attributes as module constants for the per-message path: in
# Python 3.11 ``ConnState.READY`` is a lookup through the enum's metaclass (~70 ns), four of
# them per message were a sixth of the receive path.
_ERROR = ConnState.ERROR
_CLOSED = ConnState.CLOSED
_READY = ConnState.READY
_AWAIT_LINK_REPLY = ConnState.AWAIT_LINK_REPLY
_AWAIT_LINK_RESULT = ConnState.AWAIT_LINK_RESULT
_MIGRATE_TYPE = Migrate.TYPE
_MINI_SIZE = MINI_HEADER.size
#: Most events decoded ahead at once (bounds the objects held beyond the buffered bytes).
CUT_AHEAD = 64
_unpack_mini = MINI_HEADER.unpack_from


class NeedData:
    """Sentinel: feed more bytes before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@fast_init
@dataclass(frozen=True, slots=True)
class LinkReplyReceived:
    reply: LinkReply


@fast_init
@dataclass(frozen=True, slots=True)
class LinkEstablished:
    mini_header: bool
    common_caps: frozenset[int]
    channel_caps: frozenset[int]


@fast_init
@dataclass(frozen=True, slots=True)
class MessageReceived:
    serial: int
    message: Message


Event = LinkReplyReceived | LinkEstablished | MessageReceived
#: MessageReceived's slot setters (what its fast_init __init__ calls), for the cut-ahead loop
_SET_SERIAL = MessageReceived.__dict__["serial"].__set__
_SET_MESSAGE = MessageReceived.__dict__["message"].__set__


def body_decoders(table: dict[int, MessageClass]) -> dict[int, Callable[[bytes], Message]]:
    """Message type -> what turns a body into the message: ``cls.decode_body``, or for
    an opaque-body message (:class:`RawMessage`) the class itself, which is what its
    ``decode_body`` does for a ``bytes`` body (one call less per port record)."""
    return {
        t: (cls if issubclass(cls, RawMessage) else cls.decode_body) for t, cls in table.items()
    }


def _link_error(code: int, what: str) -> LinkError:
    if code == LinkErr.PERMISSION_DENIED:
        return AuthenticationError(code, f"permission denied ({what}): wrong or expired ticket")
    return LinkError(code)


class ClientChannelConnection:
    """One channel's connection, from the client's side."""

    def __init__(self, link: LinkMess, *, max_body: int | None = None) -> None:
        self.link = link
        self.state = ConnState.IDLE
        self.reply: LinkReply | None = None
        self.mini_header = False
        if max_body is None:
            main = link.channel_type == ChannelType.MAIN
            max_body = MAIN_MAX_BODY if main else DEFAULT_MAX_BODY
        self.max_body = max_body
        #: message type -> class for what the server sends on this channel type, and
        #: message type -> the callable that decodes such a body (see :func:`body_decoders`)
        self._server_table = server_table(link.channel_type)
        self._decoders = body_decoders(self._server_table)
        self._link_buffer = ReceiveBuffer()
        self._decoder: FrameDecoder | None = None
        self._serial_out = 0
        #: messages decoded in the data phase, those still in ``_ahead`` included (see
        #: :attr:`received`)
        self._decoded = 0
        #: events cut ahead by :meth:`_cut_ahead`, last first (``pop()`` is the next one)
        self._ahead: list[MessageReceived] = []
        #: flags of the SPICE_MSG_MIGRATE received, once it was
        self.migrate_flags: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as events: what this connection holds of
        messages not received in full (plus complete ones not asked for yet)."""
        if self._decoder is None:
            return len(self._link_buffer)
        return self._decoder.buffered

    @property
    def received(self) -> int:
        """Messages received in the data phase and handed out by :meth:`next_event` (the
        serial of the last one, with mini headers). Counted per batch cut ahead, minus
        what is not handed out yet: no per-message bookkeeping on the receive path."""
        return self._decoded - len(self._ahead)

    # -- transitions -------------------------------------------------------------------

    def _go(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise LocalProtocolError(f"{event!r} is not allowed in state {self.state.value}")
        self.state = nxt

    def _fail(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        self.state = ConnState.ERROR
        return exc

    # -- our side ------------------------------------------------------------------------

    def start(self) -> bytes:
        """Bytes of the link request."""
        self._go("start")
        return self.link.encode()

    def authenticate(self, password: str | None) -> bytes:
        """Bytes of the auth mechanism (when the server offers a choice) and the ticket.

        Returned as two chunks because some observers (Wireshark) need them in separate
        segments, as spice-gtk writes them.
        """
        if self.reply is None:
            raise LocalProtocolError("authenticate() before the link reply")
        self._go("authenticate")
        ticket = encrypt_ticket(self.reply.pub_key, password)
        if CommonCap.PROTOCOL_AUTH_SELECTION in self.reply.common_caps and (
            CommonCap.PROTOCOL_AUTH_SELECTION in self.link.common_caps
        ):
            return encode_auth_mechanism(CommonCap.AUTH_SPICE) + ticket
        return ticket

    def auth_chunks(self, password: str | None) -> tuple[bytes, bytes]:
        """Like :meth:`authenticate`, split into (mechanism, ticket); mechanism may be empty."""
        data = self.authenticate(password)
        return data[:-128], data[-128:]

    def send(self, message: Message) -> bytes:
        """Frame a message for this channel."""
        if self.state not in (ConnState.READY, ConnState.AWAIT_MIGRATE_DATA, ConnState.MIGRATED):
            raise LocalProtocolError(
                f"cannot send {message_name(message)} in state {self.state.value}"
            )
        self._serial_out += 1
        return encode_frame(
            message_type(message),
            message.encode_body(),
            mini=self.mini_header,
            serial=self._serial_out,
        )

    def resume_after_migration(self) -> None:
        """Back to READY on the destination socket once the switch is done."""
        if self.state is not ConnState.MIGRATED:
            raise LocalProtocolError(f"resume_after_migration in state {self.state.value}")
        self.state = ConnState.READY
        self.migrate_flags = None

    def close(self) -> None:
        self.state = ConnState.CLOSED

    # -- peer's side ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        state = self.state
        if state is _CLOSED or state is _ERROR:
            raise LocalProtocolError(f"receive_data in state {state.value}")
        if self._decoder is not None:
            self._decoder.feed(data)
        else:
            self._link_buffer.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`.

        The data phase is written out in this one method, with the body decoding of
        :func:`~spice_libvirt.spice.messages.decode_server_message` inlined (same table,
        same errors): it runs once per message the server sends, and every call saved
        there is throughput (``benchmarks/bench_codec.py``). In READY with mini headers,
        :meth:`_cut_ahead` decodes every complete frame in one go and the events are handed
        out one per call (see there why that changes nothing a caller can observe).
        """
        ahead = self._ahead
        if ahead:
            return ahead.pop()
        state = self.state
        if state is _ERROR:
            raise LocalProtocolError("connection already failed")
        decoder = self._decoder
        if state is _READY and decoder is not None and decoder.mini and decoder._ready is None:
            ahead = self._ahead = self._cut_ahead(decoder)
            if ahead:
                self._decoded += len(ahead)
                return ahead.pop()
        try:
            if decoder is None or state is _AWAIT_LINK_REPLY or state is _AWAIT_LINK_RESULT:
                return self._link_event()
            if decoder.mini and decoder._ready is None:
                # FrameDecoder.next_raw for mini headers, written out (its fields are the
                # codec's own; this is the one place outside framing.py that reads them)
                data = decoder._data
                pos = decoder._pos
                start = pos + _MINI_SIZE
                if start > len(data):
                    return NEED_DATA
                msg_type, size = _unpack_mini(data, pos)
                if size > decoder.max_body:
                    raise oversized(msg_type, size, decoder.max_body)
                end = start + size
                if end > len(data):
                    return NEED_DATA
                decoder._pos = end
                serial = decoder._serial = decoder._serial + 1
                body = data[start:end]
            else:
                raw = decoder.next_raw()
                if raw is None:
                    return NEED_DATA
                serial, msg_type, body = raw
            decode = self._decoders.get(msg_type)
            if decode is None:
                message: Message = UnknownMessage(msg_type, body)
            else:
                try:
                    message = decode(body)
                except (struct.error, IndexError, ValueError) as exc:
                    if isinstance(exc, RemoteProtocolError):
                        raise
                    name = self._server_table[msg_type].NAME
                    raise RemoteProtocolError(f"malformed {name}: {exc}") from exc
            self._decoded += 1
            # Only MIGRATE (no class subclasses it) or a state past READY can change state.
            if msg_type == _MIGRATE_TYPE or state is not _READY:
                self._check_migration_order(message)
        except RemoteProtocolError as exc:
            raise self._fail(exc) from exc.__cause__
        return MessageReceived(serial, message)

    def _cut_ahead(self, decoder: FrameDecoder) -> list[MessageReceived]:
        """Decode every complete frame now, up to :data:`CUT_AHEAD` of them; return their
        events, last first (possibly none).

        Why it is safe: only the frames :meth:`next_event` would decode *the same way*
        whenever it was asked are cut ahead. Decoding is pure (the channel's table and the
        body); the state machine only acts on MIGRATE (or outside READY, where this is not
        called), so the cut stops *before* a MIGRATE, before an oversized header and before
        a body that fails to decode, leaving that frame in the decoder for the one-by-one
        path, which raises or transitions exactly where it always did. ``received`` counts
        events as they are handed out. What it saves: per message, the method call and
        the attribute loads of the one-by-one path (locals in this loop instead).
        """
        data = decoder._data
        pos = decoder._pos
        serial = decoder._serial
        max_body = decoder.max_body
        decoder_for = self._decoders.get
        end_of_data = len(data)
        events: list[MessageReceived] = []
        # locals for what the loop calls: a global or attribute lookup per message counts;
        # the event is built as MessageReceived.__init__ would, without its Python frame
        keep, unpack, unknown = events.append, _unpack_mini, UnknownMessage
        new, event, set_serial, set_message = (
            object.__new__,
            MessageReceived,
            _SET_SERIAL,
            _SET_MESSAGE,
        )
        header_size, migrate_type = _MINI_SIZE, _MIGRATE_TYPE
        for _ in range(CUT_AHEAD):
            start = pos + header_size
            if start > end_of_data:
                break
            msg_type, size = unpack(data, pos)
            end = start + size
            if size > max_body or end > end_of_data or msg_type == migrate_type:
                break
            decode = decoder_for(msg_type)
            body = data[start:end]
            if decode is None:
                message: Message = unknown(msg_type, body)
            else:
                try:
                    message = decode(body)
                except (struct.error, IndexError, ValueError, RemoteProtocolError):
                    break  # the one-by-one path decodes it again and raises
            serial += 1
            received = new(event)
            set_serial(received, serial)
            set_message(received, message)
            keep(received)
            pos = end
        if events:
            decoder._pos = pos
            decoder._serial = serial
            events.reverse()
        return events

    def _link_event(self) -> Event | NeedData:
        if self.state is ConnState.AWAIT_LINK_REPLY:
            head = self._link_buffer.peek(LINK_HEADER.size)
            if head is None:
                return NEED_DATA
            header = LinkHeader.decode(head)
            if len(self._link_buffer) < LINK_HEADER.size + header.size:
                return NEED_DATA
            self._link_buffer.take(LINK_HEADER.size)
            body = self._link_buffer.take(header.size)
            assert body is not None
            reply = LinkReply.decode(body)
            if reply.error != LinkErr.OK:
                raise _link_error(reply.error, "link reply")
            self.reply = reply
            self._go("link-reply")
            return LinkReplyReceived(reply)
        if self.state is ConnState.AWAIT_LINK_RESULT:
            raw = self._link_buffer.take(U32.size)
            if raw is None:
                return NEED_DATA
            (code,) = U32.unpack(raw)
            if code != LinkErr.OK:
                raise _link_error(code, "link result")
            assert self.reply is not None
            self._go("link-result")
            self.mini_header = CommonCap.MINI_HEADER in self.reply.common_caps
            self._decoder = FrameDecoder(mini=self.mini_header, max_body=self.max_body)
            self._decoder.feed(self._link_buffer.take_all())
            return LinkEstablished(
                self.mini_header, self.reply.common_caps, self.reply.channel_caps
            )
        return NEED_DATA

    def _check_migration_order(self, message: Message) -> None:
        if self.state is ConnState.AWAIT_MIGRATE_DATA:
            if not isinstance(message, MigrateData):
                raise RemoteProtocolError(
                    f"expected MIGRATE_DATA after MIGRATE, got {message_name(message)}"
                )
            self._go("MIGRATE_DATA")
        elif isinstance(message, Migrate):
            self.migrate_flags = message.flags
            if self.state is not ConnState.READY:
                raise RemoteProtocolError(f"MIGRATE in state {self.state.value}")
            self._go(
                "MIGRATE+data" if message.flags & MigrateFlags.NEED_DATA_TRANSFER else "MIGRATE"
            )


#: PONGs and ACK_SYNCs (each the answer to one server message) sent per second at most,
#: after a burst of :data:`REPLY_BURST`: spice-server pings a channel every few seconds and
#: sends SET_ACK once per link, so only a flood goes unanswered -- and a flood whose answers
#: the server never reads cannot then back up into the client
REPLY_RATE = 50.0
REPLY_BURST = 50.0


class KeepAlive:
    """Answers the common flow-control messages the way spice-gtk does.

    SET_ACK → ACK_SYNC and an ACK every ``window`` received messages; PING → PONG (the
    payload is not echoed), both within :data:`REPLY_RATE`. Pure: returns the replies, the
    caller sends them (``now`` is the caller's monotonic clock).
    """

    def __init__(self) -> None:
        self.window = 0
        self.countdown = 0
        self._tokens = REPLY_BURST
        self._at: float | None = None
        #: PINGs and SET_ACKs left unanswered because they came too fast
        self.unanswered = 0

    def _may_answer(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(REPLY_BURST, self._tokens + (now - self._at) * REPLY_RATE)
        self._at = now
        if self._tokens < 1.0:
            self.unanswered += 1
            return False
        self._tokens -= 1.0
        return True

    def on_message(self, message: Message, now: float = 0.0) -> list[Message]:
        replies: list[Message] = []
        if isinstance(message, SetAck):
            self.window = self.countdown = message.window
            if self._may_answer(now):
                replies.append(AckSync(message.generation))
            return replies
        if isinstance(message, Ping) and self._may_answer(now):
            replies.append(Pong(message.id, message.timestamp))
        if self.window:
            self.countdown -= 1
            if self.countdown <= 0:
                self.countdown = self.window
                replies.append(Ack())
        return replies
