"""A pytest plugin that makes a skipped test fail the run, unless skips are explicitly allowed.

Why: the suite's value is that it runs real QEMU, real libvirtd, real network namespaces and
real SPICE clients. On a machine without root or without a usable ``/dev/kvm`` those tests
*skip*, and a run that skipped them all would still exit 0 — a green CI that proved nothing.
So a skip turns the exit status into a failure unless the run says explicitly that skips are
acceptable (``SPICE_LIBVIRT_ALLOW_SKIPS=1``); either way every skipped test is listed.

Every skip counts, not only those of tests marked ``qemu`` or ``libvirt``: after
``scripts/setup.sh`` this machine has everything every test needs, the namespace and delay
bridge suites need root without being marked, and a skip of any kind means the run proved
less than it says. Each listed skip says why the test is a real-component one when it is:
marked ``qemu``/``libvirt`` (``pyproject.toml``), or using a fixture that starts or needs QEMU
(:data:`REAL_FIXTURES`) whether marked or not. A test module skipped whole at collection
(``pytest.importorskip`` at module level) is counted too: its tests are not even known.

``tests/conftest.py`` imports the hooks; the self-test runs this module with ``-p``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

#: The opt-out: set to 1 to let a run with skipped real tests pass (they are still listed).
ALLOW_ENV = "SPICE_LIBVIRT_ALLOW_SKIPS"
REAL_MARKERS = ("qemu", "libvirt")
#: Fixtures (tests/conftest.py) that start QEMU, libvirtd or X, or exist only for tests that do.
REAL_FIXTURES = (
    "qemu_factory",
    "require_kvm",
    "guest_images",
    "shared_lab",
    "libvirt_lab_dir",
    "x_server",
)


@dataclass(frozen=True)
class Skipped:
    nodeid: str
    why_real: str
    reason: str


@dataclass
class _State:
    real: dict[str, str] = field(default_factory=dict)  # nodeid -> why it is real
    skipped: list[Skipped] = field(default_factory=list)


_STATE = pytest.StashKey[_State]()


def _state(config: pytest.Config) -> _State:
    if _STATE not in config.stash:
        config.stash[_STATE] = _State()
    return config.stash[_STATE]


def why_real(item: pytest.Item) -> str | None:
    """Why ``item`` counts as a real-component test, or None."""
    for name in REAL_MARKERS:
        if item.get_closest_marker(name) is not None:
            return f"marked {name}"
    fixtures = getattr(item, "fixturenames", ())
    for name in REAL_FIXTURES:
        if name in fixtures:
            return f"uses {name}"
    return None


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = _state(config)
    for item in items:
        why = why_real(item)
        if why is not None:
            state.real[item.nodeid] = why


# Reports carry no config; they wait here and move into the session's state at its end.
_PENDING: list[Skipped] = []


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _PENDING.append(Skipped(report.nodeid, "whole module skipped", _reason(report)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    _PENDING.append(Skipped(report.nodeid, "", _reason(report)))


def _skips(config: pytest.Config) -> list[Skipped]:
    state = _state(config)
    while _PENDING:
        s = _PENDING.pop(0)
        why = s.why_real or state.real.get(s.nodeid, "not marked")
        state.skipped.append(Skipped(s.nodeid, why, s.reason))
    return state.skipped


def _allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "") not in ("", "0")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skips(session.config) and not _allowed() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    skipped = _skips(config)
    if not skipped:
        return
    allowed = _allowed()
    real = sum(s.why_real != "not marked" for s in skipped)
    title = f"{len(skipped)} tests skipped, {real} of them marked or using QEMU fixtures"
    title += f" (allowed by {ALLOW_ENV})" if allowed else ""
    terminalreporter.section(title, sep="=", red=not allowed, yellow=allowed)
    for s in skipped:
        terminalreporter.line(f"SKIPPED {s.nodeid} [{s.why_real}]: {s.reason}")
    if not allowed:
        terminalreporter.line(
            f"{len(skipped)} test(s) did not run: the run FAILS. Run scripts/setup.sh, as "
            f"root, with a usable /dev/kvm; or set {ALLOW_ENV}=1 to accept the skips.",
            red=True,
        )
