"""The fault matrix for the hook: libvirt's side of a migration when the hook is in trouble.

libvirtd runs ``/etc/libvirt/hooks/qemu.d/50-spice-libvirt`` with the domain XML on stdin
and waits for it; a hook that hangs blocks the guest operation, a hook that prints half a
document corrupts it, a hook that refuses (exit 1 with ``fail_closed``) aborts it. So each
scenario here runs the *installed shim* (what :func:`spice_libvirt.hook.install.install`
writes: ``sh`` execs the venv's interpreter with ``-I -S`` on ``hook/launch.py``, the
configuration baked in) with libvirt's arguments and a scrubbed environment, breaks one
thing -- the configuration, the journal's file system (a tiny tmpfs mounted and unmounted
here), the size of stdin, the number of calls at once -- and checks the same invariants:

* libvirt is never blocked past the hook's deadline (``hook_timeout_s``, 2 s here; the bound
  asserted adds :data:`SLACK_S` for interpreter start on a loaded shared machine, and the
  row records what was measured);
* the exit code is the documented one (0: success or fail-open; 1: refused, only with
  ``fail_closed`` and only for the hook's own reasons -- never for its journal);
* stdout is empty (libvirt keeps its XML) or the whole document rewritten correctly: the
  same tree with only the SPICE listen address changed;
* nothing keeps running: no process with this scenario's configuration in its environment
  is left, the tmpfs is gone.

``tests/test_hook_hardening.py`` tests the same conditions piece by piece (and in-process
where that is the sharper instrument); these are the matrix's rows, one per scenario.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spice_libvirt.hook.install import install
from tests import faults
from tests.test_hook import FOREIGN, NEW
from tests.test_hook_hardening import (
    StdinFlood,
    assert_metadata_kept,
    config,
    fill,
    metadata_xml,
)

ARGS = ["guest1", "migrate", "begin", "-"]
DEADLINE_S = 2.0
#: interpreter start (before the hook's clock runs) and scheduling on a loaded 2-core machine
SLACK_S = 5.0
#: libvirt's hook environment: no inherited variables, the C locale, a minimal PATH
LIBVIRT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

needs_root = pytest.mark.root  # mounting a tmpfs


@dataclass
class Call:
    returncode: int
    stdout: bytes
    stderr: bytes
    blocked_s: float
    #: bytes of stdin the hook took before it closed its end
    accepted: int = 0


def shim(tmp: Path, cfg: Path) -> Path:
    """Install the shim into a private hooks directory, as ``hook install`` does."""
    result = install(tmp / "hooks", config=cfg)
    assert result.path.is_file()
    return result.path


def run_hook(hook: Path, stdin: bytes) -> Call:
    t0 = time.monotonic()
    proc = subprocess.run(
        ["/bin/sh", str(hook), *ARGS], input=stdin, capture_output=True,
        env=LIBVIRT_ENV, timeout=DEADLINE_S + 60, check=False,
    )  # fmt: skip
    return Call(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0, len(stdin))


def start_hook(hook: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["/bin/sh", str(hook), *ARGS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=LIBVIRT_ENV,
    )  # fmt: skip


def leftovers(cfg: Path) -> list[int]:
    """PIDs of processes that carry this scenario's configuration in their environment."""
    needle = f"SPICE_LIBVIRT_CONFIG={cfg}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def _tree(e: ET.Element) -> tuple[object, ...]:
    return (
        e.tag,
        sorted(e.attrib.items()),
        (e.text or "").strip(),
        [_tree(c) for c in e],
    )


def rewritten_correctly(original: str, out: bytes) -> bool:
    """``out`` is ``original`` with only the SPICE listen address changed to :data:`NEW`."""
    expected = ET.fromstring(original.replace(FOREIGN, NEW))
    return _tree(ET.fromstring(out)) == _tree(expected)


def xml_verdict(original: str, call: Call) -> str:
    """How libvirt's XML came out of the call: unchanged, rewritten, or broken."""
    if call.stdout == b"":
        return "unchanged"
    try:
        return "rewritten" if rewritten_correctly(original, call.stdout) else "wrong"
    except ET.ParseError:
        return "broken"


def check_and_record(
    scenario: str, cfg: Path, original: str, calls: list[Call], **extra: object
) -> None:
    """The invariants, recorded first (a row even when an assertion fails below)."""
    left = leftovers(cfg)
    verdicts = [xml_verdict(original, c) for c in calls]
    codes = sorted({c.returncode for c in calls})
    faults.record_row(
        path="hook",
        scenario=scenario,
        exit_code=codes[0] if len(codes) == 1 else None,
        exit_codes=codes,
        calls=len(calls),
        blocked_s=round(max(c.blocked_s for c in calls), 3),
        deadline_s=DEADLINE_S,
        xml=sorted(set(verdicts)),
        leftovers=len(left),
        stderr=sorted({c.stderr.decode(errors="replace").strip()[:160] for c in calls})[:3],
        **extra,
    )
    assert left == []
    for call, verdict in zip(calls, verdicts, strict=True):
        assert call.blocked_s < DEADLINE_S + SLACK_S, call
        assert verdict in ("unchanged", "rewritten"), (verdict, call.stdout[:300])
        assert call.returncode in (0, 1), call
        assert call.stderr.count(b"\n") <= 1, call.stderr  # one line for libvirt's log
        if call.returncode == 1:  # a refusal must be the hook's deadline, never its journal
            assert verdict == "unchanged"
            assert b"deadline" in call.stderr, call.stderr
            assert b"journal" not in call.stderr, call.stderr


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``where``, unmounted (and checked gone) afterwards."""
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        assert str(where) not in Path("/proc/mounts").read_text()


# --------------------------------------------------------------------------- the scenarios


@pytest.mark.parametrize(
    ("variant", "content"),
    [
        ("not TOML", "fail_closed = true\nspice_address = ["),
        ("deadline out of range", "fail_closed = true\nhook_timeout_s = 60\n"),
        ("missing file", None),
    ],
)
def test_broken_config_fails_open_in_time(
    tmp_path: Path, variant: str, content: str | None
) -> None:
    """A configuration the hook cannot read cannot be trusted to say ``fail_closed``: libvirt
    gets its XML back unchanged, exit 0, one line saying why."""
    cfg = tmp_path / "config.toml"
    if content is not None:
        cfg.write_text(content)
    original = metadata_xml()
    call = run_hook(shim(tmp_path, cfg), original.encode())
    check_and_record(f"broken config ({variant})", cfg, original, [call])
    assert (call.returncode, call.stdout) == (0, b"")
    assert b"failing open" in call.stderr, call.stderr


@needs_root
@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_journal_in_trouble_never_refuses(tmp_path: Path, trouble: str) -> None:
    """The journal on a tiny tmpfs, filled or remounted read-only, with ``fail_closed``:
    the journal is bookkeeping, so the XML is still rewritten and the exit code is 0."""
    original = metadata_xml()
    with tiny_tmpfs(tmp_path / "fs") as fs:
        cfg = config(tmp_path, fs / "j.sqlite3", fail_closed=True, hook_timeout_s=DEADLINE_S)
        hook = shim(tmp_path, cfg)
        first = run_hook(hook, original.encode())  # journal created while there is room
        assert (first.returncode, first.stderr) == (0, b"")
        if trouble == "full":
            fill(fs)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        calls = [run_hook(hook, original.encode()) for _ in range(2)]  # the 2nd finds the WAL
        check_and_record(f"journal {trouble} (fail_closed)", cfg, original, calls)
    for call in calls:
        assert call.returncode == 0, call.stderr
        assert_metadata_kept(call.stdout.decode())
        assert b"(continuing)" in call.stderr, call.stderr


def test_100_mib_on_stdin_is_declined_in_time(tmp_path: Path) -> None:
    """libvirt writing 100 MiB: the hook reads its bound, declines (fail-open even with
    ``fail_closed``: nothing to rewrite), and closes its stdin; libvirt is not kept writing."""
    cfg = config(tmp_path, tmp_path / "j.sqlite3", fail_closed=True, hook_timeout_s=DEADLINE_S)
    hook = shim(tmp_path, cfg)
    proc = start_hook(hook)
    flood = StdinFlood(proc)
    t0 = time.monotonic()
    writer = flood.thread
    writer.start()
    try:
        proc.wait(timeout=DEADLINE_S + 60)  # stdout and stderr are a line at most: no pipe fills
    finally:
        if proc.poll() is None:  # only ours, by PID
            proc.kill()
            proc.wait(timeout=10)
    blocked = time.monotonic() - t0
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    writer.join(timeout=30)
    assert not writer.is_alive()  # libvirt's writer is not left hanging on a full pipe
    call = Call(proc.returncode, out, err, blocked, flood.sent)
    check_and_record(
        "100 MiB on stdin (fail_closed)", cfg, "<domain/>", [call], mib_accepted=flood.sent >> 20
    )
    assert (call.returncode, call.stdout) == (0, b"")
    assert b"larger than" in call.stderr
    assert flood.sent < flood.total  # it stopped reading: the rest hit a closed pipe


def _at_once(hook: Path, stdin: bytes, n: int) -> list[Call]:
    """``n`` shims started together, as libvirtd does for ``n`` domains at once."""
    t0 = time.monotonic()
    procs = [start_hook(hook) for _ in range(n)]
    done: dict[int, float] = {}
    results: dict[int, tuple[bytes, bytes]] = {}

    def talk(i: int, p: subprocess.Popen[bytes]) -> None:
        results[i] = p.communicate(stdin, timeout=DEADLINE_S + 60)
        done[i] = time.monotonic()

    threads = [threading.Thread(target=talk, args=(i, p)) for i, p in enumerate(procs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S + 90)
    finally:
        for p in procs:
            if p.poll() is None:  # only ours, by PID
                p.kill()
                p.wait(timeout=10)
    return [Call(p.returncode, *results[i], done[i] - t0, len(stdin)) for i, p in enumerate(procs)]


@pytest.mark.parametrize("lock_held", [False, True], ids=["free", "journal-locked"])
def test_16_concurrent_calls_failing_closed(tmp_path: Path, lock_held: bool) -> None:
    """16 calls at once with ``fail_closed`` (and, second variant, another process holding
    the journal's write lock the whole time): no call is refused because of the journal and
    every document is whole. A call whose interpreter did not even start within its budget
    on a loaded machine is refused by design (exit 1, "deadline"); the row counts them."""
    journal = tmp_path / "j.sqlite3"
    cfg = config(tmp_path, journal, fail_closed=True, hook_timeout_s=DEADLINE_S)
    hook = shim(tmp_path, cfg)
    original = metadata_xml()
    assert run_hook(hook, original.encode()).returncode == 0  # creates the journal
    holder = sqlite3.connect(journal, isolation_level=None)
    try:
        if lock_held:
            holder.execute("BEGIN IMMEDIATE")
        calls = _at_once(hook, original.encode(), 16)
    finally:
        holder.close()
    late = sum(c.returncode == 1 for c in calls)
    continuing = sum(b"(continuing)" in c.stderr for c in calls)
    label = "journal locked" if lock_held else "journal free"
    check_and_record(
        f"16 concurrent calls, fail_closed, {label}",
        cfg,
        original,
        calls,
        past_deadline=late,
        journal_skipped=continuing,
        load_1m=round(os.getloadavg()[0], 2),
    )
    for call in calls:
        if call.returncode == 0:
            assert_metadata_kept(call.stdout.decode())
    if lock_held:
        assert continuing == 16 - late
