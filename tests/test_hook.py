"""The libvirt hook entry point and its XML rewrite, fed like libvirt feeds it.

In-process tests call :func:`spice_libvirt.hook.qemu_hook.main` with ``io.StringIO`` streams
(VDSM's test shape); the deadline and console-script tests run the real executable.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spice_libvirt.errors import HookError
from spice_libvirt.hook import qemu_hook
from spice_libvirt.hook.install import default_hook_executable
from spice_libvirt.hook.journal import Journal, JournalEntry
from spice_libvirt.hook.rewrite import (
    host_addresses,
    is_local_address,
    parse_domain,
    rewrite_graphics_listen,
)

NEW = "198.51.100.20"
FOREIGN = "198.51.100.10"
UUID = "6a1f0c3e-1b7e-4c55-9f3b-2f5e9f0b1a11"
HOOK_EXE = default_hook_executable()


def domain_xml(
    listen_attr: str | None = FOREIGN,
    listen_child: str | None = FOREIGN,
    *,
    extra_devices: str = "",
) -> str:
    attr = f" listen='{listen_attr}'" if listen_attr is not None else ""
    child = (
        f"<listen type='address' address='{listen_child}'/>"
        if listen_child is not None
        else "<listen type='address'/>"
    )
    return f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>guest1</name>
  <uuid>{UUID}</uuid>
  <!-- a comment libvirt does not care about -->
  <memory unit='KiB'>131072</memory>
  <devices>
    <graphics type='spice' port='5901' autoport='yes'{attr}>
      {child}
      <image compression='off'/>
    </graphics>
    {extra_devices}
  </devices>
  <qemu:commandline><qemu:arg value='-S'/></qemu:commandline>
</domain>
"""


@pytest.fixture
def hook_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file named by SPICE_LIBVIRT_CONFIG; returns the journal path."""
    for key in list(os.environ):
        if key.startswith("SPICE_LIBVIRT_"):
            monkeypatch.delenv(key)
    journal = tmp_path / "journal.sqlite3"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'spice_address = "{NEW}"\njournal_path = "{journal}"\n')
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(cfg))
    return journal


def call(args: list[str], stdin: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = qemu_hook.main(args, io.StringIO(stdin), out, err)
    return rc, out.getvalue(), err.getvalue()


def journal_rows(path: Path) -> list[JournalEntry]:
    return list(reversed(Journal(path).entries(limit=None)))


# --- the rewrite itself ----------------------------------------------------------------


def test_foreign_address_is_rewritten_in_attribute_and_child() -> None:
    res = rewrite_graphics_listen(domain_xml(), NEW, set())
    assert res.xml is not None
    assert res.changes == (
        f"graphics listen {FOREIGN} -> {NEW}",
        f"listen address {FOREIGN} -> {NEW}",
    )
    root = ET.fromstring(res.xml)
    g = root.find("./devices/graphics")
    assert g is not None
    assert g.get("listen") == NEW
    assert g.find("listen").get("address") == NEW  # type: ignore[union-attr]
    # everything else survives: port, sibling elements, namespace prefix, comments
    assert g.get("port") == "5901"
    assert g.find("image") is not None
    assert "qemu:commandline" in res.xml
    assert 'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in res.xml
    assert "<!-- a comment libvirt does not care about -->" in res.xml
    assert (res.name, res.uuid) == ("guest1", UUID)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.5.6.7", "::1", "0.0.0.0", "::", "localhost", "LOCALHOST.", NEW],
)
def test_local_addresses_are_left_alone(address: str) -> None:
    res = rewrite_graphics_listen(domain_xml(address, address), NEW, set())
    assert res.xml is None
    assert res.changes == ()


def test_this_hosts_own_addresses_and_name_are_local() -> None:
    own = sorted(host_addresses())
    assert "127.0.0.1" in own
    assert (
        rewrite_graphics_listen(domain_xml("203.0.113.9", None), NEW, {"203.0.113.9"}).xml is None
    )
    assert is_local_address("hv2", set(), hostname="hv2.example.org")
    assert is_local_address("hv2.example.org", set(), hostname="hv2.example.org")
    assert not is_local_address("hv1.example.org", set(), hostname="hv2.example.org")
    assert not is_local_address("2001:db8::1", {"2001:db8::2"})
    assert is_local_address("2001:DB8::2", {"2001:db8::2"})


def test_listen_without_address_and_other_listen_types_are_left_alone() -> None:
    assert rewrite_graphics_listen(domain_xml(None, None), NEW, set()).xml is None
    xml = domain_xml(None, None).replace(
        "<listen type='address'/>", "<listen type='network' network='default'/>"
    )
    assert rewrite_graphics_listen(xml, NEW, set()).xml is None


def test_vnc_graphics_are_not_touched() -> None:
    vnc = f"<graphics type='vnc' listen='{FOREIGN}'><listen type='address' address='{FOREIGN}'/></graphics>"
    res = rewrite_graphics_listen(domain_xml(None, None, extra_devices=vnc), NEW, set())
    assert res.xml is None


def test_no_configured_address_means_no_rewrite_but_still_validates() -> None:
    assert rewrite_graphics_listen(domain_xml(), None, set()).xml is None
    with pytest.raises(HookError, match="malformed"):
        rewrite_graphics_listen("<domain><name>x</name>", None, set())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no domain XML"),
        ("   \n", "no domain XML"),
        ("<domain><name>x</domain>", "malformed domain XML"),
        ("<network><name>x</name></network>", "root element is <network>"),
        ("not xml at all", "malformed domain XML"),
    ],
)
def test_bad_documents_are_one_line_errors(text: str, fragment: str) -> None:
    with pytest.raises(HookError) as info:
        parse_domain(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


_octet = st.integers(min_value=0, max_value=255)
_ipv4 = st.tuples(_octet, _octet, _octet, _octet).map(lambda t: ".".join(map(str, t)))


@settings(max_examples=200, deadline=None)
@given(attr=st.one_of(st.none(), _ipv4), child=st.one_of(st.none(), _ipv4))
def test_after_rewrite_every_spice_address_is_local_or_the_new_one(
    attr: str | None, child: str | None
) -> None:
    res = rewrite_graphics_listen(domain_xml(attr, child), NEW, set())
    out = ET.fromstring(res.xml if res.xml is not None else domain_xml(attr, child))
    g = out.find("./devices/graphics")
    assert g is not None
    for value in (g.get("listen"), g.find("listen").get("address")):  # type: ignore[union-attr]
        assert value is None or value == NEW or is_local_address(value, set())
    # untouched input -> no output, changed input -> output; never half-and-half
    assert (res.xml is None) == (res.changes == ())


# --- the entry point -------------------------------------------------------------------


def test_migrate_begin_prints_rewritten_xml_and_journals(hook_env: Path) -> None:
    rc, out, err = call(["guest1", "migrate", "begin", "-"], domain_xml())
    assert (rc, err) == (0, "")
    assert f'address="{NEW}"' in out
    ET.fromstring(out)
    [row] = journal_rows(hook_env)
    assert (row.object, row.operation, row.suboperation, row.extra) == (
        "guest1",
        "migrate",
        "begin",
        "-",
    )
    assert (row.domain, row.uuid, row.outcome) == ("guest1", UUID, "rewritten")
    assert FOREIGN in row.detail
    assert row.duration_ms is not None
    assert row.pid == os.getpid()
    assert abs(row.ts - time.time()) < 60


def test_migrate_begin_with_local_address_prints_nothing(hook_env: Path) -> None:
    rc, out, err = call(["guest1", "migrate", "begin", "-"], domain_xml("127.0.0.1", "127.0.0.1"))
    assert (rc, out, err) == (0, "", "")
    [row] = journal_rows(hook_env)
    assert row.outcome == "ok"
    assert row.detail == "unchanged: SPICE listen 127.0.0.1 is local here"


def test_migrate_begin_without_any_listen_address_says_so(hook_env: Path) -> None:
    rc, out, err = call(["guest1", "migrate", "begin", "-"], domain_xml(None, None))
    assert (rc, out, err) == (0, "", "")
    [row] = journal_rows(hook_env)
    assert row.detail.startswith("unchanged: no SPICE listen address in the XML")


def test_spice_listen_addresses_are_reported_in_order() -> None:
    res = rewrite_graphics_listen(domain_xml(FOREIGN, "127.0.0.1"), None, set())
    assert res.seen == (FOREIGN, "127.0.0.1")
    assert rewrite_graphics_listen(domain_xml(None, None), NEW, set()).seen == ()


@pytest.mark.parametrize(
    ("op", "sub", "extra"),
    [
        ("prepare", "begin", "-"),
        ("start", "begin", "-"),
        ("started", "begin", "-"),
        ("stopped", "end", "-"),
        ("release", "end", "migrated"),
        ("restore", "begin", "-"),
        ("reconnect", "begin", "-"),
        ("migrate", "end", "-"),
    ],
)
def test_other_operations_print_nothing_and_journal(
    hook_env: Path, op: str, sub: str, extra: str
) -> None:
    rc, out, err = call(["guest1", op, sub, extra], domain_xml())
    assert (rc, out, err) == (0, "", "")
    [row] = journal_rows(hook_env)
    assert (row.operation, row.suboperation, row.extra) == (op, sub, extra)
    assert (row.domain, row.uuid, row.outcome) == ("guest1", UUID, "ok")


def test_empty_stdin_outside_migrate_is_tolerated(hook_env: Path) -> None:
    rc, out, err = call(["-", "shutdown", "-", "shutdown"], "")
    assert (rc, out, err) == (0, "", "")
    [row] = journal_rows(hook_env)
    assert row.domain is None
    assert row.detail == "no XML on stdin"


@pytest.mark.parametrize("fail_closed", [False, True])
@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (["guest1", "migrate", "begin", "-"], "<domain><name>", "malformed domain XML"),
        (["guest1", "migrate", "begin", "-"], "", "no domain XML on stdin"),
        (["guest1", "prepare", "begin", "-"], "<oops", "malformed domain XML"),
        (["guest1", "migrate"], domain_xml(), "expected 4 arguments"),
        ([], domain_xml(), "got 0"),
    ],
)
def test_bad_input_is_one_line_and_honours_fail_mode(
    hook_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    fail_closed: bool,
    args: list[str],
    stdin: str,
    fragment: str,
) -> None:
    if fail_closed:
        monkeypatch.setenv("SPICE_LIBVIRT_FAIL_CLOSED", "true")
    rc, out, err = call(args, stdin)
    assert rc == (1 if fail_closed else 0)
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("spice-libvirt-hook: ")
    assert fragment in err
    [row] = journal_rows(hook_env)
    assert row.outcome == "error"
    assert fragment in row.detail


def test_invalid_config_fails_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("fail_closed = true\nbogus = 1\n")
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(cfg))
    rc, out, err = call(["guest1", "migrate", "begin", "-"], domain_xml())
    assert (rc, out) == (0, "")
    assert "bogus: unknown key" in err
    assert "failing open" in err


@pytest.mark.parametrize("fail_closed", [False, True])
def test_unwritable_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_closed: bool
) -> None:
    (tmp_path / "file").write_text("x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'spice_address = "{NEW}"\njournal_path = "{tmp_path}/file/j.sqlite3"\n'
        f"fail_closed = {str(fail_closed).lower()}\n"
    )
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(cfg))
    rc, out, err = call(["guest1", "migrate", "begin", "-"], domain_xml())
    assert "journal" in err
    assert "(continuing)" in err
    # the rewrite worked; losing a journal row must not stop the migration, not even
    # with fail_closed (the journal is bookkeeping, not a condition of the operation)
    assert rc == 0
    assert NEW in out
    ET.fromstring(out)


def test_hook_never_imports_libvirt(hook_env: Path) -> None:
    """Run the hook with ``import libvirt`` made to explode: it must never try."""
    code = f"""
import sys, io
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "libvirt" or name.startswith("libvirt.") or name == "libvirtaio":
            raise ImportError("the hook imported libvirt")
        return None
sys.meta_path.insert(0, Refuse())
from spice_libvirt.hook import qemu_hook
xml = {domain_xml()!r}
for op in (["g", "migrate", "begin", "-"], ["g", "prepare", "begin", "-"], ["g", "release", "end", "-"]):
    out, err = io.StringIO(), io.StringIO()
    assert qemu_hook.main(op, io.StringIO(xml), out, err) == 0, err.getvalue()
    assert err.getvalue() == "", err.getvalue()
assert not any(m == "libvirt" or m.startswith("libvirt.") for m in sys.modules)
print("clean")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"
    for src in Path(qemu_hook.__file__).parent.glob("*.py"):
        text = src.read_text()
        assert "import libvirt" not in text
        assert "from libvirt" not in text


# --- the real executable ---------------------------------------------------------------


def _console(
    args: list[str], stdin: str, env_extra: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", **env_extra}
    return subprocess.run(
        [str(HOOK_EXE), *args], input=stdin, capture_output=True, text=True, timeout=10, env=env,
        check=False,
    )  # fmt: skip


@pytest.mark.skipif(not HOOK_EXE.exists(), reason="spice-libvirt not installed into the venv")
def test_console_script_reads_sys_argv_and_is_quick(hook_env: Path) -> None:
    env = {"SPICE_LIBVIRT_CONFIG": os.environ["SPICE_LIBVIRT_CONFIG"]}
    xml = domain_xml().replace("guest1", "gäst-ünïcode")
    t0 = time.monotonic()
    proc = _console(["gäst-ünïcode", "migrate", "begin", "-"], xml, env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert f'address="{NEW}"' in proc.stdout
    assert "gäst-ünïcode" in proc.stdout
    assert elapsed < 2.0
    [row] = journal_rows(hook_env)
    assert row.domain == "gäst-ünïcode"


@pytest.mark.skipif(not HOOK_EXE.exists(), reason="spice-libvirt not installed into the venv")
@pytest.mark.parametrize("fail_closed", [False, True])
def test_deadline_ends_a_hook_whose_stdin_never_closes(tmp_path: Path, fail_closed: bool) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'journal_path = "{tmp_path}/j.sqlite3"\nhook_timeout_s = 0.6\n'
        f"fail_closed = {str(fail_closed).lower()}\n"
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(HOOK_EXE), "guest1", "migrate", "begin", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "SPICE_LIBVIRT_CONFIG": str(cfg)},
    )
    assert proc.stdin is not None
    proc.stdin.write(b"<domain><name>guest1</name>")  # ... and never the rest, nor EOF
    proc.stdin.flush()
    try:
        proc.wait(timeout=5)  # stdin stays open: only the deadline can end the hook
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdin.close()
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert elapsed < 2.0
    assert proc.returncode == (1 if fail_closed else 0)
    assert out == b""
    assert b"deadline" in err


@pytest.mark.skipif(not HOOK_EXE.exists(), reason="spice-libvirt not installed into the venv")
def test_self_test(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'spice_address = "{NEW}"\njournal_path = "{tmp_path}/j.sqlite3"\n')
    proc = _console(["--self-test"], "", {"SPICE_LIBVIRT_CONFIG": str(cfg)})
    assert proc.returncode == 0, proc.stderr
    assert f"-> {NEW}: ok" in proc.stdout
    assert [e.operation for e in Journal(tmp_path / "j.sqlite3").entries()] == ["self-test"]
    cfg.write_text("hook_timeout_s = 9\n")
    proc = _console(["--self-test"], "", {"SPICE_LIBVIRT_CONFIG": str(cfg)})
    assert proc.returncode == 2
    assert "hook_timeout_s" in proc.stderr


@pytest.mark.parametrize("fail_closed", [False, True])
def test_hard_watchdog_ends_the_process_when_the_soft_deadline_cannot_fire(
    tmp_path: Path, fail_closed: bool
) -> None:
    """SIGALRM blocked (as if stuck in C code): the watchdog thread still ends the hook."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'journal_path = "{tmp_path}/j.sqlite3"\nhook_timeout_s = 0.5\n'
        f"fail_closed = {str(fail_closed).lower()}\n"
    )
    code = (
        "import signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "sys.argv = ['spice-libvirt-hook', 'g', 'migrate', 'begin', '-']\n"
        "from spice_libvirt.hook.qemu_hook import main\n"
        "sys.exit(main())\n"
    )
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "SPICE_LIBVIRT_CONFIG": str(cfg)},
    )
    assert proc.stdin is not None
    try:
        proc.wait(timeout=5)  # stdin never closes
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdin.close()
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert elapsed < 2.0
    assert proc.returncode == (1 if fail_closed else 0)
    assert out == b""
    assert b"hard deadline" in err
