"""Fixtures the whole suite shares: QEMU processes, TLS material, the Linux guest and a
MAIN-channel link probe.

A skipped test, in particular a real-component one (marked ``qemu``/``libvirt``, or using
``qemu_factory``, ``require_kvm`` or ``guest_images``), makes the run fail unless
``SPICE_LIBVIRT_ALLOW_SKIPS=1`` (:mod:`tests.honest_skips`).

Everything here cleans up after itself even when a test fails: every QEMU a test started
through ``qemu_factory`` is stopped by PID at teardown, and per-test directories live under
a fresh, short temp dir (unix socket paths must stay under 108 bytes, which pytest's own
``tmp_path`` names can exceed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from spice_libvirt.errors import LinkError
from spice_libvirt.spice.constants import ChannelType, CommonCap
from spice_libvirt.spice.link import LinkMess
from spice_libvirt.spice.transport import TLSSettings, open_link
from spice_libvirt_lab.guest import GuestImages, ensure_linux_guest, kvm_usable
from spice_libvirt_lab.qemu_process import QemuGroup
from spice_libvirt_lab.tls import TlsMaterial, generate_tls_material
from tests.honest_skips import (  # noqa: F401  (hooks: a skipped real test fails the run)
    pytest_collection_modifyitems,
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)


@pytest.fixture
def lab_dir() -> Iterator[Path]:
    """A short, private work directory under /tmp, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="sl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def qemu_factory(lab_dir: Path) -> AsyncIterator[QemuGroup]:
    """``await qemu_factory(name, **spec_fields)`` -> a running QemuInstance.

    Every instance it started is stopped at teardown, also when the test failed.
    """
    group = QemuGroup(lab_dir)
    try:
        yield group
    finally:
        await group.stop_all()


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    """A CA and a server certificate for 127.0.0.1/::1/localhost (x509-dir layout)."""
    return generate_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The built Linux guest (built on first use into the user cache, then reused)."""
    return ensure_linux_guest()


#: Set to 1 to make ``require_kvm`` act as on a host without /dev/kvm (proves the CI fails).
PRETEND_NO_KVM_ENV = "SPICE_LIBVIRT_TEST_PRETEND_NO_KVM"


@pytest.fixture
def require_kvm() -> None:
    """Skip the test on hosts where /dev/kvm cannot be used (which fails the run, see above)."""
    if os.environ.get(PRETEND_NO_KVM_ENV) == "1" or not kvm_usable():
        pytest.skip("/dev/kvm is not usable on this host")


# --------------------------------------------------------------------------- SPICE link probe


async def spice_link_result(
    host: str,
    port: int,
    password: str | None = None,
    *,
    ca_file: Path | None = None,
    timeout: float = 5.0,
) -> int:
    """Link a MAIN channel with the project's codec; the server's SpiceLinkErr (0 = accepted)."""
    tls = TLSSettings(ca_file=ca_file) if ca_file is not None else None
    try:
        link = await open_link(
            host,
            port,
            LinkMess(0, ChannelType.MAIN, 0, frozenset({CommonCap.PROTOCOL_AUTH_SELECTION})),
            password=password,
            tls=tls,
            timeout=timeout,
        )
    except LinkError as exc:
        return exc.code
    await link.close()
    return 0


SpiceLinkProbe = Callable[..., Awaitable[int]]


@pytest.fixture
def spice_link() -> SpiceLinkProbe:
    """:func:`spice_link_result`: ``await spice_link(host, port, password, ca_file=...)``."""
    return spice_link_result
