"""Every file the product creates gets an explicit mode, and a planted symlink or a
directory others can write is refused with nothing written (:mod:`spice_libvirt.files`).

The journal is written by the real hook, run as libvirtd runs it, with umask 000; the
agent's files by the agent's own functions (its service needs libvirt: its files are the
same calls); the shim by ``hook install``; the timeline by the CLI's own writer.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt.agent import holdfile
from spice_libvirt.agent.record import AgentStatus, write_status
from spice_libvirt.agent.service import single_instance
from spice_libvirt.cli import main as cli_main
from spice_libvirt.errors import AgentError, HookError, UnsafePathError
from spice_libvirt.files import ensure_directory, write_file
from spice_libvirt.hook import install as hi
from spice_libvirt.hook.journal import Journal, JournalEntry
from tests.test_hook import domain_xml
from tests.test_hook_launch import LIBVIRTD_ENV


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _hook(shim: Path, cfg: Path) -> subprocess.CompletedProcess[str]:
    """One real hook call, through the installed shim, with umask 000."""
    return subprocess.run(
        [str(shim), "guest1", "start", "begin", "-"],
        input=domain_xml(), capture_output=True, text=True, timeout=20, check=False,
        env={**LIBVIRTD_ENV, "SPICE_LIBVIRT_CONFIG": str(cfg)}, cwd="/", umask=0,
    )  # fmt: skip


@contextlib.contextmanager
def _reader(journal: Path) -> Iterator[None]:
    """A reader holding the journal open (with umask 000), as ``spice-libvirt journal``."""
    old = os.umask(0)
    try:
        conn = sqlite3.connect(journal)
        conn.execute("SELECT count(*) FROM invocations").fetchone()
    finally:
        os.umask(old)
    try:
        yield
    finally:
        conn.close()


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(shim, config, journal) of a hook installed with umask 000; the journal's directory
    does not exist yet."""
    journal = tmp_path / "state" / "journal.sqlite3"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'journal_path = "{journal}"\n')
    old = os.umask(0)
    try:
        shim = hi.install(tmp_path / "hooks", config=cfg).path
    finally:
        os.umask(old)
    return shim, cfg, journal


def test_with_umask_000_the_journal_and_its_wal_and_shm_are_private(
    host: tuple[Path, Path, Path],
) -> None:
    shim, cfg, journal = host
    assert mode(shim) == 0o755  # runs as root from libvirtd; names nothing
    assert mode(shim.parent) == 0o755
    done = _hook(shim, cfg)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert mode(journal.parent) == 0o700
    assert mode(journal) == 0o600
    # SQLite removes -wal and -shm when the last connection closes: a reader holds them
    # open (created under umask 000 too) while the hook writes again
    with _reader(journal):
        done = _hook(shim, cfg)
        assert done.returncode == 0, done.stderr
        for path in (journal, Path(f"{journal}-wal"), Path(f"{journal}-shm")):
            assert mode(path) == 0o600, (path, oct(mode(path)))
    assert Journal(journal).count() == 2


def test_an_older_world_readable_journal_is_narrowed(host: tuple[Path, Path, Path]) -> None:
    shim, cfg, journal = host
    journal.parent.mkdir(mode=0o755)
    Journal(journal).record(JournalEntry(ts=1.0, object="g", operation="start"))
    with _reader(journal):
        for path in journal.parent.iterdir():
            os.chmod(path, 0o644)  # as an older version's umask left them
        assert _hook(shim, cfg).returncode == 0
        assert {p.name: mode(p) for p in journal.parent.iterdir()} == {
            journal.name: 0o600,
            f"{journal.name}-wal": 0o600,
            f"{journal.name}-shm": 0o600,
        }


@pytest.mark.parametrize("planted", ["", "-wal", "-shm"])
def test_a_symlink_planted_for_the_journal_is_refused_nothing_written(
    host: tuple[Path, Path, Path], tmp_path: Path, planted: str
) -> None:
    shim, cfg, journal = host
    journal.parent.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    os.symlink(victim, f"{journal}{planted}")
    done = _hook(shim, cfg)
    assert done.returncode == 0  # the journal is never a condition of the guest operation
    assert "is a symbolic link; refused, nothing written" in done.stderr
    assert done.stderr.count("\n") == 1
    assert victim.read_text() == "root's file\n"
    assert mode(victim) == 0o644
    if planted:
        assert not journal.exists() or journal.stat().st_size == 0


def test_a_journal_in_a_directory_others_can_write_is_refused(
    host: tuple[Path, Path, Path],
) -> None:
    shim, cfg, journal = host
    journal.parent.mkdir()
    os.chmod(journal.parent, 0o1777)  # like /tmp
    done = _hook(shim, cfg)
    assert done.returncode == 0
    assert "is writable by its group and others (mode 1777)" in done.stderr
    assert list(journal.parent.iterdir()) == []
    with pytest.raises(HookError, match="is writable by"):
        Journal(journal).record(JournalEntry(ts=1.0, object="g", operation="start"))


def test_the_agents_files_are_private_with_umask_000(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    record = holdfile.HoldRecord(
        domain="vm", uuid="u-1", speed_mibs=100, downtime_ms=300, held_since=1.0, agent_pid=1
    )
    old = os.umask(0)
    try:
        holdfile.write(state, record)
        write_status(state, AgentStatus(pid=1, started_at="now", connect="qemu:///system"))
        with single_instance(state):
            pass
    finally:
        os.umask(old)
    assert mode(state) == 0o700
    assert mode(state / "holds") == 0o700
    assert mode(state / "holds" / "u-1.json") == 0o600
    assert mode(state / "status.json") == 0o600
    assert mode(state / "agent.lock") == 0o600
    assert sorted(p.name for p in state.rglob("*")) == [
        "agent.lock", "holds", "status.json", "u-1.json",
    ]  # fmt: skip


def test_an_existing_state_dir_open_to_others_is_refused_not_chmodded(tmp_path: Path) -> None:
    shared = tmp_path / "etc-like"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(UnsafePathError, match=r"open to others \(mode 0755\)"):
        holdfile.ensure_dir(shared)
    assert mode(shared) == 0o755
    assert list(shared.iterdir()) == []
    link = tmp_path / "link"
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link.symlink_to(private)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        holdfile.ensure_dir(link)
    record = holdfile.HoldRecord(
        domain="vm", uuid="u-1", speed_mibs=1, downtime_ms=1, held_since=1.0, agent_pid=1
    )
    with pytest.raises(AgentError, match="symbolic link"):
        holdfile.write(link, record)
    assert list(private.iterdir()) == []


def test_a_symlink_planted_for_a_hold_record_or_the_status_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "agent"
    holdfile.ensure_dir(state)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (state / "holds" / "u-1.json").symlink_to(victim)
    (state / "status.json").symlink_to(victim)
    record = holdfile.HoldRecord(
        domain="vm", uuid="u-1", speed_mibs=1, downtime_ms=1, held_since=1.0, agent_pid=1
    )
    with pytest.raises(AgentError, match="symbolic link"):
        holdfile.write(state, record)
    write_status(state, AgentStatus(pid=1, started_at="now", connect="x"))  # logged, refused
    assert victim.read_text() == "keep\n"
    (state / "agent.lock").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"), single_instance(state):
        pass


def test_write_file_is_atomic_with_its_own_mode_and_refuses_links(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    old = os.umask(0o077)
    try:
        write_file(target, "{}", 0o644)
    finally:
        os.umask(old)
    assert mode(target) == 0o644
    assert target.read_text() == "{}"
    write_file(target, b"[]")
    assert (mode(target), target.read_bytes()) == (0o600, b"[]")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary left
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        write_file(link, "x")
    assert target.read_bytes() == b"[]"
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(UnsafePathError, match="is writable by"):
        write_file(shared / "x", "x")
    with pytest.raises(UnsafePathError, match="is writable by"):
        ensure_directory(shared / "sub")
    assert list(shared.iterdir()) == []


def test_a_timeline_to_a_symlink_is_refused_before_anything_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "t.svg").symlink_to(victim)
    with pytest.raises(SystemExit) as exit_:
        cli_main(
            [
                "migrate",
                "vm",
                "--to",
                "qemu+tcp://nowhere/system",
                "--timeline",
                str(tmp_path / "t.svg"),
            ]
        )
    assert exit_.value.code == 2
    assert "symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "keep\n"


def test_a_timeline_is_private(tmp_path: Path) -> None:
    from spice_libvirt.migration.timeline import write_timeline
    from tests.test_timeline import _report

    old = os.umask(0)
    try:
        path = write_timeline(_report("libvirt-seamless"), tmp_path / "t.svg")
    finally:
        os.umask(old)
    assert mode(Path(path)) == 0o600
    assert Path(path).read_text().startswith("<svg")


def test_the_files_module_imports_only_os() -> None:
    done = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; before = set(sys.modules); "
         "import spice_libvirt.files; print(sorted(set(sys.modules) - before))"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    loaded = done.stdout
    for heavy in ("pathlib", "stat'", "contextlib", "typing", "re'"):
        assert heavy not in loaded, loaded
