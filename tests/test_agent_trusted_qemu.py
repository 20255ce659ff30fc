"""The agent trusts only the QEMU libvirt started.

Against real processes: a QEMU started the way libvirt names it, and impostors planted
beside it -- a process of an unprivileged user whose argv says ``guest=NAME``, a root
process that is not the emulator -- and pid files an attacker could have touched. Only
libvirt's pid file, root's and private, pointing at a process that runs the domain's
emulator as the domain's user, is accepted; every refusal says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spice_libvirt.errors import AgentError
from spice_libvirt.host.trusted_qemu import ExpectedQemu, expected_qemu, trusted_qemu_pid

DOMAIN = "trust-guest"
EMULATOR = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
GUEST = f"guest={DOMAIN},debug-threads=on"

LIVE_XML = f"""<domain type='kvm' id='3'><name>{DOMAIN}</name>
<devices><emulator>{EMULATOR}</emulator></devices>
<seclabel type='dynamic' model='dac' relabel='yes'><label>+0:+0</label>
<imagelabel>+0:+0</imagelabel></seclabel></domain>"""


def test_expected_qemu_from_the_live_xml() -> None:
    assert expected_qemu(DOMAIN, LIVE_XML) == ExpectedQemu(DOMAIN, EMULATOR, 0)
    labelled = LIVE_XML.replace("+0:+0</label>", "+64055:+64055</label>", 1)
    assert expected_qemu(DOMAIN, labelled).uid == 64055
    assert (
        expected_qemu(DOMAIN, LIVE_XML.replace("+0:+0</label>", "nobody:nogroup</label>", 1)).uid
        == 65534
    )
    no_dac = LIVE_XML.replace("model='dac'", "model='selinux'")
    assert expected_qemu(DOMAIN, no_dac).uid == 0  # no DAC label: QEMU runs as root
    with pytest.raises(AgentError, match="names no emulator"):
        expected_qemu(DOMAIN, "<domain><devices/></domain>")
    with pytest.raises(AgentError, match="does not parse"):
        expected_qemu(DOMAIN, "<domain")
    with pytest.raises(AgentError, match="unknown user"):
        expected_qemu(DOMAIN, LIVE_XML.replace("+0:+0</label>", "no-such-user:x</label>", 1))


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the argv (and the exe) are the final ones
        try:
            if GUEST.encode() in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                return proc
        except OSError:
            pass
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{argv[0]} did not start")


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """A real QEMU named the way libvirt names it, and two impostors of the same name."""
    started: dict[str, subprocess.Popen[bytes]] = {}
    sleeper = ["-c", "import time; time.sleep(120)", "-name", GUEST]
    try:
        started["qemu"] = _spawn(
            [EMULATOR, "-name", GUEST, "-machine", "none", "-nodefaults", "-display", "none",
             "-S", "-monitor", "none"]
        )  # fmt: skip
        started["nobody"] = _spawn(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "/usr/bin/python3", *sleeper]
        )  # fmt: skip
        started["root-python"] = _spawn(["/usr/bin/python3", *sleeper])
        yield started
    finally:
        for proc in started.values():  # only what this fixture started, by PID
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sl-trust-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _pidfile(run_dir: Path, pid: int, mode: int = 0o644) -> Path:
    path = run_dir / f"{DOMAIN}.pid"
    path.unlink(missing_ok=True)
    path.write_text(f"{pid}\n")
    path.chmod(mode)
    return path


@pytest.mark.qemu
def test_only_the_real_qemu_is_trusted(
    processes: dict[str, subprocess.Popen[bytes]], run_dir: Path
) -> None:
    expected = expected_qemu(DOMAIN, LIVE_XML)
    _pidfile(run_dir, processes["qemu"].pid)
    assert trusted_qemu_pid(expected, run_dir=run_dir) == processes["qemu"].pid

    _pidfile(run_dir, processes["nobody"].pid)
    with pytest.raises(AgentError, match="runs as uid 65534/65534/65534/65534, not 0"):
        trusted_qemu_pid(expected, run_dir=run_dir)
    _pidfile(run_dir, processes["root-python"].pid)
    with pytest.raises(AgentError, match="not the domain's emulator"):
        trusted_qemu_pid(expected, run_dir=run_dir)
    # the real QEMU, but libvirt gave the domain another user
    _pidfile(run_dir, processes["qemu"].pid)
    with pytest.raises(AgentError, match="not 64055"):
        trusted_qemu_pid(ExpectedQemu(DOMAIN, EMULATOR, 64055), run_dir=run_dir)
    (run_dir / "other.pid").write_text(f"{processes['qemu'].pid}\n")
    with pytest.raises(AgentError, match="does not name guest 'other'"):
        trusted_qemu_pid(ExpectedQemu("other", EMULATOR, 0), run_dir=run_dir)


@pytest.mark.qemu
def test_a_pid_file_others_could_write_is_not_read(
    processes: dict[str, subprocess.Popen[bytes]], run_dir: Path
) -> None:
    expected = expected_qemu(DOMAIN, LIVE_XML)
    path = _pidfile(run_dir, processes["qemu"].pid, mode=0o666)
    with pytest.raises(AgentError, match="is writable by"):
        trusted_qemu_pid(expected, run_dir=run_dir)
    path.chmod(0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(AgentError, match="belongs to uid 65534, not root"):
        trusted_qemu_pid(expected, run_dir=run_dir)
    path.unlink()
    target = run_dir / "elsewhere.pid"
    target.write_text(f"{processes['qemu'].pid}\n")
    path.symlink_to(target)
    with pytest.raises(AgentError, match="no pid file"):
        trusted_qemu_pid(expected, run_dir=run_dir)
    path.unlink()
    with pytest.raises(AgentError, match="no pid file"):
        trusted_qemu_pid(expected, run_dir=run_dir)
    _pidfile(run_dir, processes["qemu"].pid)
    run_dir.chmod(0o777)
    with pytest.raises(AgentError, match=r"run directory .* writable by its group and others"):
        trusted_qemu_pid(expected, run_dir=run_dir)
