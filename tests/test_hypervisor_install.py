"""What a hypervisor gets: the product's wheel alone, hashed, from a private wheelhouse.

The wheelhouse is built by the role's own builder (``ansible/roles/spice_libvirt/files/
wheelhouse.py``, as the role runs it on the controller) from a frozen copy of this tree,
offline (the dependency wheels come from the same local cache the Ansible tests use). Then,
for real:

* the product wheel holds ``spice_libvirt`` only: no lab module, no ``lab`` command, two
  console scripts; no lab distribution is in the wheelhouse;
* ``requirements.txt`` pins and hashes every wheel; a changed wheel is refused when the
  wheelhouse is reused; a wheelhouse directory that is a symlink, or whose parent is
  writable by others, is refused before anything is built;
* a clean venv installs it with ``pip --no-index --require-hashes`` exactly as the role
  does, and there ``hook``, ``agent``, ``doctor`` and ``migrate --help`` work, while
  ``spice-libvirt lab`` says in one line what to install (exit 10) and
  ``spice_libvirt_lab`` does not import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from spice_libvirt.cli import LAB_NOT_INSTALLED
from spice_libvirt.exitcodes import ExitCode
from tests.test_ansible import _wheelhouse_module
from tests.test_ansible_ssh import CONSTRAINTS, ROLE, _snapshot_source, find_links  # noqa: F401

pytestmark = [pytest.mark.slow]

WHEELHOUSE = ROLE / "files" / "wheelhouse.py"


def _run(
    argv: list[str], *, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=300, check=False, env=env, input=stdin
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, find_links: Path) -> dict[str, object]:  # noqa: F811
    """The wheelhouse of this tree, as the role builds it (private dir, offline)."""
    root = tmp_path_factory.mktemp("hv-install")
    root.chmod(0o700)
    source = _snapshot_source(root / "src")
    proc = _run(
        [
            sys.executable, str(WHEELHOUSE), "--out", str(root / "private" / "wheelhouse"),
            "--source", str(source), "--constraints", str(CONSTRAINTS),
            "--pip-arg=--no-index", "--pip-arg=--find-links", f"--pip-arg={find_links}",
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info: dict[str, object] = json.loads(proc.stdout)
    info["root"] = root
    return info


def test_product_wheel_holds_no_lab(built: dict[str, object]) -> None:
    out = Path(str(built["dir"]))
    wheels = sorted(p.name for p in (out / "wheels").glob("*.whl"))
    assert wheels == built["wheels"]
    assert not [w for w in wheels if "lab" in w], wheels  # no spice_libvirt_lab distribution
    with zipfile.ZipFile(out / "wheels" / str(built["project_wheel"])) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"spice_libvirt"}, top
    assert not [n for n in names if "lab" in n.rsplit("/", 1)[-1]], names
    scripts = [line.split("=")[0].strip() for line in entry_points.splitlines() if "=" in line]
    assert sorted(scripts) == ["spice-libvirt", "spice-libvirt-hook"]
    # the wheelhouse directory is private, its tar's members root's and 0644
    assert out.stat().st_mode & 0o777 == 0o700
    import tarfile

    with tarfile.open(str(built["tar"])) as tar:
        members = tar.getmembers()
    assert sorted(m.name for m in members) == wheels
    assert {(m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0o644)}


def test_every_wheel_is_hashed_and_checked_again_on_reuse(built: dict[str, object]) -> None:
    out = Path(str(built["dir"]))
    reqs = [ln for ln in str(built["requirements"]).splitlines() if not ln.startswith("#")]
    assert len(reqs) == len(list((out / "wheels").glob("*.whl")))
    assert all("==" in r and " --hash=sha256:" in r for r in reqs), reqs
    assert "spice-libvirt==" in str(built["requirements"])
    wh = _wheelhouse_module()
    assert wh.describe(out)["requirements"] == built["requirements"]
    # a copy of the wheelhouse with one wheel changed after the build: refused on reuse
    copy = Path(str(built["root"])) / "tampered" / "wheelhouse"
    shutil.copytree(out, copy)
    copy.parent.chmod(0o700)
    victim = next((copy / "wheels").glob("rich-*.whl"))
    with zipfile.ZipFile(victim, "a") as zf:
        zf.writestr("rich/extra.py", "print('not from the index')\n")
    with pytest.raises(wh.WheelhouseError, match="do not match the hashes"):
        wh.describe(copy)


@pytest.mark.root  # a directory chowned to another user
def test_wheelhouse_directory_must_be_private(tmp_path: Path) -> None:
    wh = _wheelhouse_module()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # like /tmp
    proc = _run([sys.executable, str(WHEELHOUSE), "--out", str(shared / "wh"), "--no-build"])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "writable by group or others" in proc.stderr, proc.stderr
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(wh.WheelhouseError, match="is a symlink"):
        wh.private_dir(tmp_path / "link")
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)  # nobody's
    with pytest.raises(wh.WheelhouseError, match="belongs to uid 65534"):
        wh.private_dir(other / "wh")


def _venv_run(
    venv: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(venv)}
    return _run([str(venv / "bin" / argv[0]), *argv[1:]], env={**base, **(env or {})})


@pytest.mark.skipif(shutil.which("python3") is None, reason="no system python3")
@pytest.mark.slow  # a fresh venv installing the wheelhouse
def test_clean_venv_installs_the_wheelhouse_and_runs_without_the_lab(
    built: dict[str, object],
) -> None:
    root = Path(str(built["root"]))
    wheels = Path(str(built["dir"])) / "wheels"
    reqs = root / "requirements.txt"
    reqs.write_text(str(built["requirements"]))
    venv = root / "venv"
    assert _run(["python3", "-m", "venv", str(venv)]).returncode == 0
    pip = _venv_run(
        venv, "python", "-m", "pip", "install", "--quiet", "--no-index", "--no-cache-dir",
        "--disable-pip-version-check", "--require-hashes", "--find-links", str(wheels),
        "--requirement", str(reqs), env={"PIP_CONFIG_FILE": "/dev/null"},
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    freeze = _venv_run(venv, "python", "-m", "pip", "list", "--format=json").stdout
    installed = {d["name"].lower() for d in json.loads(freeze)}
    assert "spice-libvirt" in installed
    assert not [n for n in installed if "lab" in n], installed

    # the lab is not there, and says so in one line
    lab = _venv_run(venv, "spice-libvirt", "lab", "up")
    assert lab.returncode == int(ExitCode.LAB)
    assert lab.stderr == f"spice-libvirt: lab: {LAB_NOT_INSTALLED}\n"
    assert lab.stdout == ""
    assert _venv_run(venv, "python", "-c", "import spice_libvirt_lab").returncode == 1

    # what a hypervisor runs
    assert _venv_run(venv, "spice-libvirt", "migrate", "--help").returncode == 0
    hooks = root / "hooks"
    config = root / "config.toml"
    config.write_text(f'journal_path = "{root / "journal.sqlite3"}"\n')
    status = _venv_run(venv, "spice-libvirt", "hook", "status", "--json", "--hooks-dir", str(hooks))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["installed"] is False
    install = _venv_run(
        venv, "spice-libvirt", "hook", "install", "--hooks-dir", str(hooks), "--config", str(config)
    )
    assert install.returncode == 0, install.stderr
    status = _venv_run(venv, "spice-libvirt", "hook", "status", "--json", "--hooks-dir", str(hooks))
    assert json.loads(status.stdout)["target_ok"] is True
    selftest = _venv_run(
        venv, "spice-libvirt-hook", "--self-test", env={"SPICE_LIBVIRT_CONFIG": str(config)}
    )
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    # the shim itself, as libvirtd would run it (no domain XML on stdin for "release")
    shim = _run(
        [str(hooks / "qemu.d" / "50-spice-libvirt"), "vm1", "release", "end", "-"], stdin=""
    )
    assert shim.returncode == 0, shim.stderr
    unit = _venv_run(venv, "spice-libvirt", "agent", "unit")
    assert unit.returncode == 0, unit.stderr
    assert f"ExecStart={venv / 'bin' / 'spice-libvirt'} agent run" in unit.stdout.splitlines()
    agent = _venv_run(venv, "spice-libvirt", "agent", "status", "--state-dir", str(root / "agent"))
    assert agent.returncode == int(ExitCode.FAILURE), agent.stderr  # no agent runs here
    assert "no agent status" in agent.stdout
    doctor = _venv_run(
        venv, "spice-libvirt", "doctor", "--json", "--hooks-dir", str(hooks), "--config", str(config),
        "--connect", f"qemu:///system?socket={root / 'no-libvirtd.sock'}",
    )  # fmt: skip
    assert doctor.returncode == int(ExitCode.NOT_READY), doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["hook-installed"]["status"] == "ok", checks
    assert checks["libvirt"]["status"] == "fail", checks
