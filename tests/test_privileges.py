"""Root never runs code that someone else can change, and the agent's state stays private.

For real, as root, with files and directories owned by ``nobody`` (65534) or opened up to a
group: ``hook install`` and ``agent unit`` refuse such an interpreter, launcher, script or
directory with one line and exit 14 and write nothing; ``doctor`` finds the same problems in
what is installed; the agent's unit is sandboxed and names only its state and journal
directories as writable (``systemd-analyze verify`` reads it); ``agent run --state-dir``
refuses an existing directory that is not private, and makes a new one 0700 even under
umask 000.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spice_libvirt import trust
from spice_libvirt.agent import holdfile
from spice_libvirt.cli.agent import unit_text
from spice_libvirt.doctor.trust import check_agent_unit, check_hook_trust, exec_start
from spice_libvirt.errors import UnsafePathError
from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.hook import install as hook_install

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files of other users)")

NOBODY = 65534
REPO = Path(__file__).resolve().parent.parent


def _cli(
    *args: str, python: str = sys.executable, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "spice_libvirt.cli", *args],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


def _refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == int(ExitCode.UNSAFE_PATH), proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.fixture
def user_venv(tmp_path: Path) -> Path:
    """A user's venv (everything owned by nobody) that can run this checkout's code."""
    venv = tmp_path / "user-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    for path in (venv, *venv.rglob("*")):
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    return venv


def _user_env() -> dict[str, str]:
    """The checkout and its dependencies, seen by an interpreter outside the dev venv."""
    site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    return {"PYTHONPATH": f"{REPO}:{site}"}


# ------------------------------------------------------------------ the rule itself


def test_root_only_rule(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    good = tmp_path / "good"
    good.write_text("x")
    good.chmod(0o755)
    trust.require_root_only(good)
    trust.require_root_only(Path(sys.executable))  # a venv's python: a symlink to /usr/bin
    assert (Path("/tmp").stat().st_mode & 0o1777) == 0o1777  # sticky, root's: fine above us

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    (shared / "f").write_text("x")
    with pytest.raises(
        UnsafePathError, match=r"directory .*/shared is writable by its group \(mode 0775\)"
    ):
        trust.require_root_only(shared / "f", "launcher")
    good.chmod(0o646)
    with pytest.raises(UnsafePathError, match=r"launcher .*/good is writable by others"):
        trust.require_root_only(good, "launcher")
    good.chmod(0o755)
    os.chown(good, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="belongs to uid 65534, not root"):
        trust.require_root_only(good)
    # a root-owned link to a file someone else owns: the target counts
    (tmp_path / "link").symlink_to(good)
    with pytest.raises(UnsafePathError, match="belongs to uid 65534"):
        trust.require_root_only(tmp_path / "link")
    with pytest.raises(UnsafePathError, match="does not exist"):
        trust.require_root_only(tmp_path / "missing")
    # a tree: one writable file deep inside
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "mod.py").write_text("x")
    trust.require_root_only_tree(tree)
    (tree / "sub" / "mod.py").chmod(0o666)
    with pytest.raises(UnsafePathError, match=r"mod\.py is writable by its group and others"):
        trust.require_root_only_tree(tree)


def test_this_installation_passes() -> None:
    """The dev venv and checkout are root's: what the labs and tests install from."""
    trees = trust.package_trees()
    assert Path(hook_install.__file__).resolve().parent.parent in trees or any(
        Path(hook_install.__file__).resolve().is_relative_to(t) for t in trees
    )
    trust.require_runnable_by_root(interpreter=Path(sys.executable), trees=trees)


# ------------------------------------------------------------------ hook install


def test_hook_install_refuses_a_users_interpreter(tmp_path: Path, user_venv: Path) -> None:
    """``sudo spice-libvirt hook install`` from a user's venv: refused, nothing written."""
    hooks = tmp_path / "hooks"
    proc = _cli("hook", "install", "--hooks-dir", str(hooks),
                python=str(user_venv / "bin" / "python"), env=_user_env())  # fmt: skip
    _refused(proc, "interpreter", "belongs to uid 65534, not root")
    assert not hooks.exists()


def test_hook_install_refuses_a_users_console_script(tmp_path: Path, user_venv: Path) -> None:
    script = user_venv / "bin" / "spice-libvirt-hook"
    script.write_text(f"#!{user_venv / 'bin' / 'python'}\nprint('hook')\n")
    script.chmod(0o755)
    hooks = tmp_path / "hooks"
    # a root-owned script, but its #! names the user's interpreter
    root_script = tmp_path / "bin" / "spice-libvirt-hook"
    root_script.parent.mkdir()
    shutil.copy(script, root_script)
    for exe, why in ((script, "script"), (root_script, "interpreter")):
        proc = _cli("hook", "install", "--hooks-dir", str(hooks), "--executable", str(exe))
        _refused(proc, why, "65534")
    assert not hooks.exists()


def test_hook_install_refuses_an_open_hook_directory_and_config(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    (hooks / "qemu.d").mkdir(parents=True)
    (hooks / "qemu.d").chmod(0o777)
    _refused(_cli("hook", "install", "--hooks-dir", str(hooks)), "hook directory", "0777")
    (hooks / "qemu.d").chmod(0o755)
    config = tmp_path / "config.toml"
    config.write_text("")
    config.chmod(0o664)
    _refused(
        _cli("hook", "install", "--hooks-dir", str(hooks), "--config", str(config)),
        "configuration", "writable by its group",
    )  # fmt: skip
    assert list((hooks / "qemu.d").iterdir()) == []
    config.chmod(0o644)
    done = _cli("hook", "install", "--hooks-dir", str(hooks), "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert (hooks / "qemu.d" / hook_install.SHIM_NAME).stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------ agent unit


def test_agent_unit_refuses_a_users_installation(user_venv: Path, tmp_path: Path) -> None:
    proc = _cli("agent", "unit", python=str(user_venv / "bin" / "python"), env=_user_env())
    _refused(proc, "65534")
    script = tmp_path / "spice-libvirt"
    script.write_text(f"#!{user_venv / 'bin' / 'python'}\n")
    script.chmod(0o755)
    _refused(_cli("agent", "unit", "--exec", str(script)), "interpreter", "65534")


def test_agent_unit_is_sandboxed_and_writes_only_its_state(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(
        f'state_dir = "{tmp_path / "state"}"\njournal_path = "{tmp_path / "j" / "journal.sqlite3"}"\n'
    )
    proc = _cli("agent", "unit", "--config", str(agent_toml))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    script = Path(sys.executable).parent / "spice-libvirt"
    assert f"ExecStart={script} agent run --config {agent_toml}" in lines
    assert f"ReadWritePaths=-{tmp_path / 'j'} -{tmp_path / 'state'}" in lines
    assert not [x for x in lines if x.startswith("StateDirectory=")]  # not under /var/lib
    for key in (
        "ProtectSystem=strict", "ProtectHome=read-only", "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_SETPCAP", "PrivateTmp=yes",
        "RestrictSUIDSGID=yes", "SystemCallFilter=@system-service", "UMask=0077",
    ):  # fmt: skip
        assert key in lines, key
    # the default settings: systemd makes the state directory, the journal's is writable
    default = unit_text("/usr/bin/spice-libvirt").splitlines()
    assert "ExecStart=/usr/bin/spice-libvirt agent run" in default
    assert "StateDirectory=spice-libvirt/agent" in default
    assert "StateDirectoryMode=0700" in default
    assert "ReadWritePaths=-/var/lib/spice-libvirt" in default
    unit = tmp_path / "spice-libvirt-agent.service"
    unit.write_text(proc.stdout)
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:  # it reads the unit without a running systemd
        verify = subprocess.run(
            [analyze, "verify", "--man=no", str(unit)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        bad = [x for x in verify.stderr.splitlines() if "Unknown key" in x or "ignoring" in x]
        assert not bad, verify.stderr


# ------------------------------------------------------------------ doctor


def test_doctor_finds_what_root_would_run(tmp_path: Path, user_venv: Path) -> None:
    hooks = tmp_path / "hooks"
    assert hook_install.install(hooks).changed
    good = hook_install.status(hooks)
    assert check_hook_trust(good).status == "ok"
    # the shim rewritten by hand to a user's interpreter
    shim = hooks / "qemu.d" / hook_install.SHIM_NAME
    launcher = hook_install.default_launcher()
    shim.write_text(hook_install.render_shim(user_venv / "bin" / "python", launcher=launcher))
    bad = check_hook_trust(hook_install.status(hooks))
    assert bad.status == "fail"
    assert "65534" in bad.detail
    assert bad.fix is not None
    assert "hook install" in bad.fix
    # the agent's unit: ours (root's), then one that starts a user's script
    unit = tmp_path / "spice-libvirt-agent.service"
    unit.write_text(unit_text(str(Path(sys.executable).parent / "spice-libvirt")))
    assert check_agent_unit(unit).status == "ok"
    assert exec_start("ExecStart=-/x/y agent run\n") == ["/x/y", "agent", "run"]
    unit.write_text(unit_text(str(user_venv / "bin" / "python")))
    assert check_agent_unit(unit).status == "fail"
    assert check_agent_unit(tmp_path / "none.service").status == "skip"
    # the CLI, as the role's verify step runs it
    proc = _cli("doctor", "--json", "--hooks-dir", str(hooks), "--agent-unit", str(unit),
                "--connect", f"qemu:///system?socket={tmp_path / 'none.sock'}")  # fmt: skip
    assert proc.returncode == int(ExitCode.NOT_READY), proc.stderr
    checks = {c["name"]: c["status"] for c in json.loads(proc.stdout)["checks"]}
    assert checks["hook-trust"] == "fail"
    assert checks["agent-unit-trust"] == "fail"


# ------------------------------------------------------------------ the agent's state


def test_state_dir_is_made_private_or_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    old = os.umask(0)
    try:
        fresh = tmp_path / "new" / "agent"
        holdfile.ensure_dir(fresh)
        assert fresh.stat().st_mode & 0o777 == 0o700
        assert (fresh / "holds").stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)
    holdfile.ensure_dir(fresh)  # ours and private: used as it is
    opened = tmp_path / "opened"
    opened.mkdir(mode=0o755)
    with pytest.raises(UnsafePathError, match=r"open to others \(mode 0755\)"):
        holdfile.ensure_dir(opened)
    assert opened.stat().st_mode & 0o777 == 0o755  # refused, not repaired
    assert not (opened / "holds").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="belongs to uid 65534"):
        holdfile.ensure_dir(theirs)
    (tmp_path / "link").symlink_to(fresh)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        holdfile.ensure_dir(tmp_path / "link")
    # the command: one line, exit 14, before it connects to anything
    proc = _cli("agent", "run", "--state-dir", str(opened), "--connect",
                f"qemu:///system?socket={tmp_path / 'none.sock'}")  # fmt: skip
    _refused(proc, "state directory", "open to others")
