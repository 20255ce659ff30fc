"""What each domain's request of an evacuation says, without libvirt: the hold mode a
parallel drain defaults to (:mod:`spice_libvirt.libvirt.evacuate`)."""

from __future__ import annotations

from typing import Any

import pytest

from spice_libvirt.libvirt import evacuate as evacuation
from spice_libvirt.libvirt.errors import PreflightError
from spice_libvirt.libvirt.request import LibvirtMigrationReport, LibvirtMigrationRequest


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[LibvirtMigrationRequest]:
    """The requests the evacuation made (no migration runs: each fails at once)."""
    requests: list[LibvirtMigrationRequest] = []

    async def domains(_uri: str) -> tuple[list[str], list[Any]]:
        return ["vm1", "vm2"], []

    async def migrate(request: LibvirtMigrationRequest, *_: Any) -> LibvirtMigrationReport:
        requests.append(request)
        raise PreflightError("not run: a unit test")

    monkeypatch.setattr(evacuation, "spice_domains", domains)
    monkeypatch.setattr(evacuation, "migrate_libvirt", migrate)
    return requests


@pytest.mark.parametrize(
    ("parallel", "options", "mode"),
    [
        (1, {}, "switchover"),  # one at a time: the memory moves while the client links
        (2, {}, "bulk"),  # a drain: the floor from setup (measured faster, see the module)
        (8, {"hold_mode": "switchover"}, "switchover"),  # the operator's choice wins
        (1, {"hold_mode": "bulk"}, "bulk"),
    ],
)
async def test_a_parallel_drain_holds_from_the_start_unless_told(
    asked: list[LibvirtMigrationRequest], parallel: int, options: dict[str, Any], mode: str
) -> None:
    report = await evacuation.evacuate(
        "qemu:///system", "qemu+tcp://b/system", parallel=parallel, options=options
    )
    assert [d.outcome for d in report.domains] == ["failed", "failed"]
    assert [r.hold_mode for r in asked] == [mode, mode]
