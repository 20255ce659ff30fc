"""``spice-libvirt watch`` as a standalone witness of a migration driven by someone else."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from qemu.qmp import QMPClient

from spice_libvirt.lab.ports import free_tcp_port
from spice_libvirt.lab.qemu import QemuGroup

pytestmark = pytest.mark.qemu


async def _wait_channels(qmp: QMPClient, count: int, tries: int = 500) -> None:
    for _ in range(tries):
        spice: dict[str, list[object]] = await qmp.execute("query-spice")  # type: ignore[assignment]
        if len(spice.get("channels", [])) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} SPICE channels after {tries} polls")


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
    try:
        async with src.qmp() as q, dst.qmp() as qd:
            await _wait_channels(q, 2)
            await asyncio.sleep(0.5)  # let every channel of the watcher greet
            await q.execute(
                "client_migrate_info",
                {"protocol": "spice", "hostname": "127.0.0.1", "port": dst.spice_port},
            )
            if wait:
                await _wait_channels(qd, 5)
                await asyncio.sleep(0.1)
            await q.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            raise AssertionError(f"watch did not finish: {out.decode()} {err.decode()}") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == code, err.decode()
    verdict = json.loads(out.decode().splitlines()[-1])
    assert verdict["path"] == expected
    assert verdict["connection_id_kept"] is (expected == "seamless")
