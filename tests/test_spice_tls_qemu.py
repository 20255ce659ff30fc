"""TLS is never downgraded, against real QEMU with both a plain and a TLS
port: once a CA or a tls-port is given, every link, pre-link and switch-host relink uses
TLS, and the plain port is not tried first. ``query-spice`` is the judge: it says, per
channel, whether the server sees TLS."""

from __future__ import annotations

from typing import Any

import pytest

from spice_libvirt.migration.evidence import unsigned_connection_id
from spice_libvirt.spice.client import ClientOptions, SpiceClient
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_process import QemuGroup, QemuInstance
from spice_libvirt_lab.tls import TlsMaterial

pytestmark = pytest.mark.qemu


def _options(vm: QemuInstance, tls: TlsMaterial, *, old_client: bool = False) -> ClientOptions:
    return ClientOptions(
        host="127.0.0.1",
        port=vm.spice_port,  # offered, and must not be used
        tls_port=vm.spice_tls_port,
        ca_file=tls.ca_cert,
        stream_port_name=None,
        seamless=not old_client,
        semi_seamless=not old_client,
    )


async def _channels(vm: QemuInstance) -> list[dict[str, Any]]:
    spice = await vm.execute("query-spice")
    channels: list[dict[str, Any]] = spice["channels"]
    return channels


async def test_tls_configured_links_every_channel_over_tls(
    qemu_factory: QemuGroup, tls_material: TlsMaterial
) -> None:
    vm = await qemu_factory("tls-both", tls_dir=tls_material.directory)
    assert vm.spice_tls_port is not None
    client = SpiceClient(_options(vm, tls_material))
    await client.connect()
    try:
        assert client.tls_in_use
        channels = await _channels(vm)
        assert len(channels) == len(client.channels) == 5
        assert all(c["tls"] for c in channels), channels
    finally:
        await client.close()


async def _migrate_pair(
    qemu_factory: QemuGroup, tls: TlsMaterial, *, old_client: bool = False
) -> tuple[SpiceClient, QemuInstance, Any]:
    src = await qemu_factory("src", tls_dir=tls.directory)
    mig_port = free_tcp_port()
    dst = await qemu_factory("dst", tls_dir=tls.directory, incoming=f"tcp:127.0.0.1:{mig_port}")
    client = SpiceClient(_options(src, tls, old_client=old_client))
    await client.connect()
    mark = client.migration_count
    async with src.qmp() as q:
        await q.execute(
            "client_migrate_info",
            {
                "protocol": "spice",
                "hostname": "127.0.0.1",
                "port": dst.spice_port,
                "tls-port": dst.spice_tls_port,
            },
        )
        if not old_client:
            assert await client.wait_migration_connected(10, after=mark) is not None
        await q.execute("migrate", {"uri": f"tcp:127.0.0.1:{mig_port}"})
    record = await client.next_migration(20)
    return client, dst, record


async def test_seamless_prelinks_use_tls(
    qemu_factory: QemuGroup, tls_material: TlsMaterial, require_kvm: None
) -> None:
    client, dst, record = await _migrate_pair(qemu_factory, tls_material)
    try:
        assert record.path == "seamless", record.steps
        assert record.connection_id_kept
        channels = await _channels(dst)
        assert len(channels) == 5
        assert all(c["tls"] for c in channels), channels
        linked = [s.detail for s in record.steps if s.message == "LINKED"]
        assert linked
        assert all(d.endswith(f":{dst.spice_tls_port}") for d in linked), linked
    finally:
        await client.close()


async def test_switch_host_relink_keeps_tls(
    qemu_factory: QemuGroup, tls_material: TlsMaterial
) -> None:
    # an old client (no SEAMLESS, no SEMI_SEAMLESS cap): spice-server sends SWITCH_HOST,
    # and the fresh session must come up on the TLS port, not the plain one offered with it
    client, dst, record = await _migrate_pair(qemu_factory, tls_material, old_client=True)
    try:
        assert record.path == "switch-host", record.steps
        assert client.tls_in_use
        assert client.tls_port == dst.spice_tls_port
        channels = await _channels(dst)
        assert len(channels) == 5
        assert all(c["tls"] for c in channels), channels
        assert {unsigned_connection_id(c["connection-id"]) for c in channels} == {client.session_id}
    finally:
        await client.close()
