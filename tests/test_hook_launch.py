"""The hook's fast start: the default shim runs ``python -I -S launch.py``, and a hook call
loads only what it needs (the figures are in ``benchmarks/bench_hook.py``, not here)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spice_libvirt.hook import install as hi
from spice_libvirt.hook.journal import Journal
from spice_libvirt.hook.local import is_local_address, plainly_local
from spice_libvirt.hook.rewrite import parse_domain, rewrite_graphics_listen, spice_listen_addresses
from spice_libvirt.hook.scan import scan_domain

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
    "xml.etree",
    "logging",
    # _sqlite3 gets a stand-in for its lru_cache (spice_libvirt.hook.sqlite_light)
    "functools",
    "collections",
    "ipaddress",
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
        "fake = types.ModuleType('spice_libvirt.hook.qemu_hook')\n"
        "fake.main = lambda: print(repr(sys.path)) or 0\n"
        "sys.modules['spice_libvirt.hook.qemu_hook'] = fake\n"
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
        # a migration's rewrite is patched in place from the expat pass: no ElementTree
        # (with its re, enum and contextlib), and a dotted quad is judged without ipaddress
        (["vm", "migrate", "begin", "-"], "198.51.100.1", set()),
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
    assert "spice_libvirt.hook.qemu_hook" in loaded
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


_GRAPHICS = st.sampled_from(
    [
        "<graphics type='spice' listen='{a}'><listen type='address' address='{b}'/></graphics>",
        "<graphics type='spice'><listen type='address' address='{a}'/></graphics>",
        "<graphics type='spice' listen='{a}'/>",
        "<graphics type='vnc' listen='{a}'><listen type='address' address='{b}'/></graphics>",
        "<graphics type='spice'><listen type='network' network='default'/></graphics>",
        "<graphics type='spice' listen=''><listen type='address'/></graphics>",
        "<x:graphics xmlns:x='urn:x' type='spice' listen='{a}'/>",
    ]
)
_ADDRESSES = st.sampled_from(
    ["198.51.100.1", "198.51.100.2", "127.0.0.1", "0.0.0.0", "::", "localhost", "hv9.example",
     "2001:db8::7", "[::1]", "", NEW, " 0.0.0.0 ", "LOCALHOST", "hv1"]
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_GRAPHICS, _ADDRESSES, _ADDRESSES), max_size=3), st.booleans())
def test_the_expat_pass_decides_a_rewrite_as_elementtree_would(
    graphics: list[tuple[str, str, str]], nested_devices: bool
) -> None:
    """scan's SPICE listen addresses are rewrite's, and "all local" is "nothing changes"."""
    devices = "".join(g.format(a=a, b=b) for g, a, b in graphics)
    extra = "<metadata><devices><graphics type='spice' listen='203.0.113.9'/></devices></metadata>"
    xml = (
        f"<domain type='kvm'><name>vm</name>{extra if nested_devices else ''}"
        f"<devices>{devices}</devices></domain>"
    )
    local = frozenset({"198.51.100.2", "10.0.0.1"})
    dom = scan_domain(xml)
    assert list(dom.spice_listens) == spice_listen_addresses(parse_domain(xml))
    keep = {*local, NEW}
    all_local = all(is_local_address(a, keep, hostname="hv1") for a in dom.spice_listens)
    # the shortcut never calls local what the full rule would not
    for a in dom.spice_listens:
        assert not plainly_local(a, NEW) or is_local_address(a, keep, hostname="hv1")
    res = rewrite_graphics_listen(xml, NEW, local, hostname="hv1")
    assert all_local == (not res.changes)


def test_migrate_begin_with_local_addresses_loads_no_elementtree(host: tuple[Path, Path]) -> None:
    shim, journal = host
    exe, launcher, _config = hi.parse_shim_full(shim.read_text())
    assert exe is not None
    assert launcher is not None
    env = dict(LIBVIRTD_ENV, SPICE_LIBVIRT_CONFIG=str(shim.parent.parent.parent / "config.toml"))
    proc = subprocess.run(
        [str(exe), "-I", "-S", "-X", "importtime", str(launcher), "vm", "migrate", "begin", "-"],
        input=XML.format(listen="0.0.0.0"), capture_output=True, text=True, timeout=10, env=env,
        cwd="/", check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    loaded = _imported(proc.stderr)
    assert "xml.etree.ElementTree" not in loaded
    assert "spice_libvirt.hook.rewrite" not in loaded
    assert "ipaddress" not in loaded  # a wildcard is local without reading /proc
    [row] = Journal(journal).entries()
    assert (row.outcome, row.detail) == ("ok", "unchanged: SPICE listen 0.0.0.0 is local here")


def test_a_shim_whose_launcher_is_gone_still_reaches_the_hook(tmp_path: Path) -> None:
    """A reinstall for another Python moves the launcher: the console script takes over."""
    journal = tmp_path / "j.sqlite3"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'spice_address = "{NEW}"\njournal_path = "{journal}"\n')
    gone = tmp_path / "old" / "lib" / "python3.9" / "spice_libvirt" / "hook" / "launch.py"
    shim = tmp_path / "shim"
    shim.write_text(hi.render_shim(Path(sys.executable), cfg, launcher=gone))
    shim.chmod(0o755)
    proc = _run([str(shim), "vm", "started", "begin", "-"], XML.format(listen=NEW))
    assert (proc.returncode, proc.stderr) == (0, "")
    [row] = Journal(journal).entries()
    assert (row.operation, row.domain) == ("started", "vm")
