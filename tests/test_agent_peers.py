"""The agent keeps its configured peers subscribed: one that cannot be opened at start (a
peer rebooting, an ssh handshake between busy hosts slower than a hold may wait) is tried
again in the background with a patient timeout, and a connection that drops is replaced.

Destination.open is replaced by a stand-in here (no libvirtd); the Vagrant test runs the
agents' qemu+ssh and qemu+tls peers for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from spice_libvirt import errors
from spice_libvirt.agent import service
from spice_libvirt.agent.service import Agent
from spice_libvirt.agent.settings import AgentSettings
from spice_libvirt.agent.watch import Destination

pytestmark = pytest.mark.unit

PEER = "qemu+ssh://127.0.0.1/system"


class _Peer:
    """A stand-in for an opened destination: alive until dropped."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.alive = True
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        self.alive = False


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - the agent's status has no event to await
            await asyncio.sleep(0.01)


def _agent(tmp_path: Path) -> Agent:
    return Agent(AgentSettings(state_dir=tmp_path, metrics=False, peers=(PEER,)))


def test_a_peer_unreachable_at_start_is_subscribed_once_it_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries: list[float] = []

    async def open_(uri: str, timeout: float) -> _Peer:
        tries.append(timeout)
        if len(tries) < 3:
            raise errors.LibvirtError(f"cannot connect to {uri}: handshake timed out")
        return _Peer(uri)

    monkeypatch.setattr(Destination, "open", open_)
    monkeypatch.setattr(service, "PEER_RETRY_S", 0.01)
    agent = _agent(tmp_path)

    async def scenario() -> None:
        task = asyncio.create_task(agent._subscribe_peers())
        await _until(lambda: PEER in agent.status.destinations)
        assert len(tries) == 3
        assert all(t == service.PEER_OPEN_TIMEOUT_S for t in tries)  # the patient timeout
        dropped = agent.destinations[PEER]
        assert isinstance(dropped, _Peer)
        dropped.alive = False  # the peer's libvirtd restarted
        await _until(lambda: agent.destinations.get(PEER) not in (None, dropped))
        assert dropped.closed
        assert PEER in agent.status.destinations
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_a_hold_opens_with_its_own_short_timeout_and_keeps_one_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[_Peer] = []

    async def open_(uri: str, timeout: float) -> _Peer:
        await asyncio.sleep(0.05)
        peer = _Peer(uri)
        opened.append(peer)
        return peer

    monkeypatch.setattr(Destination, "open", open_)
    agent = _agent(tmp_path)

    async def scenario() -> None:
        first, second = await asyncio.gather(
            agent.destination("127.0.0.1"), agent.destination("127.0.0.1", timeout=30.0)
        )
        assert first is second  # two openers at once: one kept, the other closed
        assert sum(not p.closed for p in opened) == 1

    asyncio.run(scenario())
