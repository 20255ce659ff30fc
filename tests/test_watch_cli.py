"""``spice-libvirt watch`` as a standalone witness of a migration driven by someone else."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from spice_libvirt.qemu.qmp import NegotiatingClient
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_process import QemuGroup

pytestmark = pytest.mark.qemu


#: Generous: the machine is shared, and nothing here is a measurement.
BOUND_S = 60.0


async def _wait_channels(qmp: NegotiatingClient, count: int) -> None:
    """Until QEMU lists ``count`` SPICE channels (QMP has no event for every channel)."""
    async with asyncio.timeout(BOUND_S):
        while True:
            spice: dict[str, list[object]] = await qmp.execute("query-spice")  # type: ignore[assignment]
            if len(spice.get("channels", [])) >= count:
                return
            await asyncio.sleep(0.02)


async def _stderr_line(proc: asyncio.subprocess.Process, prefix: str, seen: list[str]) -> str:
    """The watcher's next human line on stderr starting with ``prefix`` (an event)."""
    assert proc.stderr is not None
    async with asyncio.timeout(BOUND_S):
        while True:
            raw = await proc.stderr.readline()
            if not raw:
                raise AssertionError(f"watch exited before {prefix!r}: {seen}")
            line = raw.decode().strip()
            seen.append(line)
            if line.startswith(prefix):
                return line


@pytest.mark.parametrize(
    ("wait", "old_client", "expected", "code"),
    [
        (True, [], "seamless", 0),
        # an old client (no migration caps) gets no BEGIN at all: always switch-host
        (False, ["--old-client", "no-semi-seamless"], "switch-host", 8),
    ],
)
async def test_watch_reports_each_migration(
    qemu_factory: QemuGroup,
    require_kvm: None,
    wait: bool,
    old_client: list[str],
    expected: str,
    code: int,
) -> None:
    src = await qemu_factory("src")
    port = free_tcp_port()
    dst = await qemu_factory("dst", incoming=f"tcp:127.0.0.1:{port}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spice_libvirt",
        "watch",
        "--json",
        "--count",
        "1",
        "--duration",
        "30",
        *old_client,
        f"spice://127.0.0.1:{src.spice_port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    seen: list[str] = []
    try:
        # "watching session N (main:0, display:0, ...)": every channel is linked
        ready = await _stderr_line(proc, "watching session", seen)
        channels = ready[ready.index("(") + 1 : ready.rindex(")")].split(", ")
        async with src.qmp() as q:
            await _wait_channels(q, len(channels))
            await q.execute(
                "client_migrate_info",
                {"protocol": "spice", "hostname": "127.0.0.1", "port": dst.spice_port},
            )
            if wait:
                # the client says when it has answered the source, linked to the destination
                linked = await _stderr_line(proc, "migration 1:", seen)
                assert "linked to the destination" in linked
            await q.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        try:
            async with asyncio.timeout(BOUND_S):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            raise AssertionError(f"watch did not finish: {out.decode()} {err.decode()}") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == code, "\n".join(seen) + err.decode()
    verdict = json.loads(out.decode().splitlines()[-1])
    assert verdict["path"] == expected
    assert verdict["connection_id_kept"] is (expected == "seamless")
