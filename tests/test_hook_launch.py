"""The hook's fast start: the default shim runs ``python -I -S launch.py``, and a hook call
loads only what it needs (the figures are in ``benchmarks/bench_hook.py``, not here)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spice_libvirt.hook import install as hi
from spice_libvirt.hook.journal import Journal

NEW = "198.51.100.2"
XML = (
    "<domain type='kvm'><name>vm</name><uuid>6a1f0c3e-1b7e-4c55-9f3b-2f5e9f0b1a11</uuid>"
    "<devices><graphics type='spice' listen='{listen}'>"
    "<listen type='address' address='{listen}'/></graphics></devices></domain>"
)
#: libvirtd's hook environment: nearly empty, C locale (the shim switches to C.UTF-8).
LIBVIRTD_ENV = {"LC_ALL": "C", "PATH": "/usr/bin:/bin"}
#: Modules a hook call must never load: each one is start-up time on every guest event.
NEVER = {
    "typing",
    "re",
    "enum",
    "dataclasses",
    "inspect",
    "pathlib",
    "tomllib",
    "socket",
    "threading",
    "signal",
    "datetime",
    "sqlite3",
    "pydantic",
    "contextlib",
    "spice_libvirt.spice",
    "spice_libvirt.migration",
}


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    """(shim, journal) of a default install with its own configuration."""
    journal = tmp_path / "j.sqlite3"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'spice_address = "{NEW}"\njournal_path = "{journal}"\n')
    res = hi.install(tmp_path / "hooks", config=cfg)
    return res.path, journal


def _run(argv: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=10, env=LIBVIRTD_ENV,
        cwd="/", check=False,
    )  # fmt: skip


def _imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines (``import time: us | us | name``)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_default_shim_runs_the_venv_interpreter_without_site(host: tuple[Path, Path]) -> None:
    shim, _journal = host
    text = shim.read_text()
    exe, launcher, config = hi.parse_shim_full(text)
    assert exe == Path(sys.executable)
    assert launcher == hi.default_launcher()
    assert launcher is not None
    assert launcher.is_file()
    assert config is not None
    assert config.name == "config.toml"
    assert f'exec {sys.executable} -I -S {launcher} "$@"\n' in text
    status = hi.status(shim.parent.parent)
    assert status.installed
    assert status.launcher == launcher
    assert status.target_ok


def test_status_notices_a_missing_launcher(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    (hooks / "qemu.d").mkdir(parents=True)
    gone = tmp_path / "old-venv" / "launch.py"
    (hooks / "qemu.d" / hi.SHIM_NAME).write_text(
        hi.render_shim(Path(sys.executable), None, launcher=gone)
    )
    status = hi.status(hooks)
    assert status.installed
    assert status.launcher == gone
    assert status.target_ok is False


@pytest.mark.parametrize("event", [["vm", "started", "begin", "-"], ["vm", "release", "end", "-"]])
def test_a_plain_event_is_journalled_without_output(
    host: tuple[Path, Path], event: list[str]
) -> None:
    shim, journal = host
    proc = _run([str(shim), *event], XML.format(listen=NEW))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    [row] = Journal(journal).entries()
    assert (row.operation, row.suboperation, row.domain, row.outcome) == (
        event[1], event[2], "vm", "ok"
    )  # fmt: skip
    assert row.uuid == "6a1f0c3e-1b7e-4c55-9f3b-2f5e9f0b1a11"


def test_migrate_begin_rewrites_through_the_launcher(host: tuple[Path, Path]) -> None:
    shim, journal = host
    proc = _run([str(shim), "vm", "migrate", "begin", "-"], XML.format(listen="198.51.100.1"))
    assert proc.returncode == 0, proc.stderr
    assert f'listen="{NEW}"' in proc.stdout
    assert f'address="{NEW}"' in proc.stdout
    [row] = Journal(journal).entries()
    assert row.outcome == "rewritten"


def test_the_launcher_never_shadows_the_standard_library() -> None:
    """The package's directory goes last on sys.path; the script's own directory not at all."""
    launcher = str(hi.default_launcher())
    code = (
        "import sys, types\n"
        "fake = types.ModuleType('spice_libvirt.hook.qemu')\n"
        "fake.main = lambda: print(repr(sys.path)) or 0\n"
        "sys.modules['spice_libvirt.hook.qemu'] = fake\n"
        f"__file__ = {launcher!r}\n"
        f"exec(compile(open({launcher!r}).read(), {launcher!r}, 'exec'))\n"
    )
    proc = _run([sys.executable, "-I", "-S", "-c", code], "")
    assert proc.returncode == 0, proc.stderr
    path = ast.literal_eval(proc.stdout.strip())
    root = str(Path(launcher).parents[2])
    assert path[-1] == root
    assert path.count(root) == 1
    assert str(Path(launcher).parent) not in path
    assert all(os.path.realpath(p) != os.path.realpath(root) for p in path[:-1])


@pytest.mark.parametrize(
    ("event", "listen", "allowed"),
    [
        (["vm", "started", "begin", "-"], NEW, set()),
        # ElementTree brings re, enum and contextlib; only a migration's rewrite pays them
        (
            ["vm", "migrate", "begin", "-"],
            "198.51.100.1",
            {"xml.etree.ElementTree", "ipaddress", "re", "enum", "contextlib"},
        ),
    ],
)
def test_a_hook_call_loads_only_what_it_needs(
    host: tuple[Path, Path], event: list[str], listen: str, allowed: set[str]
) -> None:
    shim, _journal = host
    exe, launcher, _config = hi.parse_shim_full(shim.read_text())
    assert exe is not None
    assert launcher is not None
    env = dict(LIBVIRTD_ENV, SPICE_LIBVIRT_CONFIG=str(shim.parent.parent.parent / "config.toml"))
    proc = subprocess.run(
        [str(exe), "-I", "-S", "-X", "importtime", str(launcher), *event],
        input=XML.format(listen=listen), capture_output=True, text=True, timeout=10, env=env,
        cwd="/", check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    loaded = _imported(proc.stderr)
    assert "spice_libvirt.hook.qemu" in loaded
    assert "_sqlite3" in loaded
    assert {"xml.etree.ElementTree", "ipaddress"} & allowed <= loaded
    never = NEVER - allowed
    leaked = {m for m in loaded if m in never or any(m.startswith(n + ".") for n in never)}
    assert leaked == set(), f"a hook call imported {sorted(leaked)}"
    # the package's __init__ (the CLI's and the API's) does not run in a hook process
    assert "spice_libvirt" not in loaded


def test_console_script_form_is_still_rendered_and_parsed(tmp_path: Path) -> None:
    exe = tmp_path / "venv" / "bin" / "spice-libvirt-hook"
    text = hi.render_shim(exe)
    assert hi.parse_shim_full(text) == (exe, None, None)
    assert f'exec {exe} "$@"\n' in text
