"""scripts/setup.sh in a sandbox: one line per step it performs, silence otherwise, and no
edit of the machine's libvirt configuration.

The script runs from a copy in a temporary "repository" with stub ``dpkg-query``,
``apt-cache``, ``apt-get`` and ``debconf-set-selections`` first on ``PATH`` and a stub venv
interpreter, so nothing on the machine is installed or changed; the stubs log their calls.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "setup.sh"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPT, root / "scripts" / "setup.sh")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (root / "lab").mkdir()
    (root / "lab" / "pyproject.toml").write_text("[project]\nname = 'x-lab'\n")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    log = tmp_path / "calls.log"
    _stub(venv_bin / "python", f'echo "venv-python $*" >> {log}\n')
    both = (root / "pyproject.toml").read_bytes() + (root / "lab" / "pyproject.toml").read_bytes()
    digest = hashlib.sha256(both).hexdigest()
    (root / ".venv" / ".spice-libvirt-setup").write_text(digest + "\n")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    _stub(
        stubs / "dpkg-query",
        # the package is the last argument; $MISSING lists the ones "not installed"
        'for last; do :; done\ncase " $MISSING " in *" $last "*) exit 1;; esac\n'
        "printf 'install ok installed'\n",
    )
    _stub(stubs / "apt-cache", "echo 'linux-image-amd64:'; echo '  Candidate: 6.1.0-1'\n")
    _stub(stubs / "apt-get", f'echo "apt-get $*" >> {log}\n')
    _stub(stubs / "debconf-set-selections", "cat >/dev/null\n")
    return tmp_path


def _setup(sandbox: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": f"{sandbox / 'bin'}:/usr/bin:/bin",
        "SETUP_SKIP_GUEST": "1",
        "PYTHON": shutil.which("python3") or "python3",
        "MISSING": "",
        **env,
    }
    return subprocess.run(
        ["bash", str(sandbox / "repo" / "scripts" / "setup.sh")],
        env=full, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _calls(sandbox: Path) -> list[str]:
    log = sandbox / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_nothing_to_do_prints_nothing(sandbox: Path) -> None:
    proc = _setup(sandbox)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    # the venv check ran, nothing was installed
    assert [c for c in _calls(sandbox) if not c.startswith("venv-python -c")] == []


@pytest.mark.root  # as_root would ask sudo
def test_each_step_performed_is_one_line(sandbox: Path) -> None:
    (sandbox / "repo" / ".venv" / ".spice-libvirt-setup").write_text("stale\n")
    proc = _setup(sandbox, MISSING="gcc ruby")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "setup: refreshing the apt package lists",
        "setup: installing 2 Debian packages: gcc ruby",
        "setup: installing spice-libvirt (dev, libvirt, client extras) and spice-libvirt-lab into .venv",
    ]
    calls = _calls(sandbox)
    assert "apt-get update -q" in calls
    assert "apt-get install -y -q gcc ruby" in calls
    assert any(c.startswith("venv-python -m pip install -q -e ") for c in calls)
    # and the second run has nothing left to do
    assert _setup(sandbox).stdout == ""


@pytest.mark.root  # as_root would ask sudo
def test_vagrant_packages_by_default_and_an_opt_out(sandbox: Path) -> None:
    """The Vagrant lab's test runs in scripts/test.sh by default, so setup installs its
    packages; SPICE_LIBVIRT_VAGRANT=0 leaves them out (and test.sh its test)."""
    assert _setup(sandbox, MISSING="mmdebstrap", SPICE_LIBVIRT_VAGRANT="0").stdout == ""
    proc = _setup(sandbox, MISSING="mmdebstrap")
    assert proc.returncode == 0, proc.stderr
    assert "setup: installing 1 Debian packages: mmdebstrap" in proc.stdout.splitlines()
    assert "apt-get install -y -q mmdebstrap" in _calls(sandbox)
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    assert 'select=(-m "not vagrant")' in test_sh
    assert 'SPICE_LIBVIRT_VAGRANT:-1}" = 0' in test_sh


def test_the_machines_libvirt_configuration_is_left_alone() -> None:
    """No line of the script (comments aside) names /etc/libvirt or qemu.conf."""
    code = [
        line
        for line in SCRIPT.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert not [line for line in code if "/etc/libvirt" in line or "qemu.conf" in line]
