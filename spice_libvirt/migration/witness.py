"""What a controller needs from an embedded SPICE client attached to the source.

Both controllers (QEMU and libvirt) accept a witness and neither knows the client class:
:class:`spice_libvirt.spice.client.SpiceClient` satisfies the protocol, and so does the
lab's threaded wrapper or any test double of the same shape. Without a witness a verdict
rests on QMP evidence alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from spice_libvirt import errors
from spice_libvirt.migration.report import LinkWait
from spice_libvirt.spice.record import ClientMigrationRecord, StreamStats
from spice_libvirt.spice.transport import verification_failure

#: assumed client RTT when a witness cannot tell its own
DEFAULT_WITNESS_RTT = 0.05


@runtime_checkable
class MigrationWitness(Protocol):
    """The embedded client as the controllers see it (``rtt_estimate`` is optional)."""

    @property
    def session_id(self) -> int: ...

    @property
    def channels(self) -> list[str]: ...

    @property
    def migration_count(self) -> int:
        """Migrations the server started so far; read before ``client_migrate_info``."""
        ...

    async def wait_migration_connected(
        self, timeout: float, after: int | None = None
    ) -> float | None:
        """Monotonic time the client told the source it linked (None: CONNECT_ERROR).

        :raise TimeoutError: no answer within ``timeout``
        """
        ...

    async def next_migration(self, timeout: float) -> ClientMigrationRecord: ...

    def stream_stats(self) -> StreamStats: ...


def witness_rtt(witness: object) -> float:
    """The witness's own RTT estimate to the source, or :data:`DEFAULT_WITNESS_RTT`."""
    rtt = getattr(witness, "rtt_estimate", None)
    return rtt if isinstance(rtt, float) else DEFAULT_WITNESS_RTT


async def await_connected(
    witness: MigrationWitness,
    timeout: float,
    after: int | None,
    link: LinkWait,
    note: Callable[[str], None],
) -> float | None:
    """When our client told the source it linked; None (and ``link.result`` says why) if it
    did not within ``timeout`` or could not link (CONNECT_ERROR, a failed client)."""
    try:
        connected_at = await witness.wait_migration_connected(timeout, after)
    except TimeoutError:
        link.result = "timeout"
        return None
    except errors.SpiceLibvirtError as exc:
        note(f"embedded client: {exc}")
        link.result = "connect-error"
        _name_reason(witness, link, note, str(exc))
        return None
    if connected_at is None:
        link.result = "connect-error"
        _name_reason(witness, link, note, None)
    return connected_at


def _name_reason(
    witness: object, link: LinkWait, note: Callable[[str], None], error: str | None
) -> None:
    """Say why the client could not link: a certificate it refused is the client keeping
    its user safe from the destination, not a network fault, and the report must say so."""
    last = getattr(witness, "last_link_error", None)
    error = last if isinstance(last, str) and last else error
    if not error:
        return
    kind = verification_failure(error)
    if kind is None:
        link.reason = f"client could not link to the destination: {error}"
    else:
        link.reason = f"client could not verify the destination ({kind})"
    note(f"{link.reason}: {error}" if kind is not None else link.reason)


__all__ = ["DEFAULT_WITNESS_RTT", "MigrationWitness", "await_connected", "witness_rtt"]
