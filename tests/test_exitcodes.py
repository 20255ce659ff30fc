"""The one exit-code policy (:mod:`spice_libvirt.exitcodes`), table by table, without QEMU.

Every command that migrates (``migrate`` in both forms, ``lab migrate``, ``watch``,
``evacuate``) takes its code from here; these tables are the contract management tools
branch on.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from spice_libvirt import errors
from spice_libvirt.exitcodes import (
    EXIT_CODE_HELP,
    ExitCode,
    for_client_record,
    for_error,
    for_evacuation,
    for_report,
    worst,
)
from spice_libvirt.migration.report import MigrationReport

OK, FAILED, NOT_SEAMLESS, TLS_DOWN = (
    ExitCode.OK,
    ExitCode.MIGRATION_FAILED,
    ExitCode.NOT_SEAMLESS,
    ExitCode.TLS_DOWNGRADED,
)


def report(
    outcome: str,
    status: str | None,
    tls_downgraded: bool | None = None,
    placement: str | None = None,
) -> object:
    """A verdict as the policy reads it; ``None``: the field is absent (older reports)."""
    fields: dict[str, object] = {"outcome": outcome, "migration": SimpleNamespace(status=status)}
    if tls_downgraded is not None:
        fields["tls_downgraded"] = tls_downgraded
    if placement is not None:
        fields["placement"] = placement
    return SimpleNamespace(**fields)


# (outcome, migration status, tls_downgraded, expected code)
REPORT_TABLE = [
    ("seamless", "completed", None, OK),
    ("seamless", "completed", False, OK),
    ("no-client", "completed", None, OK),
    ("semi-seamless", "completed", None, NOT_SEAMLESS),
    ("switch-host", "completed", None, NOT_SEAMLESS),
    # a client that broke while the VM moved: the VM runs on the destination, not 7
    ("failed", "completed", None, NOT_SEAMLESS),
    # the VM did not move
    ("failed", "failed", None, FAILED),
    ("cancelled", "cancelled", None, FAILED),
    ("cancelled", None, None, FAILED),
    ("failed", None, None, FAILED),
    ("failed", "active", None, FAILED),
    ("seamless", "failed", None, FAILED),
    # TLS lost: after "did not move", before "not seamless"
    ("seamless", "completed", True, TLS_DOWN),
    ("no-client", "completed", True, TLS_DOWN),
    ("switch-host", "completed", True, TLS_DOWN),
    ("semi-seamless", "completed", True, TLS_DOWN),
    ("failed", "completed", True, TLS_DOWN),
    ("cancelled", "cancelled", True, FAILED),
    ("failed", "failed", True, FAILED),
]


# (outcome, status, tls_downgraded, placement, expected): where the VM runs comes first
PLACEMENT_TABLE = [
    ("seamless", "completed", None, "destination", OK),
    ("failed", "failed", None, "source", FAILED),
    ("cancelled", "cancelled", True, "source", FAILED),
    ("seamless", "completed", True, "destination", TLS_DOWN),
    ("failed", "failed", None, "both", ExitCode.PLACEMENT_UNKNOWN),
    ("cancelled", "cancelled", None, "none", ExitCode.PLACEMENT_UNKNOWN),
    ("seamless", "completed", True, "unknown", ExitCode.PLACEMENT_UNKNOWN),
]


@pytest.mark.parametrize(("outcome", "status", "tls", "placement", "expected"), PLACEMENT_TABLE)
def test_placement_comes_first(
    outcome: str, status: str, tls: bool | None, placement: str, expected: ExitCode
) -> None:
    verdict = report(outcome, status, tls, placement)
    assert for_report(verdict) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("outcome", "status", "tls", "expected"), REPORT_TABLE)
def test_for_report(outcome: str, status: str | None, tls: bool | None, expected: ExitCode) -> None:
    assert for_report(report(outcome, status, tls)) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("outcome", "status", "tls", "expected"), REPORT_TABLE)
def test_for_report_on_the_real_model(
    outcome: str, status: str | None, tls: bool | None, expected: ExitCode
) -> None:
    """The same table through :class:`MigrationReport` (with or without the TLS field)."""
    base = MigrationReport.model_construct(outcome=outcome)
    real = base.model_copy(
        update={"migration": base.migration.model_copy(update={"status": status})}
    )
    if tls is not None:
        real = real.model_copy(update={"tls_downgraded": tls})
    assert for_report(real) is expected


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([], OK),
        ([OK, OK], OK),
        ([OK, NOT_SEAMLESS], NOT_SEAMLESS),
        ([NOT_SEAMLESS, TLS_DOWN, OK], TLS_DOWN),
        ([NOT_SEAMLESS, FAILED], FAILED),
        ([TLS_DOWN, ExitCode.UNREACHABLE, FAILED], ExitCode.UNREACHABLE),
        ([OK, FAILED, ExitCode.HYPERVISOR], FAILED),
    ],
)
def test_worst_of_a_batch(codes: list[ExitCode], expected: ExitCode) -> None:
    assert worst(codes) is expected


def domain(
    outcome: str,
    status: str | None = "completed",
    *,
    raised: ExitCode | None = None,
    tls: bool | None = None,
) -> SimpleNamespace:
    if raised is not None:
        return SimpleNamespace(report=None, exit_code=int(raised), outcome="failed")
    return SimpleNamespace(report=report(outcome, status, tls), exit_code=-1, outcome=outcome)


@pytest.mark.parametrize(
    ("domains", "expected"),
    [
        ([], OK),
        ([domain("seamless"), domain("no-client")], OK),
        ([domain("seamless"), domain("switch-host")], NOT_SEAMLESS),
        ([domain("switch-host"), domain("seamless", tls=True)], TLS_DOWN),
        ([domain("seamless", tls=True), domain("failed", "failed")], FAILED),
        ([domain("seamless"), domain("x", raised=ExitCode.UNREACHABLE)], ExitCode.UNREACHABLE),
    ],
)
def test_for_evacuation(domains: list[SimpleNamespace], expected: ExitCode) -> None:
    """Each domain's verdict goes through :func:`for_report`; errors keep their own code."""
    assert for_evacuation(SimpleNamespace(domains=domains)) is expected


@pytest.mark.parametrize(
    ("path", "tls", "expected"),
    [
        ("seamless", None, OK),
        ("semi-seamless", None, NOT_SEAMLESS),
        ("switch-host", None, NOT_SEAMLESS),
        ("cancelled", None, NOT_SEAMLESS),
        ("seamless", True, TLS_DOWN),
    ],
)
def test_for_client_record(path: str, tls: bool | None, expected: ExitCode) -> None:
    record = SimpleNamespace(path=path, **({} if tls is None else {"tls_downgraded": tls}))
    assert for_client_record(record) is expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (errors.ConfigError("x"), ExitCode.USAGE),
        (errors.LabError("x"), ExitCode.LAB),
        (errors.UnsafePathError("x"), ExitCode.UNSAFE_PATH),
        (errors.SpiceLibvirtError("x"), ExitCode.FAILURE),
        (RuntimeError("x"), ExitCode.FAILURE),
    ],
)
def test_for_error(exc: BaseException, expected: ExitCode) -> None:
    assert for_error(exc) is expected


def test_codes_are_stable_and_all_documented() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "FAILURE": 1,
        "USAGE": 2,
        "UNREACHABLE": 3,
        "PERMISSION_DENIED": 4,
        "PROTOCOL": 5,
        "TLS": 6,
        "MIGRATION_FAILED": 7,
        "NOT_SEAMLESS": 8,
        "HYPERVISOR": 9,
        "LAB": 10,
        "TLS_DOWNGRADED": 11,
        "PLACEMENT_UNKNOWN": 12,
        "NOT_READY": 13,
        "UNSAFE_PATH": 14,
        "CLIENT_LOST": 15,
        "INTERRUPTED": 130,
        "TERMINATED": 143,
    }
    assert set(EXIT_CODE_HELP) == set(ExitCode)


@pytest.mark.parametrize("command", [[], ["migrate"], ["lab"], ["evacuate"], ["watch"]])
def test_help_lists_the_exit_codes(command: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "exit codes:" in out
    for code, text in EXIT_CODE_HELP.items():
        assert f"{int(code):>3}  {text}" in out
