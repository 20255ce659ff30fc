"""The honest-CI plugin (tests/honest_skips.py): a skipped test fails the run unless allowed.

Each case runs pytest in a subprocess on a small project of its own (a qemu-marked test, an
unmarked test using ``qemu_factory``, a plain one, a module skipped at collection), with the
plugin loaded by ``-p`` exactly as tests/conftest.py loads it for the real suite. The last
case does it on the real suite: a ``require_kvm`` test made to skip by
``SPICE_LIBVIRT_TEST_PRETEND_NO_KVM=1`` fails ``scripts/test.sh``'s pytest step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_INI = """[pytest]
markers =
    qemu: starts real QEMU processes
    libvirt: starts real libvirtd instances
"""
_CONFTEST = """import pytest

@pytest.fixture
def qemu_factory():
    return object()
"""
_TESTS = """import os
import pytest

NO_KVM = os.environ.get("PRETEND_NO_KVM") == "1"

@pytest.mark.qemu
def test_marked():
    if NO_KVM:
        pytest.skip("/dev/kvm is not usable on this host")

def test_unmarked_but_starts_qemu(qemu_factory):
    if NO_KVM:
        pytest.skip("/dev/kvm is not usable on this host")

def test_plain():
    assert True

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    raise AssertionError
"""


def _project(tmp_path: Path, *, module_skip: bool = False, failing: bool = False) -> Path:
    (tmp_path / "pytest.ini").write_text(_INI)
    (tmp_path / "conftest.py").write_text(_CONFTEST)
    (tmp_path / "test_things.py").write_text(
        _TESTS + ("\ndef test_broken():\n    assert False\n" if failing else "")
    )
    if module_skip:
        (tmp_path / "test_optional.py").write_text(
            "import pytest\npytest.importorskip('no_such_module_for_sure')\n"
            "def test_never_known():\n    pass\n"
        )
    return tmp_path


def _pytest(project: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("SPICE_LIBVIRT_ALLOW_SKIPS",)}
    full.update({"PYTHONPATH": str(REPO), **env})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.honest_skips", "-p", "no:cacheprovider",
         "-q", str(project)],
        cwd=project, env=full, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_no_skip_no_section(tmp_path: Path) -> None:
    proc = _pytest(_project(tmp_path))
    assert proc.returncode == 0, proc.stdout
    assert "skipped" not in proc.stdout
    assert "1 xfailed" in proc.stdout  # an expected failure is not a skip


def test_skipped_real_tests_fail_the_run_with_a_list(tmp_path: Path) -> None:
    proc = _pytest(_project(tmp_path, module_skip=True), PRETEND_NO_KVM="1")
    print(proc.stdout)
    assert proc.returncode == 1
    out = proc.stdout
    assert "3 tests skipped, 3 of them marked or using QEMU fixtures" in out
    assert "SKIPPED test_things.py::test_marked [marked qemu]: /dev/kvm is not usable" in out
    assert (
        "SKIPPED test_things.py::test_unmarked_but_starts_qemu [uses qemu_factory]: "
        "/dev/kvm is not usable" in out
    )
    assert "SKIPPED test_optional.py [whole module skipped]: could not import" in out
    assert "the run FAILS" in out
    assert "SPICE_LIBVIRT_ALLOW_SKIPS=1" in out


def test_opt_out_passes_and_still_lists(tmp_path: Path) -> None:
    proc = _pytest(_project(tmp_path), PRETEND_NO_KVM="1", SPICE_LIBVIRT_ALLOW_SKIPS="1")
    assert proc.returncode == 0, proc.stdout
    assert "(allowed by SPICE_LIBVIRT_ALLOW_SKIPS)" in proc.stdout
    assert "SKIPPED test_things.py::test_marked [marked qemu]" in proc.stdout
    assert "the run FAILS" not in proc.stdout


def test_a_failure_stays_a_failure(tmp_path: Path) -> None:
    proc = _pytest(_project(tmp_path, failing=True), PRETEND_NO_KVM="1")
    assert proc.returncode == 1
    assert "1 failed" in proc.stdout
    proc = _pytest(_project(tmp_path, failing=True), SPICE_LIBVIRT_ALLOW_SKIPS="1")
    assert proc.returncode == 1


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "pytest").exists(), reason="no .venv")
def test_the_real_suite_fails_when_kvm_tests_skip() -> None:
    """scripts/test.sh runs ``.venv/bin/pytest -q ARGS``: the same, on a QEMU test module
    whose every test needs ``require_kvm`` (they all skip at set-up: no QEMU starts)."""
    env = {k: v for k, v in os.environ.items() if k != "SPICE_LIBVIRT_ALLOW_SKIPS"}
    env["SPICE_LIBVIRT_TEST_PRETEND_NO_KVM"] = "1"
    argv = [str(REPO / ".venv/bin/pytest"), "-q", "-p", "no:cacheprovider", "tests/test_qmp.py"]
    proc = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 1
    assert "[marked qemu]: /dev/kvm is not usable on this host" in proc.stdout
    assert "the run FAILS" in proc.stdout
    env["SPICE_LIBVIRT_ALLOW_SKIPS"] = "1"
    allowed = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert allowed.returncode == 0, allowed.stdout[-3000:]
    assert "(allowed by SPICE_LIBVIRT_ALLOW_SKIPS)" in allowed.stdout
