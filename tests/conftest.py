"""Fixtures the whole suite shares: QEMU processes, the two-host libvirt lab, an X server for
remote-viewer, TLS material, the Linux guest and a MAIN-channel link probe.

Every test that needs no real component carries the ``unit`` marker (``pytest -m unit``,
:mod:`tests.rigs.unit`). A skipped test, in particular a real-component one (marked
``qemu``/``libvirt``, or using ``qemu_factory``, ``shared_lab`` or another fixture of
:data:`tests.honest_skips.REAL_FIXTURES`), makes the run fail unless
``SPICE_LIBVIRT_ALLOW_SKIPS=1`` (:mod:`tests.honest_skips`).

Everything here cleans up after itself even when a test fails: every QEMU a test started
through ``qemu_factory`` is stopped by PID at teardown, every libvirt lab is torn down and
checked for leftovers (:mod:`tests.rigs.libvirt_lab`), and per-test directories live under
a fresh, short temp dir (unix socket paths must stay under 108 bytes, which pytest's own
``tmp_path`` names can exceed).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from spice_libvirt.errors import LinkError
from spice_libvirt.spice.constants import ChannelType, CommonCap
from spice_libvirt.spice.link import LinkMess
from spice_libvirt.spice.transport import TLSSettings, open_link
from spice_libvirt_lab.guest import GuestImages, ensure_linux_guest, kvm_usable
from spice_libvirt_lab.libvirt_state import LabState
from spice_libvirt_lab.qemu_process import QemuGroup
from spice_libvirt_lab.tls import TlsMaterial, generate_tls_material
from tests import honest_skips
from tests.honest_skips import (  # noqa: F401  (hooks: a skipped real test fails the run)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
from tests.rigs import unit
from tests.rigs.libvirt_lab import lab_directory, running_lab
from tests.rigs.viewer import XServer, missing_tools, xvfb


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.hookimpl(tryfirst=True)  # before xdist's: ``-m unit`` runs on two workers
def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM ends the run as Ctrl-C does: the fixtures' teardown brings every lab, VM and
    daemon down (``scripts/test.sh`` forwards it; a background pytest ignores SIGINT)."""
    signal.signal(signal.SIGTERM, _interrupted)
    unit.spread(config)


@pytest.hookimpl(tryfirst=True)  # before -m selects: the unit marker must be there by then
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    honest_skips.pytest_collection_modifyitems(config, items)
    unit.mark_items(items)


@pytest.fixture(scope="session")
def _stand_in_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unit.stand_ins(tmp_path_factory.mktemp("unit") / "bin")


@pytest.fixture(autouse=True)
def _unit_starts_nothing(request: pytest.FixtureRequest, _stand_in_bin: Path) -> Iterator[None]:
    """A unit test that starts QEMU, libvirtd, ip, Xvfb... fails (:mod:`tests.rigs.unit`)."""
    yield from unit.guard(request, _stand_in_bin)


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


@pytest.fixture(scope="module")
def shared_lab(request: pytest.FixtureRequest) -> Iterator[LabState]:
    """The module's two-host libvirt lab, shared by its tests: built with the options of the
    module's ``libvirt_lab`` mark (:func:`tests.rigs.libvirt_lab.lab_marks`), torn down and
    checked for leftovers after the module's last test.

    Tests find where the guest runs now with ``libvirt_lab.where``/``load_state``: an
    earlier test of the module may have moved it.
    """
    mark = request.node.get_closest_marker("libvirt_lab")
    with running_lab(**(mark.kwargs if mark is not None else {})) as state:
        yield state


@pytest.fixture
def libvirt_lab_dir() -> Iterator[Path]:
    """A directory for a libvirt lab the test builds itself; whatever it left there is torn
    down and checked for leftovers afterwards."""
    with lab_directory() as path:
        yield path


@pytest.fixture(scope="module")
def x_server() -> Iterator[XServer]:
    """A private Xvfb for remote-viewers (a skip, which fails the run, without the tools)."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    workdir = Path(tempfile.mkdtemp(prefix="slx-"))
    try:
        with xvfb(workdir) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


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
