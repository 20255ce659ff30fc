"""The ``unit`` marker: every test that needs no QEMU, libvirtd, namespace, X server or root.

``pytest -m unit`` is the contributors' inner loop (no root needed, under a minute). A test
is *not* a unit test when it is marked ``qemu``, ``libvirt``, ``vagrant`` or ``root`` (needs
root: network namespaces, mounts, chown; skipped without it, which fails the run), or uses a fixture that starts a real component
(:data:`tests.honest_skips.REAL_FIXTURES`); every other test gets the marker at collection,
so a new test is a unit test unless it says otherwise.

A unit test is held to it: while it runs, ``$PATH`` starts with a directory of stand-ins
for the programs a real-component test starts (:data:`REAL_PROGRAMS`); a stand-in refuses
to run (a ``--version`` query excepted) and writes its name down, and the test then fails,
naming what it started. (A
stand-in for the check, not for the component: the tests that start the real thing carry
their marker and never see it.)

``pytest -m unit`` runs on two worker processes when pytest-xdist is installed (a dev
dependency; :func:`spread`): a third of the unit tests' wall is waiting on real deadlines
(the hook's watchdogs, the SPICE client's), which two workers overlap. ``-n 0`` runs them in
one process, ``-n N`` on N; any other selection, the whole suite included, runs in one.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.honest_skips import why_real

#: markers of tests that are never unit tests
NOT_UNIT_MARKERS = ("qemu", "libvirt", "vagrant", "root", "slow")

#: what a unit test must not start
REAL_PROGRAMS = (
    "qemu-system-x86_64",
    "qemu-img",
    "libvirtd",
    "virtlogd",
    "virsh",
    "ip",
    "unshare",
    "nsenter",
    "mount",
    "Xvfb",
    "remote-viewer",
    "vagrant",
    "sshd",
)

#: where the stand-ins write what was started (one line per start)
STARTED_ENV = "SPICE_LIBVIRT_TEST_STARTED"
#: ``$PATH`` without the stand-ins: where a version query finds the real program
REAL_PATH_ENV = "SPICE_LIBVIRT_TEST_REAL_PATH"

# A version or help query starts nothing: it goes to the real program (``hook install``
# asks ``libvirtd --version``); anything else is written down and refused.
_STAND_IN = f"""#!/bin/sh
name=$(basename "$0")
case "$*" in
--version|--help|-V)
    real=$(PATH="${{{REAL_PATH_ENV}:-/usr/bin:/bin}}" command -v "$name") && exec "$real" "$@"
    ;;
esac
echo "$name $*" >> "${{{STARTED_ENV}:-/dev/null}}"
echo "$name: not started: this is a unit test (tests/rigs/unit.py)" >&2
exit 127
"""


def is_unit(item: pytest.Item) -> bool:
    """Whether ``item`` needs none of the real components (see the module's docstring)."""
    if any(item.get_closest_marker(name) is not None for name in NOT_UNIT_MARKERS):
        return False
    return why_real(item) is None


def mark_items(items: list[pytest.Item]) -> None:
    """``unit`` on every unit test; a skip on a ``root`` test when not run as root."""
    as_root = os.geteuid() == 0
    for item in items:
        if is_unit(item):
            item.add_marker(pytest.mark.unit)
        elif not as_root and item.get_closest_marker("root") is not None:
            item.add_marker(pytest.mark.skip(reason="needs root"))


#: workers for ``pytest -m unit`` (this machine has two cores; more would only queue)
UNIT_WORKERS = 2


def spread(config: pytest.Config) -> None:
    """``-m unit`` alone, with pytest-xdist there and no ``-n`` given: run on
    :data:`UNIT_WORKERS` workers. Called from ``pytest_configure``, before xdist's own
    (``trylast``) turns ``tx`` into a distributed session; a worker never spreads again."""
    if hasattr(config, "workerinput") or importlib.util.find_spec("xdist") is None:
        return
    option = config.option
    if option.markexpr.strip() != "unit" or getattr(option, "numprocesses", None) is not None:
        return
    if not config.pluginmanager.hasplugin("xdist") or option.collectonly:
        return
    workers = min(UNIT_WORKERS, os.cpu_count() or 1)
    if workers > 1:
        option.numprocesses = workers
        option.tx = ["popen"] * workers
        if option.dist == "no":
            option.dist = "load"


def stand_ins(directory: Path) -> Path:
    """Write the stand-ins for :data:`REAL_PROGRAMS` into ``directory``; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in REAL_PROGRAMS:
        path = directory / name
        path.write_text(_STAND_IN)
        path.chmod(0o755)
    return directory


def guard(request: pytest.FixtureRequest, bin_dir: Path) -> Iterator[None]:
    """For a unit test: the stand-ins (in ``bin_dir``) first on ``$PATH``; the test fails
    if one of them was run."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    log = bin_dir.parent / "started.log"
    log.unlink(missing_ok=True)
    saved = {key: os.environ.get(key) for key in ("PATH", STARTED_ENV, REAL_PATH_ENV)}
    real_path = saved["PATH"] or "/usr/bin:/bin"
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{real_path}"
    os.environ[STARTED_ENV] = str(log)
    os.environ[REAL_PATH_ENV] = real_path
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if log.exists():
        started = log.read_text().splitlines()
        log.unlink()
        pytest.fail(
            f"a unit test started {started}: mark it (qemu, libvirt, vagrant or root) or "
            "use a real-component fixture, or keep it from starting anything",
            pytrace=False,
        )
