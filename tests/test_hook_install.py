"""Installing the hook shim into qemu.d/, and the ``hook`` and ``journal`` sub-commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from spice_libvirt.cli import main as cli_main
from spice_libvirt.errors import ConfigError, HookError
from spice_libvirt.hook import install as hi
from spice_libvirt.hook.journal import Journal, JournalEntry

REPO = Path(__file__).resolve().parent.parent
VDSM_QEMU_HOOK = (
    '#!/bin/sh\n# VDSM\'s hook, not ours\nexec /usr/libexec/vdsm/vm_libvirt_hook.py "$@"\n'
)


@pytest.fixture
def exe(tmp_path: Path) -> Path:
    """A stand-in executable for the shim to point at."""
    path = tmp_path / "venv" / "bin" / "spice-libvirt-hook"
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_install_writes_an_executable_shim_and_is_idempotent(tmp_path: Path, exe: Path) -> None:
    hooks = tmp_path / "hooks"
    res = hi.install(hooks, executable=exe)
    shim = hooks / "qemu.d" / "50-spice-libvirt"
    assert res.changed
    assert res.path == shim
    assert (
        "reload libvirtd (or virtqemud; systemctl reload, i.e. SIGHUP) to load the hook"
        in res.message
    )
    assert stat.S_IMODE(shim.stat().st_mode) == 0o755
    text = shim.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "LC_ALL=C.UTF-8" in text
    assert f'exec {exe} "$@"' in text
    assert "SPICE_LIBVIRT_CONFIG" not in text
    mtime = shim.stat().st_mtime_ns
    again = hi.install(hooks, executable=exe)
    assert not again.changed
    assert shim.stat().st_mtime_ns == mtime
    assert not (hooks / "qemu").exists()
    assert [p.name for p in (hooks / "qemu.d").iterdir()] == ["50-spice-libvirt"]


def test_install_replaces_an_older_shim_of_ours(tmp_path: Path, exe: Path) -> None:
    hooks = tmp_path / "hooks"
    hi.install(hooks, executable=exe)
    cfg = tmp_path / "c.toml"
    res = hi.install(hooks, executable=exe, config=cfg)
    assert res.changed
    assert f"SPICE_LIBVIRT_CONFIG={cfg}" in res.path.read_text()
    assert hi.status(hooks).config == cfg


def test_foreign_hooks_qemu_is_never_touched(tmp_path: Path, exe: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "qemu").write_text(VDSM_QEMU_HOOK)
    (hooks / "qemu").chmod(0o755)
    before = (hooks / "qemu").stat()
    hi.install(hooks, executable=exe)
    st = hi.status(hooks)
    assert st.installed
    assert st.foreign_qemu_hook
    hi.uninstall(hooks)
    after = (hooks / "qemu").stat()
    assert (hooks / "qemu").read_text() == VDSM_QEMU_HOOK
    assert (before.st_mtime_ns, before.st_mode) == (after.st_mtime_ns, after.st_mode)


def test_refuses_a_path_that_resolves_to_hooks_qemu(tmp_path: Path, exe: Path) -> None:
    hooks = tmp_path / "hooks"
    (hooks / "qemu.d").mkdir(parents=True)
    (hooks / "qemu").write_text(VDSM_QEMU_HOOK)
    (hooks / "qemu.d" / "50-spice-libvirt").symlink_to("../qemu")
    with pytest.raises(HookError, match="refusing to write"):
        hi.install(hooks, executable=exe)
    assert (hooks / "qemu").read_text() == VDSM_QEMU_HOOK


def test_a_foreign_file_with_our_name_is_left_alone(tmp_path: Path, exe: Path) -> None:
    hooks = tmp_path / "hooks"
    (hooks / "qemu.d").mkdir(parents=True)
    theirs = hooks / "qemu.d" / "50-spice-libvirt"
    theirs.write_text("#!/bin/sh\necho someone else's\n")
    with pytest.raises(HookError, match="not written by spice-libvirt"):
        hi.install(hooks, executable=exe)
    with pytest.raises(HookError, match="not removing"):
        hi.uninstall(hooks)
    assert theirs.read_text() == "#!/bin/sh\necho someone else's\n"
    st = hi.status(hooks)
    assert st.present
    assert not st.ours
    assert not st.installed


def test_uninstall_removes_only_our_file(tmp_path: Path, exe: Path) -> None:
    hooks = tmp_path / "hooks"
    hi.install(hooks, executable=exe)
    other = hooks / "qemu.d" / "10-other-tool"
    other.write_text("#!/bin/sh\n")
    res = hi.uninstall(hooks)
    assert res.changed
    assert not (hooks / "qemu.d" / "50-spice-libvirt").exists()
    assert other.exists()
    assert (hooks / "qemu.d").is_dir()
    assert not hi.uninstall(hooks).changed


def test_status_reports_a_dangling_target(tmp_path: Path, exe: Path) -> None:
    hooks = tmp_path / "hooks"
    hi.install(hooks, executable=exe)
    (hooks / "qemu.d" / "10-other").write_text("#!/bin/sh\n")
    st = hi.status(hooks)
    assert (st.installed, st.target, st.target_ok) == (True, exe, True)
    assert st.other_scripts == ["10-other"]
    exe.unlink()
    assert not hi.status(hooks).target_ok


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"executable": Path("relative/hook")}, "absolute"),
        ({"executable": Path("/nonexistent/spice-libvirt-hook")}, "not an executable"),
        ({"config": Path("relative.toml")}, "absolute"),
    ],
)
def test_bad_arguments_are_config_errors(
    tmp_path: Path, exe: Path, kwargs: dict[str, Path], fragment: str
) -> None:
    kwargs.setdefault("executable", exe)
    with pytest.raises(ConfigError, match=fragment):
        hi.install(tmp_path / "hooks", **kwargs)
    assert not (tmp_path / "hooks").exists()


def test_qemu_d_that_is_a_file_is_an_error(tmp_path: Path, exe: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "qemu.d").write_text("")
    with pytest.raises(HookError, match="not a directory"):
        hi.install(hooks, executable=exe)


def test_repository_shim_matches_the_rendered_one() -> None:
    """hooks/qemu is the shim for the Ansible role's venv, byte for byte."""
    shipped = (REPO / "hooks" / "qemu").read_text()
    assert shipped == hi.render_shim(Path("/opt/spice-libvirt/bin/spice-libvirt-hook"))
    assert os.access(REPO / "hooks" / "qemu", os.X_OK)
    assert hi.parse_shim(shipped) == (Path("/opt/spice-libvirt/bin/spice-libvirt-hook"), None)


def test_paths_with_spaces_are_quoted(tmp_path: Path) -> None:
    text = hi.render_shim(Path("/opt/my venv/bin/spice-libvirt-hook"), Path("/etc/a b.toml"))
    assert hi.parse_shim(text) == (
        Path("/opt/my venv/bin/spice-libvirt-hook"),
        Path("/etc/a b.toml"),
    )


@pytest.mark.skipif(
    not hi.default_hook_executable().exists(), reason="spice-libvirt not installed in the venv"
)
def test_installed_shim_runs_the_real_hook_with_a_minimal_environment(tmp_path: Path) -> None:
    """What libvirtd does: run qemu.d/50-spice-libvirt with LC_ALL=C and almost no env."""
    journal = tmp_path / "j.sqlite3"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'spice_address = "198.51.100.2"\njournal_path = "{journal}"\n')
    res = hi.install(tmp_path / "hooks", config=cfg)
    xml = (
        "<domain type='kvm'><name>vm</name><uuid>6a1f0c3e-1b7e-4c55-9f3b-2f5e9f0b1a11</uuid>"
        "<devices><graphics type='spice' listen='198.51.100.1'/></devices></domain>"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(res.path), "vm", "migrate", "begin", "-"],
        input=xml,
        capture_output=True,
        text=True,
        timeout=10,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
        cwd="/",
        check=False,
    )
    assert time.monotonic() - t0 < 2.0
    assert proc.returncode == 0, proc.stderr
    assert 'listen="198.51.100.2"' in proc.stdout
    [row] = Journal(journal).entries()
    assert (row.operation, row.outcome) == ("migrate", "rewritten")


# --- CLI -------------------------------------------------------------------------------


def test_cli_hook_install_status_uninstall(
    tmp_path: Path, exe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "qemu").write_text(VDSM_QEMU_HOOK)
    args = ["--hooks-dir", str(hooks)]
    assert cli_main(["hook", "install", *args, "--executable", str(exe)]) == 0
    assert (
        "reload libvirtd (or virtqemud; systemctl reload, i.e. SIGHUP) to load the hook"
        in capsys.readouterr().out
    )
    assert cli_main(["hook", "status", *args]) == 0
    out = capsys.readouterr().out
    assert "installed:" in out
    assert f"execs: {exe} (ok)" in out
    assert "foreign hook:" in out
    assert "exists (left alone" in out
    assert cli_main(["hook", "status", *args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["installed"] is True
    assert data["foreign_qemu_hook"] is True
    assert data["target_ok"] is True
    assert cli_main(["hook", "uninstall", *args]) == 0
    assert "removed" in capsys.readouterr().out
    assert cli_main(["hook", "status", *args]) == 0
    assert "not installed" in capsys.readouterr().out
    assert (hooks / "qemu").read_text() == VDSM_QEMU_HOOK


def test_cli_hook_errors_have_documented_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli_main(
        ["hook", "install", "--hooks-dir", str(tmp_path), "--executable", "/nonexistent/x"]
    )
    assert rc == 2  # ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith("spice-libvirt: error: ")
    assert err.count("\n") == 1
    (tmp_path / "qemu.d").write_text("")
    rc = cli_main(["hook", "uninstall", "--hooks-dir", str(tmp_path)])
    assert rc == 0  # nothing of ours there: nothing to do


def test_cli_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "j.sqlite3"
    assert cli_main(["journal", "--path", str(path)]) == 0
    assert "no entries" in capsys.readouterr().out
    j = Journal(path)
    for i, dom in enumerate(["a", "b", "a"]):
        j.record(
            JournalEntry(
                ts=1_795_000_000 + i, object=dom, operation="prepare", suboperation="begin",
                domain=dom, uuid=f"uuid-{i}", duration_ms=12.4, detail=f"d{i}",
            )
        )  # fmt: skip
    assert cli_main(["journal", "--path", str(path), "--json", "--domain", "a"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["uuid"] for d in data] == ["uuid-2", "uuid-0"]
    assert cli_main(["journal", "--path", str(path), "--limit", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert "prepare begin" in lines[0]
    assert "uuid=uuid-2" in lines[0]
    assert " 12ms " in lines[0], lines[0]  # whole milliseconds
    with pytest.raises(SystemExit) as info:
        cli_main(["journal", "--path", str(path), "--limit", "0"])
    assert info.value.code == 2


def test_cli_journal_uses_the_configured_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "j.sqlite3"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'journal_path = "{path}"\n')
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(cfg))
    Journal(path).record(JournalEntry(ts=1.0, object="x", operation="start"))
    assert cli_main(["journal", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["operation"] == "start"
    cfg.write_text("nonsense = 1\n")
    assert cli_main(["journal"]) == 2
    assert "nonsense: unknown key" in capsys.readouterr().err


def test_status_reports_the_libvirt_version(tmp_path: Path) -> None:
    st = hi.status(tmp_path / "hooks")
    if shutil.which("libvirtd", path="/usr/sbin:/usr/bin") is None:
        pytest.skip("libvirtd not installed")
    assert st.libvirt_version is not None
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", st.libvirt_version)
    assert st.qemu_d_supported is True  # Debian 12 has 9.0
    assert (
        hi.HookStatus.model_validate(
            {**st.model_dump(), "libvirt_version": "6.4.0"}
        ).qemu_d_supported
        is False
    )
    assert (
        hi.HookStatus.model_validate(
            {**st.model_dump(), "libvirt_version": "6.5.0"}
        ).qemu_d_supported
        is True
    )
