"""The CLI's node_exporter textfile (cli/textfile.py, cli/outcomes.py): counts kept across
runs and concurrent writers, the file's mode and atomic replacement, a symlink or a foreign
file refused in one line, ``promtool check metrics`` and a real node_exporter reading it;
and ``migrate`` through the command line counting a failure there and in the journal."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt.cli import outcomes, textfile
from spice_libvirt.cli.textfile import TextfileError, add_outcomes, parse, render
from spice_libvirt.hook.journal import Journal

PROMTOOL = shutil.which("promtool")
NODE_EXPORTER = shutil.which("prometheus-node-exporter")
MIGRATIONS = "spice_libvirt_controller_migrations_total"


def counts(path: Path) -> dict[tuple[str, str], float]:
    return parse(path.read_text())[0]


def test_counts_accumulate_across_runs(tmp_path: Path) -> None:
    prom = tmp_path / "spice_libvirt.prom"
    add_outcomes(prom, "migrate", ["seamless"], 1000.0)
    add_outcomes(prom, "migrate", ["seamless", "switch-host"], 1001.0)
    add_outcomes(prom, "evacuate", ["seamless"] * 3, 1002.0)
    assert counts(prom) == {
        ("migrate", "seamless"): 2.0,
        ("migrate", "switch-host"): 1.0,
        ("evacuate", "seamless"): 3.0,
    }
    assert parse(prom.read_text())[1] == {"migrate": 1001.0, "evacuate": 1002.0}
    assert f'{MIGRATIONS}{{command="evacuate",outcome="seamless"}} 3.0' in prom.read_text()


def test_the_file_is_0644_whatever_the_umask_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    prom = tmp_path / "spice_libvirt.prom"
    old = os.umask(0o077)
    try:
        add_outcomes(prom, "migrate", ["seamless"], 1.0)
    finally:
        os.umask(old)
    assert prom.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["spice_libvirt.prom"]


def test_the_file_is_replaced_not_rewritten_in_place(tmp_path: Path) -> None:
    """A reader holding the old file keeps a whole one (node_exporter mid-scrape)."""
    prom = tmp_path / "spice_libvirt.prom"
    add_outcomes(prom, "migrate", ["seamless"], 1.0)
    with prom.open() as old:
        before = os.fstat(old.fileno()).st_ino
        add_outcomes(prom, "migrate", ["failed"], 2.0)
        assert prom.stat().st_ino != before
        assert parse(old.read())[0] == {("migrate", "seamless"): 1.0}


def test_a_symlink_in_its_place_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    prom = tmp_path / "spice_libvirt.prom"
    prom.symlink_to(target)
    with pytest.raises(TextfileError, match="is a symlink: refused"):
        add_outcomes(prom, "migrate", ["seamless"], 1.0)
    assert target.read_text() == ""


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("this is not { the text format\n", "not a metrics file"),
        ("x" * (textfile.MAX_BYTES + 1), "larger than"),
    ],
)
def test_a_file_that_is_not_ours_is_left_alone(tmp_path: Path, content: str, error: str) -> None:
    prom = tmp_path / "spice_libvirt.prom"
    prom.write_text(content)
    with pytest.raises(TextfileError, match=error):
        add_outcomes(prom, "migrate", ["seamless"], 1.0)
    assert prom.read_text() == content


def test_a_missing_directory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TextfileError, match="No such file or directory"):
        add_outcomes(tmp_path / "absent" / "x.prom", "migrate", ["seamless"], 1.0)


def _add_five(path: str) -> None:
    for _ in range(5):
        add_outcomes(Path(path), "evacuate", ["seamless"], time.time())


def test_concurrent_runs_lose_no_count(tmp_path: Path) -> None:
    prom = tmp_path / "spice_libvirt.prom"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_five, args=(str(prom),)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    assert counts(prom) == {("evacuate", "seamless"): 30.0}


def test_promtool_finds_nothing_to_lint() -> None:
    assert PROMTOOL is not None, "promtool missing: bash scripts/setup.sh installs prometheus"
    text = render({("migrate", "seamless"): 4.0, ("evacuate", "error"): 1.0}, {"migrate": 5.0})
    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout == ""


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real node_exporter on loopback with only its textfile collector: (dir, address)."""
    assert NODE_EXPORTER is not None, "prometheus-node-exporter missing: bash scripts/setup.sh"
    directory = tmp_path / "textfile"
    directory.mkdir()
    log = tmp_path / "node_exporter.log"
    argv = [
        NODE_EXPORTER,
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={directory}",
        "--web.listen-address=127.0.0.1:0",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        address = None
        while address is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r'msg="Listening on" address=(\S+)', log.read_text())
            address = found.group(1) if found else None
            time.sleep(0.05)
        assert address is not None, log.read_text()
        yield directory, address
    finally:
        proc.terminate()
        proc.wait(10)


def test_node_exporter_reads_what_migrate_and_evacuate_wrote(
    node_exporter: tuple[Path, str],
) -> None:
    directory, address = node_exporter
    prom = directory / "spice_libvirt.prom"
    add_outcomes(prom, "migrate", ["seamless", "seamless", "switch-host"], time.time())
    add_outcomes(prom, "evacuate", ["seamless"], time.time())
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "node_textfile_scrape_error 0" in text
    assert f'{MIGRATIONS}{{command="migrate",outcome="seamless"}} 2' in text
    assert f'{MIGRATIONS}{{command="migrate",outcome="switch-host"}} 1' in text
    assert f'{MIGRATIONS}{{command="evacuate",outcome="seamless"}} 1' in text


# ----------------------------------------------------------------------------- the CLI


def _config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "config.toml"
    (tmp_path / "state").mkdir()
    config.write_text(
        f'journal_path = "{tmp_path / "state" / "journal.sqlite3"}"\n'
        f'metrics_textfile = "{tmp_path / "spice_libvirt.prom"}"\n' + extra
    )
    return config


def test_record_writes_the_textfile_and_one_controller_row_per_migration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(_config(tmp_path)))
    outcomes.record(
        "evacuate",
        [
            outcomes.Outcome("vm1", "qemu+tcp://b/system", "seamless", held_ms=1200.0),
            outcomes.Outcome("vm2", "qemu+tcp://b/system", "switch-host", reason="a new id"),
        ],
    )
    assert counts(tmp_path / "spice_libvirt.prom") == {
        ("evacuate", "seamless"): 1.0,
        ("evacuate", "switch-host"): 1.0,
    }
    rows = Journal(tmp_path / "state" / "journal.sqlite3").entries(limit=None)
    assert [(r.source, r.operation, r.domain, r.suboperation) for r in reversed(rows)] == [
        ("controller", "evacuate", "vm1", "seamless"),
        ("controller", "evacuate", "vm2", "switch-host"),
    ]
    assert json.loads(rows[0].detail)["reason"] == "a new id"


def test_without_the_journal_directory_no_journal_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A management machine (no spice-libvirt state directory) keeps no journal."""
    config = tmp_path / "config.toml"
    config.write_text(f'journal_path = "{tmp_path / "absent" / "journal.sqlite3"}"\n')
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(config))
    outcomes.record("migrate", [outcomes.Outcome("vm", "qemu+tcp://b/system", "seamless")])
    assert not (tmp_path / "absent").exists()


def test_a_bad_textfile_setting_is_refused_by_the_configuration(tmp_path: Path) -> None:
    from spice_libvirt.config import load_config
    from spice_libvirt.errors import ConfigError

    config = tmp_path / "config.toml"
    config.write_text('metrics_textfile = "/var/lib/prometheus/node-exporter/x.txt"\n')
    with pytest.raises(ConfigError, match=r"metrics_textfile: must end in \.prom"):
        load_config(config)


def test_migrate_that_fails_is_counted_as_error_and_keeps_its_exit_code(tmp_path: Path) -> None:
    """The real command line: the source libvirtd is unreachable (nothing listens on that
    loopback port), so the command fails before any verdict; the failure still counts."""
    config = _config(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "migrate", "vm",
         "--from", f"qemu+tcp://127.0.0.1:{closed_port()}/system",
         "--to", "qemu+tcp://127.0.0.1:1/system"],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SPICE_LIBVIRT_CONFIG": str(config)},
    )  # fmt: skip
    assert done.returncode not in (0, 1), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("spice-libvirt: error: ")
    assert counts(tmp_path / "spice_libvirt.prom") == {("migrate", "error"): 1.0}
    (row,) = Journal(tmp_path / "state" / "journal.sqlite3").entries(limit=None)
    assert (row.source, row.domain, row.outcome) == ("controller", "vm", "error")
    assert json.loads(row.detail)["reason"] in done.stderr


def test_a_broken_configuration_is_a_warning_after_the_migration_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("metrics_textfile = 7\n")
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(config))
    outcomes.record("migrate", [outcomes.Outcome("vm", "qemu+tcp://b/system", "seamless")])
    assert "outcomes not recorded" in caplog.text


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: the kernel refuses it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
