"""Fail-open means fail-open: *any* exception in a hook ends in the configured exit code,
within the deadline, in one line on stderr -- not only the errors the hook expects.

The unexpected exceptions are real ones: stdin open for writing only (``read()`` raises
``OSError``, which the hook does not expect), and a half-upgraded install (a copy
of the package whose hook module raises when used, or already when imported), run through
the shim's own launcher (``python -I -S launch.py``) the way libvirtd runs it. The
in-process cases (a journal or a syslog line raising something odd, the VDSM adapter) use
the entry points directly.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import spice_libvirt
from spice_libvirt.hook import qemu_hook, vdsm
from spice_libvirt.hook.journal import Journal
from tests.test_hook import domain_xml
from tests.test_hook_hardening import config

HOOK_TIMEOUT_S = 1.0
ARGS = ["guest1", "start", "begin", "-"]


def _launch(
    package_root: Path, cfg: Path, stdin: int
) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """The hook as the installed shim runs it: ``python -I -S <root>/spice_libvirt/hook/launch.py``."""
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(package_root / "spice_libvirt" / "hook" / "launch.py"), *ARGS],
        stdin=stdin, capture_output=True, timeout=20, check=False, cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "SPICE_LIBVIRT_CONFIG": str(cfg)},
    )  # fmt: skip
    return done, time.monotonic() - t0


def _one_line(stderr: bytes, fragment: str) -> None:
    text = stderr.decode()
    assert "Traceback" not in text
    assert text.count("\n") == 1, text
    assert fragment in text


ROOT = Path(spice_libvirt.__file__).resolve().parent.parent


@pytest.mark.parametrize(("fail_closed", "code"), [(False, 0), (True, 1)])
def test_stdin_that_cannot_be_read_ends_in_the_configured_code(
    tmp_path: Path, fail_closed: bool, code: int
) -> None:
    journal = tmp_path / "j.sqlite3"
    cfg = config(tmp_path, journal, fail_closed=fail_closed, hook_timeout_s=HOOK_TIMEOUT_S)
    # a stdin open for writing only: read() raises OSError (EBADF), which the hook does not
    # expect (libvirt never does this; a bug or a broken caller could)
    write_only = os.open(tmp_path / "stdin", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        done, took = _launch(ROOT, cfg, write_only)
    finally:
        os.close(write_only)
    assert done.returncode == code
    assert done.stdout == b""
    _one_line(done.stderr, "unexpected OSError: [Errno 9] Bad file descriptor")
    assert took < HOOK_TIMEOUT_S + 2.0
    (entry,) = Journal(journal).entries(limit=5)
    assert entry.outcome == "error"
    assert "OSError" in entry.detail


def _broken_copy(tmp_path: Path, module: str, old: str, new: str) -> Path:
    """A copy of the package with one hook module changed: a half-upgraded install."""
    root = tmp_path / "site"
    shutil.copytree(ROOT / "spice_libvirt", root / "spice_libvirt",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    path = root / "spice_libvirt" / "hook" / module
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return root


@pytest.mark.parametrize(("fail_closed", "code"), [(False, 0), (True, 1)])
def test_a_bug_in_the_hook_ends_in_the_configured_code(
    tmp_path: Path, fail_closed: bool, code: int
) -> None:
    root = _broken_copy(
        tmp_path,
        "scan.py",
        "def scan_domain(",
        "def scan_domain(*_a, **_k):\n    return {}['bug']\n\n\ndef _was_scan_domain(",
    )
    journal = tmp_path / "j.sqlite3"
    cfg = config(tmp_path, journal, fail_closed=fail_closed, hook_timeout_s=HOOK_TIMEOUT_S)
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(root / "spice_libvirt" / "hook" / "launch.py"), *ARGS],
        input=domain_xml().encode(), capture_output=True, timeout=20, check=False, cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "SPICE_LIBVIRT_CONFIG": str(cfg)},
    )  # fmt: skip
    assert done.returncode == code
    assert done.stdout == b""
    _one_line(done.stderr, "unexpected KeyError: 'bug'")


def test_a_hook_that_cannot_even_import_fails_open(tmp_path: Path) -> None:
    """The configuration that could ask for fail-closed is unknown: exit 0, as with an
    unreadable configuration file."""
    root = _broken_copy(
        tmp_path, "journal.py", "\nimport ", "\nraise RuntimeError('half-upgraded')\nimport "
    )
    cfg = config(tmp_path, tmp_path / "j.sqlite3", fail_closed=True)
    devnull = os.open("/dev/null", os.O_RDONLY)
    try:
        done, _ = _launch(root, cfg, devnull)
    finally:
        os.close(devnull)
    assert done.returncode == 0
    _one_line(done.stderr, "unexpected RuntimeError: half-upgraded (failing open)")


class _Odd(Exception):
    """Something nobody expects from a journal or a log line."""


@pytest.mark.parametrize("fail_closed", [False, True])
def test_a_journal_or_syslog_raising_oddly_never_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_closed: bool
) -> None:
    cfg = config(tmp_path, tmp_path / "j.sqlite3", fail_closed=fail_closed)
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(cfg))

    def odd(*_a: object, **_k: object) -> None:
        raise _Odd("disk on fire")

    monkeypatch.setattr(Journal, "record", odd)
    monkeypatch.setattr("spice_libvirt.syslog_line.send", odd)
    err = io.StringIO()
    rc = qemu_hook.run(ARGS, io.StringIO(domain_xml()), io.StringIO(), err)
    assert rc == 0
    assert "journal: unexpected _Odd: disk on fire (continuing)" in err.getvalue()


def test_an_unexpected_configuration_error_fails_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> None:
        raise _Odd("config loader bug")

    monkeypatch.setattr(qemu_hook, "load_config", broken)
    err = io.StringIO()
    assert qemu_hook.run(ARGS, io.StringIO(domain_xml()), io.StringIO(), err) == 0
    assert "configuration: unexpected _Odd: config loader bug (failing open)" in err.getvalue()


@pytest.mark.parametrize(("fail_closed", "code"), [(False, 0), (True, 2)])
def test_the_vdsm_adapter_treats_an_unexpected_exception_as_unusable_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_closed: bool, code: int
) -> None:
    cfg = config(tmp_path, tmp_path / "j.sqlite3", fail_closed=fail_closed)
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(cfg))
    domxml = tmp_path / "dom.xml"
    domxml.write_text(domain_xml())

    def bug(_text: str) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(vdsm, "parse_domain", bug)
    err = io.StringIO()
    rc = vdsm.run("before_vm_migrate_source", {"_hook_domxml": str(domxml)}, err)
    assert rc == code
    assert "unexpected ZeroDivisionError: a bug" in err.getvalue()
    assert err.getvalue().count("\n") == 1
