"""The memcheck guest: its build, its reports, and that it catches a corrupted byte.

The unit part reads report lines and consoles and renders the guest's domain XML. The real
part builds the guest with the Debian toolchain, boots it in QEMU under TCG (as the labs
run it on this machine), flips one bit of one working-set page through ``/proc/PID/mem`` of
the QEMU process and waits for the guest's own report of it; then migrates it between two
QEMUs and checks its account on the destination.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt_lab import memcheck
from spice_libvirt_lab.libvirt_domain import render_domain_xml
from spice_libvirt_lab.memcheck import MemcheckOptions
from spice_libvirt_lab.ports import free_tcp_port
from spice_libvirt_lab.qemu_process import QemuGroup, QemuInstance, wait_guest_ready
from spice_libvirt_lab.qemu_spec import QemuSpec, qemu_argv

CLEAN = (
    "MEMCHECK seq=7 t_ms=7660 boot=0x6a133dc3 phase=run ws_mib=256 dirty_mib_s=32 "
    "pass_ms=1000 passes=6 verified_mib=1536 pass_took_ms=140 rewritten_mib=224 errors=0"
)
BAD = (
    "MEMCHECK seq=9 t_ms=9660 boot=0x6a133dc3 phase=run ws_mib=256 dirty_mib_s=32 "
    "pass_ms=1000 passes=8 verified_mib=2048 pass_took_ms=140 rewritten_mib=288 errors=1 "
    "bad_page=1000 bad_addr=0x007e87d0 want_gen=1 found_page=1000 found_gen=0 bad_word=1 "
    "want=0x00000001 found=0x00000000 bad_at_ms=9640 bad_pass=9"
)


# --------------------------------------------------------------------------- unit


def test_report_lines_parse() -> None:
    clean = memcheck.parse_report(CLEAN)
    assert clean is not None
    assert (clean.passes, clean.verified_mib, clean.errors, clean.first_bad) == (6, 1536, 0, None)
    bad = memcheck.parse_report(BAD)
    assert bad is not None
    assert bad.first_bad is not None
    assert (bad.errors, bad.first_bad.page, bad.first_bad.found_gen) == (1, 1000, 0)
    assert memcheck.parse_report(CLEAN[:60]) is None  # torn: fields missing
    assert memcheck.parse_report("MEMCHECK-READY fill_ms=660 ws_mib=256") is None
    assert memcheck.parse_report("garbage errors=0") is None


def test_console_takes_the_last_complete_report(tmp_path: Path) -> None:
    log = tmp_path / "vm-serial.log"
    log.write_text(f"MEMCHECK-READY fill_ms=1\n{CLEAN}\n{BAD}\n{CLEAN[:50]}")
    console = memcheck.read_console(log)
    assert console.ready
    assert console.report is not None
    assert console.report.seq == 9  # the torn last line is not a report
    # right after virtlogd rotated the file, the report is in the previous one
    log.rename(tmp_path / "vm-serial.log.0")
    log.write_text("")
    assert memcheck.read_console(log).report is not None


def test_account_alive_needs_a_fresh_report_and_no_fault(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_text(CLEAN + "\n")
    now = log.stat().st_mtime
    fresh = memcheck.account("vm", "A", log, now=now + 1)
    assert fresh.alive
    assert (fresh.errors, fresh.passes) == (0, 6)
    assert fresh.last_report_age_s == 1.0
    assert not memcheck.account("vm", "A", log, now=now + 60).alive  # stopped reporting
    assert not memcheck.account("vm", None, log, now=now).alive  # runs nowhere
    log.write_text(f"{BAD}\nMEMCHECK-FAULT vector=13 error=0x00000000 eip=0x00100100\n")
    faulted = memcheck.account("vm", "A", log, now=log.stat().st_mtime)
    assert not faulted.alive
    assert faulted.fault is not None
    assert faulted.errors == 1
    assert memcheck.account("vm", None, None).errors is None


def test_options_make_the_command_line_and_the_ram() -> None:
    options = MemcheckOptions(working_set_mib=64, dirty_mib_s=8, pass_ms=500)
    assert options.cmdline() == "mib=64 dirty_mib_s=8 pass_ms=500"
    assert options.memory_mib == 64 + memcheck.RESERVED_MIB
    with pytest.raises(ValueError, match="greater than or equal"):
        MemcheckOptions(working_set_mib=0)
    with pytest.raises(ValueError, match="needs"):
        QemuSpec(name="m", guest="memcheck", memory_mib=64, workdir=Path("/tmp"))


def test_inputs_digest_follows_the_sources(tmp_path: Path) -> None:
    copy = tmp_path / "memcheck"
    shutil.copytree(memcheck.SOURCE_DIR, copy)
    before = memcheck.inputs_digest("gcc 1; ld 1", copy)
    assert memcheck.inputs_digest("gcc 2; ld 1", copy) != before
    (copy / "memcheck.c").write_text((copy / "memcheck.c").read_text() + "\n")
    assert memcheck.inputs_digest("gcc 1; ld 1", copy) != before


def test_domain_xml_boots_the_image_with_its_options() -> None:
    options = MemcheckOptions(working_set_mib=32, dirty_mib_s=4)
    xml = render_domain_xml(name="mc", guest="memcheck", memcheck=options)
    image = memcheck.ensure_memcheck_guest().image
    assert f"<kernel>{image}</kernel>" in xml
    assert f"<cmdline>{options.cmdline()}</cmdline>" in xml
    assert f"<memory unit='MiB'>{options.memory_mib}</memory>" in xml
    assert "<serial type='file'>" in xml
    assert "<model type='qxl'/>" in xml


def test_qemu_command_line_of_the_memcheck_guest(tmp_path: Path) -> None:
    options = MemcheckOptions(working_set_mib=16)
    spec = QemuSpec(
        name="m",
        guest="memcheck",
        memory_mib=options.memory_mib,
        memcheck=options,
        workdir=tmp_path,
    )
    image = memcheck.ensure_memcheck_guest()
    argv = qemu_argv(spec, spice_port=5999, accel="tcg", images=image)
    assert argv[argv.index("-kernel") + 1] == str(image.image)
    assert argv[argv.index("-append") + 1] == options.cmdline()
    with pytest.raises(ConfigError):
        qemu_argv(spec, spice_port=5999, accel="tcg")


def test_lab_up_refuses_memcheck_options_for_other_guests() -> None:
    import argparse

    from spice_libvirt_lab.command import memcheck_options

    args = argparse.Namespace(guest="memcheck", memory=0, dirty_mib_s=None, pass_ms=None)
    with pytest.raises(ConfigError, match="working_set_mib"):
        memcheck_options(args, 256)
    args = argparse.Namespace(guest="linux", memory=None, dirty_mib_s=3, pass_ms=None)
    assert memcheck_options(args, 256) is None


# --------------------------------------------------------------------------- real


async def _report(vm: QemuInstance, accept: object, timeout: float) -> memcheck.MemcheckReport:
    """The first report on the guest's console that ``accept`` takes (a callable)."""
    assert callable(accept)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = memcheck.read_console(vm.serial_log).report
        if report is not None and accept(report):
            return report
        await asyncio.sleep(0.02)
    raise AssertionError(f"no such report within {timeout} s: {vm.serial_text()[-400:]}")


async def _start(
    vms: QemuGroup, name: str, options: MemcheckOptions, incoming: str | None = None
) -> QemuInstance:
    return await vms(
        name,
        guest="memcheck",
        memory_mib=options.memory_mib,
        memcheck=options,
        accel="tcg",
        incoming=incoming,
    )


@pytest.mark.qemu
async def test_fills_checks_256_mib_and_reports_a_flipped_bit(qemu_factory: QemuGroup) -> None:
    options = MemcheckOptions(working_set_mib=256, dirty_mib_s=32, pass_ms=500)
    started = time.monotonic()
    vm = await _start(qemu_factory, "mc", options)
    await _report_line(vm, "MEMCHECK-BOOT", 10.0)
    booted = time.monotonic() - started
    await wait_guest_ready(vm, timeout=60)
    ready = time.monotonic() - started
    checked = await _report(vm, lambda r: r.passes >= 2, 30.0)
    assert checked.errors == 0
    assert checked.verified_mib >= 2 * 256
    print(f"memcheck: boot line {booted:.2f} s, 256 MiB filled {ready:.2f} s after start")

    page = 4096  # 16 MiB into the working set
    memcheck.corrupt_page(vm.pid, page, options.memory_mib)
    flipped = time.monotonic()
    # How fast is a benchmark figure (bench_memcheck.py: well within 2 s on a quiet machine);
    # here it only has to come: a loaded 2-CPU machine starves a TCG guest for seconds.
    found = await _report(vm, lambda r: r.errors > 0, 60.0)
    latency = time.monotonic() - flipped
    print(f"memcheck: the flipped bit reported after {latency:.2f} s (load {os.getloadavg()[0]})")
    assert found.first_bad is not None
    assert found.first_bad.page == page
    assert found.first_bad.found_page == page  # the page is there, its content is not
    # sticky: every later report keeps the error and the first bad page
    later = await _report(vm, lambda r: r.seq > found.seq + 1, 30.0)
    assert later.errors == 1
    assert later.first_bad == found.first_bad


async def _report_line(vm: QemuInstance, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in vm.serial_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text} within {timeout} s")
        await asyncio.sleep(0.01)


@pytest.mark.qemu
async def test_account_survives_a_migration(qemu_factory: QemuGroup) -> None:
    """The guest has the firmware guest's SPICE channels; after a QMP migration between two
    QEMUs the destination's console carries on (same boot, more passes, no errors)."""
    options = MemcheckOptions(working_set_mib=32, dirty_mib_s=4, pass_ms=500)
    src = await _start(qemu_factory, "src", options)
    await wait_guest_ready(src, timeout=60)
    # the SPICE channels every client and verdict expect, as for the firmware guest
    probe = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "spice_libvirt",
            "probe",
            "--json",
            f"spice://127.0.0.1:{src.spice_port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    channels = [c["type"] for c in json.loads(probe.stdout)["channels"]]
    assert channels == ["main", "display", "inputs", "cursor", "port"]
    before = await _report(src, lambda r: r.passes >= 1, 30.0)
    port = free_tcp_port()
    dst = await _start(qemu_factory, "dst", options, incoming=f"tcp:127.0.0.1:{port}")
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    deadline = time.monotonic() + 120
    while (await src.execute("query-migrate")).get("status") != "completed":
        assert time.monotonic() < deadline, "the migration did not complete"
        await asyncio.sleep(0.1)
    after = await _report(dst, lambda r: r.passes > before.passes + 1, 30.0)
    assert after.boot == before.boot
    assert after.errors == 0


def test_corrupting_a_missing_guest_is_a_lab_error() -> None:
    with pytest.raises(LabError, match="no mapping"):
        memcheck.guest_page_address(os.getpid(), 98765, 1)
