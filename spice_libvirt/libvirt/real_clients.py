"""Which connections to a domain's SPICE ports are real clients: the one census the agent
and the controller both take.

Anyone who can reach a SPICE port can open a TCP connection to it and hold it open, no
ticket needed; the kernel's table (:mod:`spice_libvirt.host.procnet`) shows it like a
channel. Waiting for it would stretch a hold to its bound. Two kinds of evidence tell a
channel from such a connection without the monitor (which taints the domain):

* libvirt's graphics events: spice-server reports ``connect`` when it accepts a socket and
  ``initialize`` once the link (ticket included) succeeded. Only a client makes the second.
  They say what happened *since* one subscribed.
* the kernel, for a connection accepted before that: how many bytes QEMU sent on it
  (``tcpi_bytes_acked``). spice-server answers nothing until it has a whole link message,
  and refuses a bad one with a :data:`LINK_REFUSAL_BYTES` reply before it closes the
  socket; a linked channel has had the link reply *and* the link result. So a connection
  on which QEMU sent no more than a refusal never linked (a bare connection, or garbage
  that is not yet a link message).

What neither can tell: a peer that speaks the link protocol far enough to be answered,
then never sends its ticket, before the census subscribed to the events. It counts as a
channel. Without ``tcp_info`` (the namespace cannot be entered), an unheard-of connection
counts too.
"""

from __future__ import annotations

from collections.abc import Sequence

from spice_libvirt.host.procnet import TcpSocket
from spice_libvirt.libvirt.connection import GraphicsEvent, endpoint

#: connections remembered per domain (a client has a handful; the rest are a flood)
SOURCE_CONNECTIONS_MAX = 1024
#: SpiceLinkHeader (16 bytes) + SpiceLinkReply without capabilities (178): spice-server's
#: refusal of a link, and less than any link reply plus its 4-byte result
LINK_REFUSAL_BYTES = 16 + 178


def answered(sock: TcpSocket) -> bool | None:
    """Did QEMU send more on ``sock`` than a refusal? None: the kernel did not say."""
    if sock.sent is None:
        return None
    # one more: a socket that opened the connection has its SYN counted (QEMU's accepted
    # ones do not); a link reply and its result are at least 198 bytes
    return sock.sent > LINK_REFUSAL_BYTES + 1


class SourceChannels:
    """The connections to local domains' SPICE ports that linked a channel.

    Fed a libvirtd's graphics events (:meth:`absorb`) from the moment its owner subscribed;
    :meth:`split` sorts the connections the kernel shows now. One that the events never
    mentioned predates the subscription: the kernel's byte count decides (see the module).
    The controller, which subscribes when it starts, decides by the kernel alone.
    """

    def __init__(self) -> None:
        self._phase: dict[str, dict[tuple[str, int], str]] = {}

    def absorb(self, event: GraphicsEvent) -> None:
        seen = self._phase.setdefault(event.domain, {})
        key = endpoint(event.remote)
        if event.phase == "disconnect":
            seen.pop(key, None)
        elif event.phase in ("connect", "initialize"):
            seen.pop(key, None)  # re-inserted last: the oldest go first past the bound
            seen[key] = event.phase
            while len(seen) > SOURCE_CONNECTIONS_MAX:
                del seen[next(iter(seen))]

    def split(
        self, domain: str, established: Sequence[TcpSocket]
    ) -> tuple[list[TcpSocket], list[TcpSocket]]:
        """(channels, bare): of ``domain``'s SPICE connections established now, those that
        linked and those that never did."""
        seen = self._phase.get(domain, {})
        now = {endpoint(s.peer) for s in established}
        for gone in [k for k in seen if k not in now]:  # closed without an event: forget
            del seen[gone]
        channels: list[TcpSocket] = []
        bare: list[TcpSocket] = []
        for sock in established:
            phase = seen.get(endpoint(sock.peer))
            linked = phase == "initialize" if phase is not None else answered(sock) is not False
            (channels if linked else bare).append(sock)
        return channels, bare


__all__ = ["LINK_REFUSAL_BYTES", "SOURCE_CONNECTIONS_MAX", "SourceChannels", "answered"]
