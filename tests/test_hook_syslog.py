"""One syslog line per hook call and per migration, into a real AF_UNIX datagram socket.

There is no systemd (and maybe no ``/dev/log``) on this machine, so each test binds its own
datagram socket in a temporary directory, the way journald and rsyslog bind ``/dev/log``,
and names it in ``syslog_socket``: the hook and the controllers send there exactly what
they would send to ``/dev/log``. Absent and full sockets are dropped silently and fast.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt import syslog_line
from spice_libvirt.hook import install as hi
from spice_libvirt.migration.progress import NullReporter, RunLog, log_migration
from spice_libvirt.migration.report import Endpoint, MigrationFigures, MigrationReport, Outcome

LIBVIRTD_ENV = {"LC_ALL": "C", "PATH": "/usr/bin:/bin"}
XML = (
    "<domain type='kvm'><name>vm9</name><uuid>6a1f0c3e-1b7e-4c55-9f3b-2f5e9f0b1a11</uuid>"
    "<devices><graphics type='spice' listen='{listen}'>"
    "<listen type='address' address='{listen}'/></graphics></devices></domain>"
)
LINE = re.compile(r"^<(\d+)>([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) ([\w-]+)\[(\d+)\]: (.*)$")


@pytest.fixture
def syslogd(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    try:
        yield path, sock
    finally:
        sock.close()


def _receive(sock: socket.socket) -> tuple[int, str, int, str]:
    data = sock.recv(65536).decode()
    m = LINE.match(data)
    assert m, data
    return int(m.group(1)), m.group(3), int(m.group(4)), m.group(5)


def _nothing_more(sock: socket.socket) -> None:
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(65536)


def test_send_is_one_rfc3164_line(syslogd: tuple[Path, socket.socket]) -> None:
    path, sock = syslogd
    assert syslog_line.send("spice-libvirt", "two\nlines", path=str(path))
    pri, tag, pid, text = _receive(sock)
    assert (pri, tag, pid, text) == (3 * 8 + 6, "spice-libvirt", os.getpid(), "two lines")


def test_absent_or_full_socket_is_skipped_fast(syslogd: tuple[Path, socket.socket]) -> None:
    path, _sock = syslogd
    t0 = time.monotonic()
    assert not syslog_line.send("t", "x", path=str(path.parent / "absent"))
    assert not syslog_line.send("t", "x", path="")
    sent = 0
    while syslog_line.send("t", "x" * 1000, path=str(path)):  # nobody reads: the queue fills
        sent += 1
        assert sent < 100_000
    assert sent > 0
    assert not syslog_line.send("t", "x", path=str(path))  # full: dropped, not waited for
    assert time.monotonic() - t0 < 2.0


def _hook(tmp_path: Path, syslog: Path) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'spice_address = "198.51.100.2"\njournal_path = "{tmp_path / "j.sqlite3"}"\n'
        f'syslog_socket = "{syslog}"\n'
    )
    return hi.install(tmp_path / "hooks", config=cfg).path


def _call(shim: Path, args: list[str], xml: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(shim), *args], input=xml, capture_output=True, text=True, timeout=10,
        env=LIBVIRTD_ENV, cwd="/", check=False,
    )  # fmt: skip


def test_each_hook_call_logs_one_line(tmp_path: Path, syslogd: tuple[Path, socket.socket]) -> None:
    path, sock = syslogd
    shim = _hook(tmp_path, path)
    proc = _call(shim, ["vm9", "started", "begin", "-"], XML.format(listen="198.51.100.2"))
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "")
    pri, tag, pid, text = _receive(sock)
    assert (pri, tag) == (30, "spice-libvirt-hook")
    assert pid != os.getpid()
    assert re.fullmatch(r"vm9 started begin -: ok \(\d+ ms\)", text), text
    proc = _call(shim, ["vm9", "migrate", "begin", "-"], XML.format(listen="192.0.2.77"))
    assert proc.returncode == 0
    assert "198.51.100.2" in proc.stdout
    _pri, _tag, _pid, text = _receive(sock)
    assert text.startswith(
        "vm9 migrate begin -: rewritten: graphics listen 192.0.2.77 -> 198.51.100.2"
    )
    proc = _call(shim, ["vm9", "started", "begin", "-"], "<domain><name>")  # malformed
    assert proc.returncode == 0
    assert "malformed" in proc.stderr
    pri, _tag, _pid, text = _receive(sock)
    assert pri == 3 * 8 + 4  # warning
    assert text.startswith("vm9 started begin -: error: malformed domain XML")
    _nothing_more(sock)


def test_hook_without_a_syslog_socket_is_silent(tmp_path: Path) -> None:
    shim = _hook(tmp_path, tmp_path / "no-such-socket")
    proc = _call(shim, ["vm9", "started", "begin", "-"], XML.format(listen="198.51.100.2"))
    assert (proc.returncode, proc.stderr, proc.stdout) == (0, "", "")


def _report(outcome: Outcome, status: str) -> MigrationReport:
    return MigrationReport(
        outcome=outcome,
        seamless=outcome == "seamless",
        started_at=dt.datetime.now(dt.UTC),
        source=Endpoint(qmp="/run/a.qmp"),
        destination=Endpoint(qmp="/run/b.qmp"),
        migrate_uri="tcp:127.0.0.1:4444",
        client_target="127.0.0.1:5901",
        migration=MigrationFigures(status=status),
    )


def test_each_migration_logs_one_line(
    syslogd: tuple[Path, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = syslogd
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(path.parent / "config.toml"))
    (path.parent / "config.toml").write_text(f'syslog_socket = "{path}"\n')
    run = RunLog(NullReporter(), sink=log_migration)  # the controllers' run log
    report = _report("seamless", "completed")
    run.fill(report)  # what both controllers call once per migration, with the verdict
    pri, tag, _pid, text = _receive(sock)
    assert (pri, tag) == (30, "spice-libvirt")
    assert re.fullmatch(
        r"migration /run/a\.qmp /run/a\.qmp -> /run/b\.qmp: seamless \(exit 0\), \d+ ms", text
    ), text
    assert log_migration(_report("switch-host", "completed"))
    pri, _tag, _pid, text = _receive(sock)
    assert pri == 28
    assert ": switch-host (exit 8)" in text
    _nothing_more(sock)
