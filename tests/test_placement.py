"""Where the VM runs after a failure, decided from both ends (pure), and the undo runner.

Every pair of end states is covered: a verdict must never claim a host the evidence does
not show, and an exit code must never say "still on the source" when that is unknown.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import get_args

import pytest

from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.placement import (
    EndState,
    decide_placement,
    run_to_completion,
)
from spice_libvirt.migration.report import Endpoint, MigrationFigures, MigrationReport

STATES: tuple[EndState, ...] = get_args(EndState)


@pytest.mark.parametrize(
    ("source", "destination", "placement"),
    [
        ("running", "incoming", "source"),
        ("running", "absent", "source"),
        ("running", "unknown", "source"),
        ("stopped", "running", "destination"),
        ("unknown", "running", "destination"),
        ("absent", "running", "destination"),
        ("running", "running", "both"),
        ("paused", "absent", "source"),
        ("paused", "incoming", "source"),
        ("stopped", "paused", "destination"),
        ("paused", "paused", "unknown"),
        ("unknown", "incoming", "unknown"),
        ("unknown", "unknown", "unknown"),
        ("stopped", "absent", "none"),
        ("absent", "incoming", "none"),
    ],
)
def test_placement_table(source: EndState, destination: EndState, placement: str) -> None:
    verdict = decide_placement(source, destination)
    assert verdict.placement == placement
    assert f"source {source}" in verdict.reason
    assert f"destination {destination}" in verdict.reason


@pytest.mark.parametrize(("source", "destination"), list(itertools.product(STATES, STATES)))
def test_placement_never_claims_an_end_that_does_not_hold_the_guest(
    source: EndState, destination: EndState
) -> None:
    placement = decide_placement(source, destination).placement
    holds = ("running", "paused")
    if placement == "source":
        assert source in holds
        assert destination != "running"
    if placement == "destination":
        assert destination in holds
        assert source != "running"
    if "running" in (source, destination):
        assert placement in ("source", "destination", "both")


def _report(status: str | None, outcome: str, placement: str | None) -> MigrationReport:
    import datetime as dt

    return MigrationReport.model_validate(
        {
            "outcome": outcome,
            "started_at": dt.datetime.now(dt.UTC),
            "source": Endpoint(qmp="s"),
            "destination": Endpoint(qmp="d"),
            "migrate_uri": "tcp:x:1",
            "client_target": "x:1",
            "migration": MigrationFigures(status=status),
            "placement": placement,
        }
    )


@pytest.mark.parametrize(
    ("status", "outcome", "placement", "code"),
    [
        ("failed", "failed", "source", ExitCode.MIGRATION_FAILED),
        ("failed", "failed", "unknown", ExitCode.PLACEMENT_UNKNOWN),
        ("failed", "failed", "both", ExitCode.PLACEMENT_UNKNOWN),
        ("failed", "failed", "none", ExitCode.PLACEMENT_UNKNOWN),
        ("completed", "seamless", "destination", ExitCode.OK),
        ("completed", "switch-host", "destination", ExitCode.NOT_SEAMLESS),
        ("completed", "seamless", None, ExitCode.OK),
        ("cancelled", "cancelled", "source", ExitCode.MIGRATION_FAILED),
    ],
)
def test_exit_code_says_where_the_vm_runs(
    status: str, outcome: str, placement: str | None, code: ExitCode
) -> None:
    assert for_report(_report(status, outcome, placement)) is code


async def test_an_undo_step_finishes_even_when_cancelled_twice() -> None:
    done = asyncio.Event()
    started = asyncio.Event()

    async def undo() -> str:
        started.set()
        await asyncio.sleep(0.2)  # the step itself takes a while (a libvirt call)
        done.set()
        return "undone"

    async def caller() -> str | None:
        return await run_to_completion(undo(), 5.0, "test undo")

    task = asyncio.create_task(caller())
    await started.wait()
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done.is_set()


async def test_an_undo_step_is_bounded() -> None:
    never = asyncio.Event()
    assert await run_to_completion(never.wait(), 0.05, "test undo") is None
