"""A client that cannot reach the destination, on the bare-QEMU path.

The client is told a destination port whose SYNs go unanswered (a listener whose backlog is
full and that never accepts: on loopback, what a firewall that drops packets looks like).
The controller sees nothing of the client arrive at the destination (no SPICE_CONNECTED)
and stops waiting after 3 s instead of the link timeout; the VM moves and the verdict says
the client was lost, with the cause -- or, with ``--require-seamless``, nothing moves.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.policy import NO_CONTACT
from spice_libvirt.qemu.controller import migrate_qemu
from spice_libvirt.spice.client import SpiceClient
from tests import test_controller
from tests.test_controller import Pair, qmp_status

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("require_kvm")]
#: the two QEMUs and the connected client of the controller's tests
pair = test_controller.pair
client = test_controller.client


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port that drops every new SYN: its accept queue is full, nobody accepts."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)
        yield port
    finally:
        for sock in (*fillers, listener):
            sock.close()


@pytest.mark.parametrize("require_seamless", [False, True], ids=["default", "require-seamless"])
async def test_a_client_that_never_reaches_the_destination_is_named_lost(
    pair: Pair, client: SpiceClient, require_seamless: bool
) -> None:
    with black_hole() as port:
        request = pair.request(
            client_port=port, link_timeout=10.0, require_seamless=require_seamless
        )
        report = await migrate_qemu(request, client)
    link = report.link_wait
    assert link.result == "unreachable", link
    assert (link.reason or "").startswith(NO_CONTACT)
    assert link.duration_ms is not None
    assert link.duration_ms < 5_000  # 3 s, not the 10 s link timeout
    if require_seamless:
        assert report.outcome == "cancelled", report.notes
        assert for_report(report) is ExitCode.MIGRATION_FAILED
        assert (await qmp_status(pair.src))[0] == "running"
        return
    assert report.migration.status == "completed", report.notes
    assert report.outcome == "client-lost", report.notes
    assert for_report(report) is ExitCode.CLIENT_LOST
    assert (report.client_lost_cause or "").startswith(NO_CONTACT)
