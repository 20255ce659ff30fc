"""Secrets never leak, on a ticketed TLS lab, for real.

A SPICE ticket with an expiry, set through libvirt as a manager does; then everything of
ours that handles it runs: the controller with ``--extend-ticket`` (report as JSON, a
timeline), a plain migration held by the host agent (its journal, its state, its syslog
lines caught on a datagram socket), ``evacuate``. Afterwards no file of ours and no log of
libvirtd or QEMU holds the ticket (libvirtd logs here at debug level except the monitor:
more than its default). Then libvirtd's monitor debug logging is turned on, the way one
troubleshoots (``virt-admin daemon-log-filters``): ``doctor`` warns beforehand, and the
next ``--extend-ticket`` shows why -- libvirt itself writes the password into its log.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spice_libvirt.exitcodes import ExitCode
from spice_libvirt_lab import libvirt_agent, libvirt_lab, libvirt_ticket, libvirt_tls
from spice_libvirt_lab.libvirt_agent import next_verdict, running_agents, verdicts
from spice_libvirt_lab.libvirt_host import SECRET_SAFE_LOG_FILTERS
from spice_libvirt_lab.libvirt_state import LabState
from tests.rigs.libvirt_lab import LIBVIRT_LAB

pytest.importorskip("libvirt")

pytestmark = LIBVIRT_LAB

CLI = [sys.executable, "-m", "spice_libvirt.cli"]
MONITOR_DEBUG = "1:qemu.qemu_monitor_json 1:qemu.qemu_monitor 3:*"


def _cli(argv: list[str], out: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=300, check=False)
    out.write_text(done.stdout)
    out.with_suffix(".err").write_text(done.stderr)
    return done


def _migrate_argv(state: LabState, src: str, dst: str) -> list[str]:
    argv = [
        "migrate", state.domain,
        "--from", state.hosts[src].uri_unix,
        "--to", state.hosts[dst].uri_tcp,
        "--to-connect", state.hosts[dst].uri_unix,
        "--extend-ticket", "120",
        "--json",
    ]  # fmt: skip
    graphics = libvirt_tls.graphics_uri(state, dst)
    return [*argv, "--graphics-uri", graphics] if graphics else argv


def _libvirts_record(path: Path) -> bool:
    """libvirt's own record of the domain (its status XML under /run/libvirt/qemu, its
    definition under /etc/libvirt/qemu): the ticket belongs there (root's, 0600)."""
    return path.suffix == ".xml" and path.parent.name == "qemu"


def _holding(ticket: str, roots: list[Path]) -> list[Path]:
    """Every regular file under ``roots`` whose bytes contain ``ticket``, but libvirt's
    own record of the domain."""
    needle = ticket.encode()
    found = []
    for root in roots:
        for path in root.rglob("*"):
            ours = path.is_file() and not path.is_symlink() and not _libvirts_record(path)
            if ours and needle in path.read_bytes():
                found.append(path)
    return found


def _host_run(state: LabState, host: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        state.host(host).enter_argv(argv), capture_output=True, text=True, timeout=60, check=False
    )


def test_no_file_of_ours_and_no_default_log_holds_the_ticket(
    libvirt_lab_dir: Path, lab_dir: Path
) -> None:
    ticket = secrets.token_urlsafe(16)
    ticket_file = lab_dir / "ticket"
    ticket_file.write_text(ticket + "\n")
    ticket_file.chmod(0o600)
    out = lab_dir / "out"
    out.mkdir()
    state = libvirt_lab.up(libvirt_lab_dir, tls=True, ticket_file=ticket_file, ticket_valid_s=3600)
    domain_xmls = [p for p in libvirt_lab_dir.rglob("*.xml") if _libvirts_record(p)]
    assert domain_xmls, "libvirt's records of the domain are where the test expects them"

    # the controller, extending a ticket about to expire (its report and timeline kept)
    libvirt_ticket.set_ticket(state, "A", 8)
    argv = [*_migrate_argv(state, "A", "B"), "--timeline", str(out / "timeline.svg")]
    done = _cli(argv, out / "migrate.json")
    assert done.returncode == ExitCode.OK, done.stderr
    report = json.loads(done.stdout)
    assert any("extended to" in n for n in report["notes"]), report["notes"]

    # the host agent holding a plain migration back: journal, state, syslog lines
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog_path = lab_dir / "syslog.sock"
    syslog.bind(str(syslog_path))
    syslog.settimeout(0.2)
    settings = lab_dir / "agent.toml"
    settings.write_text(f'syslog_socket = "{syslog_path}"\n')
    lines: list[bytes] = []
    try:
        before = len(verdicts(state, "B"))
        with running_agents(state, ["--config", str(settings)]):
            done = subprocess.run(
                libvirt_agent.plain_migrate_argv(state, "B", "A"),
                capture_output=True, text=True, timeout=180, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            next_verdict(state, "B", before)
        while True:
            try:
                lines.append(syslog.recv(65536))
            except TimeoutError:
                break
    finally:
        syslog.close()
    assert lines, "the agent sent no syslog line"
    (out / "syslog.txt").write_bytes(b"\n".join(lines))

    # evacuate the host the guest runs on now
    argv = [
        "evacuate", "--from", state.hosts["A"].uri_unix, "--to", state.hosts["B"].uri_tcp,
        "--to-connect", state.hosts["B"].uri_unix, "--json",
    ]  # fmt: skip
    done = _cli(argv, out / "evacuate.json")
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr

    # nothing of ours, no log of libvirtd or QEMU: only the ticket file itself
    assert _holding(ticket, [out, libvirt_lab_dir]) == []

    # monitor debug logging on the source (now B), the way one troubleshoots: doctor
    # warns before the next --extend-ticket, which then shows libvirt writing the password
    filters = ["virt-admin", "-c", "libvirtd:///system", "daemon-log-filters"]
    assert _host_run(state, "B", [*filters, MONITOR_DEBUG]).returncode == 0
    try:
        doctor = _host_run(state, "B", [*CLI, "doctor", "--json"])
        checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
        assert checks["secrets-in-logs"]["status"] == "warn", checks["secrets-in-logs"]
        assert "--extend-ticket" in checks["secrets-in-logs"]["detail"]
        libvirt_ticket.set_ticket(state, "B", 8)
        done = _cli(_migrate_argv(state, "B", "A"), out / "migrate-debug.json")
        assert done.returncode == ExitCode.OK, done.stderr
    finally:
        _host_run(state, "B", [*filters, SECRET_SAFE_LOG_FILTERS])
    leaked = _holding(ticket, [libvirt_lab_dir])
    assert leaked, "monitor debug logging did not record the ticket (what doctor warns of)"
    assert all(p.name.startswith("libvirtd") for p in leaked), leaked
    assert _holding(ticket, [out]) == []  # ours still hold nothing
