"""The fault matrix on the libvirt path: two libvirtds in namespaces, a client 300 ms away.

Each test breaks one real migration at an observed moment -- the CLI interrupted by SIGINT
or SIGTERM in each phase, the destination QEMU killed, a libvirtd restarted -- and then
checks the invariants of :mod:`tests.faults` on both hosts: the domain runs on exactly one,
no migration job is left, QEMU's max-bandwidth is what it was before the hold, and the exit
code is the documented one. The issue's bug is the first test: Ctrl-C during the hold left
the job crawling at 4 KiB/s with the domain paused on the destination.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt.cli import main as cli_main
from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.lab import libvirt_lab, netns
from spice_libvirt.lab.libvirt_status import where
from tests import faults
from tests.lab_marks import LIBVIRT_LAB

pytest.importorskip("libvirt")

pytestmark = LIBVIRT_LAB

RTT_MS = 300.0
#: after the CLI exits, the hosts must be settled at once; this bound only absorbs
#: libvirt's own bookkeeping (the destination's incoming domain being torn down)
SETTLE_S = 10.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="sfm-"))
    prefix = None
    try:
        rc = cli_main(
            ["lab", "--dir", str(base), "up", "--libvirt", "--client-rtt-ms", str(RTT_MS)]
        )
        assert rc == 0
        state = libvirt_lab.load_state(base / "libvirt")
        assert state is not None
        prefix = state.prefix
        yield base
    finally:
        libvirt_lab.down(base / "libvirt")
        assert prefix is None or not [n for n in netns.list_names() if n.startswith(prefix)]
        shutil.rmtree(base, ignore_errors=True)


def _uris(lab: Path) -> tuple[str, dict[str, str], str]:
    state = libvirt_lab.load_state(lab / "libvirt")
    assert state is not None
    uris = {name: h.uri_unix for name, h in state.hosts.items()}
    return state.domain, uris, where(state)


def _bandwidth_before(uris: dict[str, str], domain: str, host: str) -> int | None:
    return faults.libvirt_host_view(uris[host], domain).qemu_max_bandwidth


def _check_left_clean(
    uris: dict[str, str], domain: str, bandwidth: int | None, expect_on: str | None
) -> str:
    """The invariants after a fault; the host the domain runs on."""
    assert faults.wait_for(
        lambda: faults.settled(faults.libvirt_views(uris, domain)), SETTLE_S, 0.1
    ), faults.libvirt_views(uris, domain)
    views = faults.libvirt_views(uris, domain)
    (host,) = faults.running_on(views)
    if expect_on is not None:
        assert host == expect_on, views
    assert views[host].qemu_max_bandwidth == bandwidth, views
    return host


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_during_the_hold_leaves_no_job_and_no_throttle(lab: Path, sig: int) -> None:
    """Issue 8's bug: ``lab migrate`` interrupted while the job is held at 4 KiB/s."""
    domain, uris, source = _uris(lab)
    before = _bandwidth_before(uris, domain, source)
    run = faults.run_cli_interrupted(
        ["lab", "--dir", str(lab), "migrate", "--json"],
        lambda: faults.throttled(uris[source], domain),
        sig,
    )
    assert run.signalled_after_s is not None, run.stderr
    expected = ExitCode.INTERRUPTED if sig == signal.SIGINT else ExitCode.TERMINATED
    assert run.returncode == expected, run.stderr
    assert "undone" in run.stderr, run.stderr
    assert "the domain runs on: source" in run.stderr, run.stderr
    _check_left_clean(uris, domain, before, expect_on=source)


def test_sigint_in_the_preflight_changes_nothing(lab: Path) -> None:
    domain, uris, source = _uris(lab)
    before = _bandwidth_before(uris, domain, source)
    run = faults.run_cli_interrupted(
        ["lab", "--dir", str(lab), "migrate", "--json", "--no-watch"], None, signal.SIGINT
    )
    assert run.returncode in (ExitCode.INTERRUPTED, ExitCode.OK), run.stderr
    host = _check_left_clean(uris, domain, before, expect_on=None)
    if run.returncode == ExitCode.INTERRUPTED:
        assert host == source
