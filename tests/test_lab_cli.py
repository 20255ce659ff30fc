"""The one lab command line: its libvirt-only actions, its lab directory checks, and the
``migrate`` forms, through the real ``spice-libvirt`` entry point (no lab is built here).

The command runs in this process (``spice_libvirt.cli.main``, what the console script
calls): every case here is refused before anything starts, so an interpreter start per
case would only cost time. The default lab directory case runs the real console entry."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spice_libvirt.cli import build_parser, main
from spice_libvirt.cli.migrate import FORMS
from spice_libvirt.exitcodes import ExitCode


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``spice-libvirt ARGS`` in this process: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(
        ["spice-libvirt", *args], status, out.getvalue(), err.getvalue()
    )


def test_rtt_without_a_libvirt_lab_is_a_lab_error(lab_dir: Path) -> None:
    done = cli("lab", "--dir", str(lab_dir), "rtt")
    assert done.returncode == ExitCode.LAB, done.stderr
    assert "lab up --libvirt" in done.stderr


def test_purge_refuses_a_name_that_is_not_a_lab_prefix() -> None:
    done = cli("lab", "purge", "not-a-lab")
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "not a lab prefix" in done.stderr


def test_a_lab_directory_others_can_write_is_refused(lab_dir: Path) -> None:
    shared = lab_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    done = cli("lab", "--dir", str(shared), "status")
    assert done.returncode == ExitCode.LAB, done.stderr
    assert "is writable by" in done.stderr
    assert not (shared / "lab.lock").exists()  # refused before anything was created in it


def test_default_lab_directory_is_created_private(lab_dir: Path) -> None:
    """``$SPICE_LIBVIRT_LAB_DIR`` (missing parents included) is made 0700 by ``lab down``."""
    target = lab_dir / "new" / "lab"
    env = {**os.environ, "SPICE_LIBVIRT_LAB_DIR": str(target)}
    done = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "lab", "down"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == ExitCode.OK, done.stderr
    assert "no lab was up" in done.stdout
    for path in (target.parent, target):
        assert path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("argv", "form"),
    [
        (["migrate", "--qmp-src", "a", "--qmp-dst", "b"], "qmp"),
        (["migrate", "vm1", "--to", "qemu+tcp://h/system"], "libvirt"),
        (["migrate", "--to", "qemu+tcp://h/system"], "libvirt"),
    ],
)
def test_migrate_forms_are_chosen_explicitly(argv: list[str], form: str) -> None:
    args = build_parser().parse_args(argv)
    assert next(f.name for f in FORMS if f.applies(args)) == form


def test_migrate_without_a_form_is_a_usage_error() -> None:
    done = cli("migrate")
    assert done.returncode == ExitCode.USAGE
    assert "DOMAIN --to URI" in done.stderr


# ------------------------------------------------------------ options that do not apply


def test_tls_mode_without_tls_is_a_usage_error(lab_dir: Path) -> None:
    done = cli("lab", "--dir", str(lab_dir / "lab"), "up", "--tls-mode", "mixed")
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--tls-mode without --tls" in done.stderr
    assert not (lab_dir / "lab" / "lab.json").exists()  # nothing was started


def test_libvirt_only_options_are_refused_on_the_qemu_lab(lab_dir: Path) -> None:
    done = cli("lab", "--dir", str(lab_dir / "lab"), "up", "--client-rtt-ms", "50")
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--client-rtt-ms" in done.stderr
    done = cli("lab", "--dir", str(lab_dir / "lab"), "migrate", "--plain")
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--plain" in done.stderr
    ticket = lab_dir / "ticket"
    ticket.write_text("t\n")
    done = cli("lab", "--dir", str(lab_dir / "lab"), "up", "--ticket-file", str(ticket))
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--ticket-file" in done.stderr
    done = cli("lab", "--dir", str(lab_dir / "lab"), "migrate", "--extend-ticket", "120")
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--extend-ticket" in done.stderr
    assert not (lab_dir / "lab" / "lab.json").exists()  # nothing was started


@pytest.mark.parametrize(
    "option", [["--grace", "0.5"], ["--downtime-limit", "50"], ["--max-bandwidth", "1000"]]
)
def test_qemu_only_migrate_options_are_refused_on_the_libvirt_lab(
    lab_dir: Path, option: list[str]
) -> None:
    """Refused before the lab is even read (a placeholder state file is enough)."""
    libvirt_dir = lab_dir / "lab" / "libvirt"
    libvirt_dir.mkdir(parents=True, mode=0o700)
    (lab_dir / "lab").chmod(0o700)
    (libvirt_dir / "state.json").write_text("{}")
    done = cli("lab", "--dir", str(lab_dir / "lab"), "migrate", *option)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert option[0] in done.stderr
    assert "libvirt lab" in done.stderr


def test_evacuate_without_a_libvirt_lab_is_a_lab_error(lab_dir: Path) -> None:
    done = cli("lab", "--dir", str(lab_dir), "evacuate", "--parallel", "2")
    assert done.returncode == ExitCode.LAB, done.stderr
    assert "needs 'lab up --libvirt'" in done.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--domains", "0"], "--domains must be 1..64"),
        (["--domains", "65"], "--domains must be 1..64"),
        (["--domains", "2", "--tls"], "not supported"),
    ],
)
def test_bad_fleet_requests_are_refused_before_anything_starts(
    lab_dir: Path, extra: list[str], message: str
) -> None:
    done = cli("lab", "--dir", str(lab_dir), "up", "--libvirt", *extra)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert message in done.stderr
    assert not (lab_dir / "libvirt" / "state.json").exists()


def test_fleet_options_are_refused_on_the_qemu_lab(lab_dir: Path) -> None:
    done = cli("lab", "--dir", str(lab_dir), "up", "--domains", "4")
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert "--domains: not applicable to the QEMU lab" in done.stderr
