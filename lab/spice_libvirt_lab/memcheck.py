"""The ``memcheck`` test guest: a bare-metal program that checks its own memory.

The guest (``guest/memcheck/``: C, a linker script and the multiboot entry in assembly) fills
a working set with pages whose content follows from (page index, page generation), rewrites
pages at a set rate, and verifies every page on every pass; see ``memcheck.c`` for how. It
reports on its serial port, which the labs send to a file on whichever host it runs (QEMU
``-serial file:``, libvirt's ``<serial type='file'>``), one line at least every second::

    MEMCHECK seq=7 t_ms=7660 boot=0x6a133dc3 phase=run ws_mib=256 dirty_mib_s=32 ...
        passes=6 verified_mib=1536 pass_took_ms=140 rewritten_mib=224 errors=0

An error is sticky: the count and the first bad page (``bad_page``, ``want_gen``,
``found_gen``...) stay in every later line until the guest restarts. Whoever reads the
console therefore needs only its last line: :func:`read_console`, then :func:`account`.

Options travel on the multiboot command line (QEMU ``-append``, libvirt ``<cmdline>``):
:class:`MemcheckOptions`. The guest's RAM is its working set plus :data:`RESERVED_MIB`.

It is built from source with the Debian toolchain (gcc, ld) into the guest cache, under a
directory named after a digest of its inputs (sources, flags, compiler and linker versions),
so it is rebuilt only when one of them changes; nothing is downloaded.

Accelerator: TCG by default (``SPICE_LIBVIRT_MEMCHECK_ACCEL=kvm`` or ``auto``: see
:func:`spice_libvirt_lab.guest.default_accel`). This machine's nested KVM (``kvm_pvm``)
runs a guest without 64-bit paging through its instruction emulator: measured, filling one
MiB takes about 2 s there against milliseconds under TCG; on a real KVM host it is fast.

Command line: ``python -m spice_libvirt_lab.memcheck build [--force]`` builds (or finds)
the image and prints where it is; ``... show`` prints the cached build without building.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from spice_libvirt.errors import LabError
from spice_libvirt_lab import guest as guest_mod
from spice_libvirt_lab.procs import exclusive_lock

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("guest") / "memcheck"
SOURCE_FILES = ("boot.S", "memcheck.c", "memcheck.ld")
IMAGE_NAME = "memcheck.elf"
#: Bump when the build procedure changes in a way that changes the output.
BUILD_FORMAT = 1
CFLAGS = (
    "-m32",
    "-march=i686",
    "-mno-sse",
    "-mno-mmx",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-O2",
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
)
#: ``--no-warn-rwx-segments``: the image is one segment, code and data, loaded as it is
LDFLAGS = (
    "-m",
    "elf_i386",
    "-nostdlib",
    "--build-id=none",
    "-z",
    "noexecstack",
    "--no-warn-rwx-segments",
)
#: Guest RAM the program keeps for itself below its working set (it starts at 4 MiB) and
#: above it (firmware tables at the top of RAM).
RESERVED_MIB = 8
#: The largest working set: RAM must stay below the PCI hole of QEMU's ``pc`` machine.
MAX_WORKING_SET_MIB = 3000
#: What the guest prints once its working set is full and it starts checking.
READY_MARKER = "MEMCHECK-READY"
#: What it prints (then stops) when the CPU raised an exception: the guest is lost.
FAULT_MARKER = "MEMCHECK-FAULT"
#: A guest whose last report is older than this is not alive (it reports every second).
ALIVE_WITHIN_S = 10.0
#: A build of other inputs is removed once it is this old (see :func:`_prune`).
PRUNE_AFTER_S = 7 * 86400.0
#: How much of the end of a console file is read for the last report.
_TAIL_BYTES = 16384


class MemcheckOptions(BaseModel):
    """What the guest is asked to do (its multiboot command line)."""

    working_set_mib: int = Field(default=256, ge=1, le=MAX_WORKING_SET_MIB)
    #: MiB of pages rewritten per second (0: idle, but every page full of data)
    dirty_mib_s: int = Field(default=0, ge=0, le=4096)
    #: a verify pass starts every ``pass_ms`` (between passes the guest halts)
    pass_ms: int = Field(default=1000, ge=20, le=3_600_000)

    @property
    def memory_mib(self) -> int:
        """The guest's RAM: its working set and :data:`RESERVED_MIB`."""
        return self.working_set_mib + RESERVED_MIB

    def cmdline(self) -> str:
        return f"mib={self.working_set_mib} dirty_mib_s={self.dirty_mib_s} pass_ms={self.pass_ms}"


# --------------------------------------------------------------------------- build


class MemcheckImage(BaseModel):
    """A built memcheck guest: the multiboot ELF for ``-kernel`` and where it came from."""

    directory: Path
    image: Path
    digest: str
    toolchain: str
    built_at: str
    build_seconds: float


_MANIFEST = "manifest.json"


def _tool(argv: Sequence[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed (run scripts/setup.sh)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{argv[0]} did not finish within 120 s") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise LabError(f"{' '.join(argv[:2])} failed ({done.returncode}): " + " | ".join(tail))
    return done.stdout


def toolchain() -> str:
    """The compiler's and the linker's version lines (part of the build's digest)."""
    gcc = _tool(["gcc", "--version"]).splitlines()[0]
    ld = _tool(["ld", "--version"]).splitlines()[0]
    return f"{gcc}; {ld}"


def inputs_digest(tools: str, source_dir: Path | None = None) -> str:
    """Digest of everything the image is built from; names the cache entry."""
    source_dir = source_dir or SOURCE_DIR
    h = hashlib.sha256()
    h.update(f"format={BUILD_FORMAT}\ntools={tools}\n".encode())
    h.update(("cflags=" + " ".join(CFLAGS) + "\nldflags=" + " ".join(LDFLAGS) + "\n").encode())
    for name in SOURCE_FILES:
        data = (source_dir / name).read_bytes()
        h.update(f"{name}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:16]


def _load_manifest(directory: Path) -> MemcheckImage | None:
    try:
        image = MemcheckImage.model_validate_json((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return image if image.image.is_file() else None


def find_memcheck_guest(cache_dir: Path | None = None) -> MemcheckImage | None:
    """The newest complete cached build, without building."""
    cache_dir = cache_dir or guest_mod.guest_cache_dir()
    found = [
        m for d in sorted(cache_dir.glob("memcheck-*")) if (m := _load_manifest(d)) is not None
    ]
    return max(found, key=lambda m: m.built_at) if found else None


def _build(tools: str, digest: str, cache_dir: Path) -> MemcheckImage:
    started = time.monotonic()
    final = cache_dir / f"memcheck-{digest}"
    work = Path(tempfile.mkdtemp(prefix="build-memcheck-", dir=cache_dir))
    try:
        out = work / "out"
        out.mkdir()
        objects = []
        for source, obj in (("boot.S", "boot.o"), ("memcheck.c", "memcheck.o")):
            flags = CFLAGS if source.endswith(".c") else ("-m32",)
            _tool(["gcc", *flags, "-c", str(SOURCE_DIR / source), "-o", str(work / obj)])
            objects.append(str(work / obj))
        _tool(
            [
                "ld",
                *LDFLAGS,
                "-T",
                str(SOURCE_DIR / "memcheck.ld"),
                "-o",
                str(out / IMAGE_NAME),
                *objects,
            ]
        )
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = MemcheckImage(
        directory=final,
        image=final / IMAGE_NAME,
        digest=digest,
        toolchain=tools,
        built_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        build_seconds=round(time.monotonic() - started, 2),
    )
    (final / _MANIFEST).write_text(image.model_dump_json(indent=2) + "\n")
    return image


def _prune(cache_dir: Path, keep: Path) -> None:
    """Remove builds untouched for :data:`PRUNE_AFTER_S`: a younger one may still be the
    ``-kernel`` of a running lab (the destination QEMU of a migration loads it again)."""
    cutoff = time.time() - PRUNE_AFTER_S
    for old in cache_dir.glob("memcheck-*"):
        with contextlib.suppress(OSError):
            if old != keep and old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)


#: Builds already checked by this process (a fleet renders dozens of domains).
_memo: dict[Path, MemcheckImage] = {}


def ensure_memcheck_guest(
    *, cache_dir: Path | None = None, force: bool = False, lock_timeout: float = 300.0
) -> MemcheckImage:
    """The cached image for the current inputs, built first if needed (one builder at a
    time: the others wait on a lock, then reuse the result)."""
    cache_dir = cache_dir or guest_mod.guest_cache_dir()
    memo = _memo.get(cache_dir)
    if not force and memo is not None and memo.image.is_file():
        return memo
    cache_dir.mkdir(parents=True, exist_ok=True)
    tools = toolchain()
    digest = inputs_digest(tools)
    entry = cache_dir / f"memcheck-{digest}"
    image = None if force else _load_manifest(entry)
    if image is None:
        with exclusive_lock(
            cache_dir / ".lock-memcheck",
            lock_timeout,
            f"another process has been building memcheck in {cache_dir} for {lock_timeout:.0f} s",
            poll=0.2,
        ):
            image = None if force else _load_manifest(entry)
            if image is None:
                log.info("building the memcheck guest (%s)", digest)
                image = _build(tools, digest, cache_dir)
                _prune(cache_dir, image.directory)
    _memo[cache_dir] = image
    return image


# --------------------------------------------------------------------------- reports


class BadPage(BaseModel):
    """The first bad page the guest found (kept until it restarts)."""

    page: int
    address: str = Field(description="guest-physical address of the first bad word")
    want_gen: int
    found_page: int = Field(description="the page index the page itself holds")
    found_gen: int = Field(description="the generation the page itself holds")
    word: int
    want: str
    found: str
    at_ms: int = Field(description="guest time of the finding")
    pass_number: int


class MemcheckReport(BaseModel):
    """One report line of the guest."""

    seq: int
    t_ms: int
    boot: str
    phase: str
    working_set_mib: int
    dirty_mib_s: int
    pass_ms: int
    passes: int
    verified_mib: int
    pass_took_ms: int
    rewritten_mib: int
    errors: int
    first_bad: BadPage | None = None


_FIELD = re.compile(r"(\w+)=(\S+)")


def parse_report(line: str) -> MemcheckReport | None:
    """A ``MEMCHECK ...`` line as a report; None for any other or a torn line."""
    if not line.startswith("MEMCHECK "):
        return None
    f = dict(_FIELD.findall(line))
    try:
        bad = None
        if int(f["errors"]) and "bad_page" in f:
            bad = BadPage(
                page=int(f["bad_page"]),
                address=f["bad_addr"],
                want_gen=int(f["want_gen"]),
                found_page=int(f["found_page"]),
                found_gen=int(f["found_gen"]),
                word=int(f["bad_word"]),
                want=f["want"],
                found=f["found"],
                at_ms=int(f["bad_at_ms"]),
                pass_number=int(f["bad_pass"]),
            )
        return MemcheckReport(
            seq=int(f["seq"]),
            t_ms=int(f["t_ms"]),
            boot=f["boot"],
            phase=f["phase"],
            working_set_mib=int(f["ws_mib"]),
            dirty_mib_s=int(f["dirty_mib_s"]),
            pass_ms=int(f["pass_ms"]),
            passes=int(f["passes"]),
            verified_mib=int(f["verified_mib"]),
            pass_took_ms=int(f["pass_took_ms"]),
            rewritten_mib=int(f["rewritten_mib"]),
            errors=int(f["errors"]),
            first_bad=bad,
        )
    except (KeyError, ValueError):
        return None


class Console(BaseModel):
    """What a console file says: the last report, a fault, and when it was last written."""

    path: Path
    report: MemcheckReport | None = None
    fault: str | None = None
    ready: bool = False
    #: the file's modification time (seconds since the epoch); None: no such file
    written_at: float | None = None


def _tail(path: Path) -> str:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - _TAIL_BYTES))
        return fh.read().decode(errors="replace")


def read_console(path: Path) -> Console:
    """The last complete report in ``path`` (or, right after virtlogd rotated it, in
    ``path.0``), a fault line if the guest printed one, and the file's mtime."""
    console = Console(path=path)
    for candidate in (path, path.with_name(path.name + ".0")):
        try:
            text = _tail(candidate)
            mtime = candidate.stat().st_mtime
        except OSError:
            continue
        if console.written_at is None:
            console.written_at = mtime
        lines = text.split("\n")[:-1]  # the last piece is incomplete (or empty)
        console.ready = console.ready or any(line.startswith(READY_MARKER) for line in lines)
        for line in reversed(lines):
            if console.fault is None and line.startswith(FAULT_MARKER):
                console.fault = line.strip()
            if console.report is None and (report := parse_report(line.strip())) is not None:
                console.report = report
        if console.report is not None:
            break
    return console


class GuestAccount(BaseModel):
    """One guest's own account, as ``spice-libvirt lab guest --json`` prints it."""

    domain: str
    host: str | None = Field(description="where it runs (None: on no host)")
    alive: bool = Field(description="runs, reported within ALIVE_WITHIN_S, printed no fault")
    errors: int | None = Field(description="bad pages found since boot (sticky)")
    verified_mib: int | None = Field(description="MiB verified since boot (passes x set)")
    passes: int | None
    last_report_age_s: float | None
    working_set_mib: int | None = None
    dirty_mib_s: int | None = None
    boot: str | None = Field(default=None, description="the boot's id: a change = a restart")
    first_bad: BadPage | None = None
    fault: str | None = None
    console: Path | None = None


def account(
    domain: str, host: str | None, console_path: Path | None, *, now: float | None = None
) -> GuestAccount:
    """A guest's account from its console on ``host`` (None: it runs nowhere)."""
    console = read_console(console_path) if console_path is not None else None
    report = console.report if console else None
    age = None
    if console is not None and console.written_at is not None:
        age = round(max(0.0, (now or time.time()) - console.written_at), 3)
    alive = (
        host is not None
        and report is not None
        and age is not None
        and age <= ALIVE_WITHIN_S
        and not (console and console.fault)
    )
    return GuestAccount(
        domain=domain,
        host=host,
        alive=alive,
        errors=report.errors if report else None,
        verified_mib=report.verified_mib if report else None,
        passes=report.passes if report else None,
        last_report_age_s=age,
        working_set_mib=report.working_set_mib if report else None,
        dirty_mib_s=report.dirty_mib_s if report else None,
        boot=report.boot if report else None,
        first_bad=report.first_bad if report else None,
        fault=console.fault if console else None,
        console=console_path,
    )


def wait_ready(path: Path, timeout: float, *, alive: Callable[[], bool] | None = None) -> None:
    """Until the console at ``path`` shows :data:`READY_MARKER` (the working set is full).

    ``alive`` (a callable) is asked between looks: False ends the wait with an error.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if READY_MARKER in path.read_text(errors="replace"):
                return
        if alive is not None and not alive():
            raise LabError(f"the memcheck guest stopped before it was ready ({path})")
        if time.monotonic() > deadline:
            raise LabError(f"the memcheck guest printed no {READY_MARKER} within {timeout:.0f} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- fault injection

#: Where the working set starts in guest-physical memory (``MEMCHECK_BASE`` in memcheck.c).
WORKING_SET_BASE = 4 << 20
PAGE_SIZE = 4096


def _page_words(mem: Any, address: int) -> tuple[int, int]:
    mem.seek(address)
    data = mem.read(8)
    return int.from_bytes(data[:4], "little"), int.from_bytes(data[4:], "little")


def guest_page_address(pid: int, page: int, ram_mib: int) -> int:
    """Where working-set page ``page`` of the memcheck guest run by QEMU ``pid`` lies in
    that process's address space.

    QEMU maps the guest's RAM as one anonymous mapping; the one whose copy of the page (and
    of the next) holds its own index in word 0, as the guest writes it, is the guest's.
    """
    offset = WORKING_SET_BASE + page * PAGE_SIZE
    candidates = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if fields[1].startswith("rw") and end - start >= (ram_mib << 20) - (1 << 20):
            candidates.append(start)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start in candidates:
            with contextlib.suppress(OSError):
                here = _page_words(mem, start + offset)[0]
                after = _page_words(mem, start + offset + PAGE_SIZE)[0]
                if (here, after) == (page, page + 1):
                    return start + offset
    raise LabError(f"QEMU {pid}: no mapping holds working-set page {page} of a memcheck guest")


def corrupt_page(pid: int, page: int, ram_mib: int, *, word: int = 100) -> int:
    """Flip one bit of one byte of working-set page ``page`` in the running guest's RAM
    (through ``/proc/PID/mem`` of its QEMU, root only): what a migration that lost or tore a
    page would leave. Returns the guest-physical address changed."""
    address = guest_page_address(pid, page, ram_mib) + word * 4
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(address)
        old = mem.read(1)
        mem.seek(address)
        mem.write(bytes([old[0] ^ 0x10]))
    return WORKING_SET_BASE + page * PAGE_SIZE + word * 4


def main(argv: Sequence[str] | None = None) -> int:
    return guest_mod.cache_command(
        argv,
        module="spice_libvirt_lab.memcheck",
        what="memcheck test guest",
        build=lambda cache_dir, force: ensure_memcheck_guest(cache_dir=cache_dir, force=force),
        find=find_memcheck_guest,
    )


if __name__ == "__main__":
    sys.exit(main())
