"""The VDSM hook adapters in hooks/vdsm/, run the way VDSM runs them.

VDSM execs each script with its own environment plus ``_hook_domxml`` (a temporary file
with the domain XML), ``vmId`` and a ``PYTHONPATH`` that points at VDSM's code; the
adapters must read the file, leave it unchanged, journal, and answer 0/1/2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spice_libvirt.hook import vdsm
from spice_libvirt.hook.journal import Journal

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = REPO / "hooks" / "vdsm"
VENV = Path(sys.executable).parent.parent
UUID = "0d4c3b2a-1f0e-4d9c-8b7a-695847362514"
XML = f"""<domain type='kvm' id='3'>
  <name>ovirt-vm</name>
  <uuid>{UUID}</uuid>
  <devices>
    <graphics type='spice' port='5902' tlsPort='5903' autoport='yes' listen='192.0.2.11'>
      <listen type='network' address='192.0.2.11' network='vdsm-ovirtmgmt'/>
    </graphics>
  </devices>
</domain>
"""

needs_venv_package = pytest.mark.skipif(
    not (VENV / "bin" / "spice-libvirt-hook").exists(),
    reason="spice-libvirt not installed into the venv",
)


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    journal = tmp_path / "journal.sqlite3"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'journal_path = "{journal}"\n')
    domxml = tmp_path / "hook_domxml.xml"
    domxml.write_text(XML)
    return {"journal": journal, "config": cfg, "domxml": domxml, "dir": tmp_path}


def run_adapter(
    name: str, host: dict[str, Path], *, domxml: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": "/usr/bin:/bin",
        "SPICE_LIBVIRT_VENV": str(VENV),
        "SPICE_LIBVIRT_CONFIG": str(host["config"]),
        "vmId": UUID,
        # VDSM prepends its own tree; -I in the shim keeps it out of our interpreter
        "PYTHONPATH": str(host["dir"] / "vdsm-tree"),
    }
    if domxml is not None:
        base["_hook_domxml"] = str(domxml)
    base.update(env)
    return subprocess.run(
        [str(ADAPTERS / name)], env=base, capture_output=True, text=True, timeout=30, check=False
    )


def test_adapters_are_executable_shims() -> None:
    for name in vdsm.HOOK_POINTS:
        path = ADAPTERS / name
        assert os.access(path, os.X_OK), path
        text = path.read_text()
        assert text.startswith("#!/bin/sh\n")
        assert f"-m spice_libvirt.hook.vdsm {name}" in text
    readme = (ADAPTERS / "README.md").read_text()
    for code in ("**0**", "**1**", "**2**"):
        assert code in readme


@needs_venv_package
@pytest.mark.parametrize("name", vdsm.HOOK_POINTS)
def test_adapter_journals_and_leaves_the_xml_alone(name: str, host: dict[str, Path]) -> None:
    # a module VDSM's PYTHONPATH would shadow ours with, if the shim let it in
    shadow = host["dir"] / "vdsm-tree" / "spice_libvirt"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('VDSM PYTHONPATH leaked in')\n")
    before = host["domxml"].stat()
    proc = run_adapter(name, host, domxml=host["domxml"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    after = host["domxml"].stat()
    assert host["domxml"].read_text() == XML
    assert before.st_mtime_ns == after.st_mtime_ns
    [row] = Journal(host["journal"]).entries()
    assert row.source == "vdsm"
    assert (row.object, row.operation, row.extra) == ("ovirt-vm", name, UUID)
    assert (row.domain, row.uuid, row.outcome) == ("ovirt-vm", UUID, "ok")
    assert row.detail == "spice listen 192.0.2.11 port 5902"


@needs_venv_package
@pytest.mark.parametrize("fail_closed", [False, True])
@pytest.mark.parametrize(
    ("problem", "fragment"),
    [
        ("unset", "$_hook_domxml is not set"),
        ("missing", "cannot read"),
        ("malformed", "malformed domain XML"),
        ("not-utf8", "not UTF-8"),
    ],
)
def test_bad_input_exit_codes(
    host: dict[str, Path], fail_closed: bool, problem: str, fragment: str
) -> None:
    domxml: Path | None = host["dir"] / "in.xml"
    assert domxml is not None
    if problem == "unset":
        domxml = None
    elif problem == "malformed":
        domxml.write_text("<domain><name>x</name>")
    elif problem == "not-utf8":
        domxml.write_bytes(b"<domain><name>\xff\xfe</name></domain>")
    env = {"SPICE_LIBVIRT_FAIL_CLOSED": "true"} if fail_closed else {}
    proc = run_adapter("before_vm_migrate_source", host, domxml=domxml, **env)
    assert proc.returncode == (vdsm.EXIT_ERROR_STOP if fail_closed else vdsm.EXIT_OK)
    assert fragment in proc.stderr
    assert proc.stderr.count("\n") == 1
    [row] = Journal(host["journal"]).entries()
    assert row.outcome == "error"
    assert fragment in row.detail


@needs_venv_package
@pytest.mark.parametrize("fail_closed", [False, True])
def test_unwritable_journal_exit_codes(host: dict[str, Path], fail_closed: bool) -> None:
    (host["dir"] / "file").write_text("")
    host["config"].write_text(
        f'journal_path = "{host["dir"]}/file/j.sqlite3"\nfail_closed = {str(fail_closed).lower()}\n'
    )
    proc = run_adapter("before_vm_migrate_source", host, domxml=host["domxml"])
    # never fatal: a non-zero status at a before_* point would abort VDSM's migration
    assert proc.returncode == vdsm.EXIT_OK
    assert "journal" in proc.stderr
    assert "(continuing)" in proc.stderr


def test_unknown_hook_point_and_usage(
    host: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(host["config"]))
    import io

    err = io.StringIO()
    env = {"_hook_domxml": str(host["domxml"])}
    assert vdsm.run("before_vm_start", env, err) == vdsm.EXIT_OK
    assert "unknown hook point" in err.getvalue()
    monkeypatch.setenv("SPICE_LIBVIRT_FAIL_CLOSED", "1")
    assert vdsm.run("before_vm_start", env, io.StringIO()) == vdsm.EXIT_ERROR_STOP
    assert vdsm.main([]) == vdsm.EXIT_ERROR_STOP


def test_invalid_config_fails_open(host: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    host["config"].write_text("fail_closed = true\nextra = 1\n")
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(host["config"]))
    err = io.StringIO()
    rc = vdsm.run("before_vm_migrate_source", {"_hook_domxml": str(host["domxml"])}, err)
    assert rc == vdsm.EXIT_OK
    assert "extra: unknown key" in err.getvalue()


# --- hardening: deadline, declined documents, journal never fatal -----------------------


@needs_venv_package
@pytest.mark.parametrize("fail_closed", [False, True])
def test_a_domxml_that_never_arrives_is_cut_by_the_deadline(
    host: dict[str, Path], fail_closed: bool
) -> None:
    """``$_hook_domxml`` names a FIFO nobody writes: open() blocks until the deadline."""
    fifo = host["dir"] / "stuck.xml"
    os.mkfifo(fifo)
    host["config"].write_text(
        f'journal_path = "{host["journal"]}"\nhook_timeout_s = 0.8\n'
        f"fail_closed = {str(fail_closed).lower()}\n"
    )
    t0 = time.monotonic()
    proc = run_adapter("before_vm_migrate_source", host, domxml=fifo)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.5  # 0.8 s budget from module load, plus interpreter start
    assert proc.returncode == (vdsm.EXIT_ERROR_CONTINUE if fail_closed else vdsm.EXIT_OK)
    assert "deadline of 0.8 s exceeded" in proc.stderr
    assert proc.stderr.count("\n") == 1


@needs_venv_package
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"<!DOCTYPE domain [<!ENTITY x 'y'>]>" + XML.encode(), "DOCTYPE"),
        (b"<domain>" + b" " * (9 * 1024 * 1024) + b"</domain>", "larger than"),
    ],
)
def test_declined_documents_never_stop_the_migration(
    host: dict[str, Path], content: bytes, fragment: str
) -> None:
    """With fail_closed too: a non-zero status at before_* would abort VDSM's migration."""
    domxml = host["dir"] / "odd.xml"
    domxml.write_bytes(content)
    proc = run_adapter(
        "before_vm_migrate_source", host, domxml=domxml, SPICE_LIBVIRT_FAIL_CLOSED="true"
    )
    assert proc.returncode == vdsm.EXIT_OK
    assert fragment in proc.stderr
    assert domxml.read_bytes() == content
    [row] = Journal(host["journal"]).entries()
    assert row.outcome == "error"
