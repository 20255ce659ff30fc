"""The test guests: the Linux build is cached by its inputs, and the guest boots and streams."""

from __future__ import annotations

import asyncio
import gzip
import re
import shutil
import time
from pathlib import Path

import pytest

from spice_libvirt.errors import LabError
from spice_libvirt_lab import guest as guest_mod
from spice_libvirt_lab.guest import GuestImages, KernelPackage, ensure_linux_guest
from spice_libvirt_lab.qemu_process import QemuGroup, wait_guest_ready, wait_serial

RECORD = re.compile(rb"(\d{20}) (\d{10})\n")


def _newc_names(initrd: Path) -> dict[str, int]:
    """File names and modes in a gzip'd newc cpio archive (parsed here, not by cpio)."""
    data = gzip.decompress(initrd.read_bytes())
    names: dict[str, int] = {}
    offset = 0
    while True:
        header = data[offset : offset + 110]
        assert header[:6] == b"070701", header[:6]
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        if name == "TRAILER!!!":
            return names
        names[name] = mode
        data_start = (name_start + namesize + 3) & ~3
        offset = (data_start + filesize + 3) & ~3


def test_digest_follows_the_inputs() -> None:
    a = KernelPackage(name="linux-image-6.1.0-56-amd64", version="6.1.192-2")
    b = KernelPackage(name="linux-image-6.1.0-56-amd64", version="6.1.192-3")
    assert guest_mod.inputs_digest(a) == guest_mod.inputs_digest(a)
    assert guest_mod.inputs_digest(a) != guest_mod.inputs_digest(b)
    assert a.release == "6.1.0-56-amd64"


def test_cached_build_is_reused(guest_images: GuestImages, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = guest_images.kernel.stat().st_mtime_ns

    def no_rebuild(*_args: object) -> GuestImages:
        raise AssertionError("the cached guest was rebuilt")

    monkeypatch.setattr(guest_mod, "_build", no_rebuild)
    monkeypatch.setattr(guest_mod, "_memo", {})  # go through the digest check, not the memo
    again = ensure_linux_guest()
    assert again == guest_images
    assert guest_images.kernel.stat().st_mtime_ns == mtime


def test_build_contents_and_rebuild_on_change(
    guest_images: GuestImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private cache: build, reuse, then a changed source makes a new build."""
    cache = tmp_path / "cache"
    # Seed the package download from the shared cache so this test needs no network.
    debs = guest_images.directory.parent / "debs"
    (cache / "debs").mkdir(parents=True)
    for deb in debs.glob("*.deb"):
        (cache / "debs" / deb.name).hardlink_to(deb)

    started = time.monotonic()
    first = ensure_linux_guest(cache_dir=cache)
    build_s = time.monotonic() - started
    print(f"linux guest build: {build_s:.1f} s (download excluded)")
    assert first.pvh
    assert first.kernel.read_bytes()[:4] == b"\x7fELF"
    assert first.kernel_package == guest_images.kernel_package
    names = _newc_names(first.initrd)
    for required in ("init", "bin/busybox", "bin/seqwriter", "bin/dirtier"):
        assert names[required] & 0o111, required  # present and executable
    assert {f"lib/modules/{m}.ko" for m in guest_mod.VIRTIO_MODULES} <= set(names)

    built = first.initrd.stat()
    monkeypatch.setattr(guest_mod, "_memo", {})
    assert ensure_linux_guest(cache_dir=cache) == first
    reused = first.initrd.stat()  # the cached build was reused, not rebuilt in place
    assert (reused.st_ino, reused.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)

    sources = tmp_path / "src"
    shutil.copytree(guest_mod.SOURCE_DIR, sources)
    with (sources / "init").open("a") as fh:
        fh.write("# changed\n")
    monkeypatch.setattr(guest_mod, "SOURCE_DIR", sources)
    monkeypatch.setattr(guest_mod, "_memo", {})
    second = ensure_linux_guest(cache_dir=cache)
    assert second.digest != first.digest
    assert not first.directory.exists()  # the outdated build was pruned
    assert guest_mod.find_linux_guest(cache) == second


def test_unknown_kernel_package_is_a_lab_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICE_LIBVIRT_KERNEL_PACKAGE", "linux-image-0.0.0-no-such")
    with pytest.raises(LabError, match="no-such"):
        ensure_linux_guest(cache_dir=tmp_path)


@pytest.mark.qemu
@pytest.mark.slow
async def test_linux_guest_boots_under_tcg(
    qemu_factory: QemuGroup, guest_images: GuestImages
) -> None:
    started = time.monotonic()
    vm = await qemu_factory("lx", guest="linux", images=guest_images, dirty_mb=16)
    assert vm.accel == "tcg"  # default for linux unless SPICE_LIBVIRT_LINUX_ACCEL says kvm
    assert (await vm.execute("query-kvm"))["enabled"] is False
    await wait_guest_ready(vm, timeout=90)
    print(f"linux guest: GUEST-READY {time.monotonic() - started:.2f} s after start")
    serial = vm.serial_text()
    assert re.search(r"PORT org\.spice-libvirt\.stream -> /dev/vport\dp\d", serial), serial
    assert "INSMOD-FAILED" not in serial
    await wait_serial(vm, "dirtier: 16 MiB", timeout=60)  # generous: a shared machine


@pytest.mark.qemu
@pytest.mark.slow
async def test_seqwriter_streams_contiguous_records(
    qemu_factory: QemuGroup, guest_images: GuestImages, lab_dir: Path
) -> None:
    """The writer's records, read through a plain socket chardev instead of SPICE."""
    sock = lab_dir / "stream.sock"
    vm = await qemu_factory(
        "sw",
        guest="linux",
        images=guest_images,
        stream_chardev=f"socket,path={sock},server=on,wait=off",
    )
    await wait_guest_ready(vm, timeout=90)
    # the scenario, not a synchronisation: keep the host side closed for a while; the writer
    # must wait (not drop) while nobody listens
    await asyncio.sleep(0.5)
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        data = b""
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            data += await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    usable = len(data) - len(data) % 32
    records = [RECORD.fullmatch(data[i : i + 32]) for i in range(0, usable, 32)]
    assert all(records), data[:200]
    seqs = [int(m.group(1)) for m in records if m]
    stamps = [int(m.group(2)) for m in records if m]
    assert seqs[0] == 0  # nothing was lost while the host side was closed
    assert seqs == list(range(len(seqs)))
    assert stamps == sorted(stamps)
    rate = len(seqs) / 3.0
    print(f"seqwriter: {len(seqs)} records in 3 s ({rate:.0f}/s) under {vm.accel}")
    # records flow steadily (a generous floor: TCG on a shared 2-CPU machine varies a lot)
    assert rate > 50
