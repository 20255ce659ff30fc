"""The lab's test guests, and the one-time build of the Linux one.

The third guest, ``memcheck`` (a bare-metal program that checks its own memory), has its
own module: :mod:`spice_libvirt_lab.memcheck`.

``firmware``
    No OS at all: SeaBIOS finds no disk and no NIC and halts. Nothing to build. Under KVM it
    live-migrates in tens of milliseconds, faster than a SPICE client can link to the
    destination, which is exactly the race the controller exists to close.
``linux``
    A Debian kernel and a busybox-static initramfs whose ``/init`` (``guest/init``) loads the
    virtio modules and starts ``seqwriter``, which streams numbered 32-byte records (about
    1000/s) into the virtio-serial port ``org.spice-libvirt.stream``; QEMU backs that port
    with a ``spiceport`` chardev of the same name, so a SPICE client can check that not one
    record is lost or repeated across a migration. ``dirtier`` optionally keeps memory dirty
    so that migrations need many passes.

The Linux guest is assembled from Debian packages, never from a download outside the
distribution: ``apt-get download`` of the kernel image package, whose compressed bzImage
payload is unpacked to the plain ELF ``vmlinux``. QEMU boots that ELF through its PVH entry
point (``-kernel vmlinux`` uses ``pvh.bin``), skipping the in-guest XZ decompressor, which
under TCG costs seconds. The two helpers are compiled statically with the host's gcc.

The result is cached in :func:`guest_cache_dir` under a directory named after a digest of
every input (guest sources, module list, kernel package and version, busybox binary), so
it is rebuilt only when one of them changes; a file lock serialises concurrent builders.

Accelerators: ``/dev/kvm`` being usable is not enough to choose KVM for Linux. On this
project's CI machine ``/dev/kvm`` is ``kvm_pvm`` (nested PVM in a Firecracker VM), where a
stock kernel boots about 100 times slower than under TCG; firmware-only guests are fine
there. :func:`default_accel` therefore picks KVM for ``firmware`` and TCG for ``linux``
unless ``SPICE_LIBVIRT_LINUX_ACCEL`` says ``kvm`` (or ``auto``: KVM when
:func:`kvm_flavour` reports a real ``kvm_intel``/``kvm_amd`` host).

Command line: ``python -m spice_libvirt_lab.guest build [--force]`` builds (or finds) the
Linux guest and prints where it is; ``... show`` prints the cached build without building.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import gzip
import hashlib
import logging
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from spice_libvirt.errors import LabError
from spice_libvirt_lab.procs import exclusive_lock

log = logging.getLogger(__name__)

GuestKind = Literal["firmware", "linux", "memcheck"]
Accel = Literal["kvm", "tcg"]

#: Guest sources shipped in the package (``lab/spice_libvirt_lab/guest/``).
SOURCE_DIR = Path(__file__).with_name("guest")
SOURCE_FILES = ("init", "seqwriter.c", "dirtier.c")
#: virtio modules /init loads, in dependency order (all ``=m`` in Debian's config).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
)
#: Bump when the build procedure changes in a way that changes the output.
BUILD_FORMAT = 1
#: The meta package whose dependency names the current versioned kernel image package.
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
STREAM_PORT_NAME = "org.spice-libvirt.stream"
#: What /init prints on the serial console once the writer runs.
READY_MARKER = "GUEST-READY"

_XZ_MAGIC = b"\xfd7zXZ\x00"
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12


# --------------------------------------------------------------------------- accelerator


def kvm_usable(device: Path = Path("/dev/kvm")) -> bool:
    """Whether we may open ``/dev/kvm`` read-write and it speaks KVM API 12."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def kvm_flavour(sys_module: Path = Path("/sys/module")) -> Literal["intel", "amd", "pvm", "none"]:
    """Which KVM backend the host kernel has loaded.

    ``intel``/``amd`` (``kvm_intel``/``kvm_amd``, hardware virtualisation: the CPU flags
    ``vmx``/``svm`` are visible) is a real KVM host where Linux guests boot fast. ``pvm``
    (``kvm_pvm``) is paravirtualised nested KVM without hardware support: fine for firmware,
    far too slow for a Linux kernel. ``none``: no KVM module.
    """
    for name, flavour in (("kvm_intel", "intel"), ("kvm_amd", "amd"), ("kvm_pvm", "pvm")):
        if (sys_module / name).exists():
            return flavour  # type: ignore[return-value]
    return "none"


def default_accel(guest: GuestKind) -> Accel:
    """The accelerator ``accel="auto"`` means for ``guest`` on this host (module docstring).

    The memcheck guest (:mod:`spice_libvirt_lab.memcheck`) is chosen for the same way as the
    linux one, by ``SPICE_LIBVIRT_MEMCHECK_ACCEL``.
    """
    if not kvm_usable():
        return "tcg"
    if guest == "firmware":
        return "kvm"
    variable = f"SPICE_LIBVIRT_{guest.upper()}_ACCEL"
    choice = os.environ.get(variable, "tcg").strip().lower()
    if choice == "kvm":
        return "kvm"
    if choice == "auto":
        return "kvm" if kvm_flavour() in ("intel", "amd") else "tcg"
    if choice not in ("", "tcg"):
        raise LabError(f"{variable} must be tcg, kvm or auto, not {choice!r}")
    return "tcg"


# --------------------------------------------------------------------------- cache layout


def cache_root() -> Path:
    """``$SPICE_LIBVIRT_CACHE``, else ``$XDG_CACHE_HOME/spice-libvirt``, else ``~/.cache/...``."""
    explicit = os.environ.get("SPICE_LIBVIRT_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "spice-libvirt"


def guest_cache_dir() -> Path:
    """Where built guests live: ``cache_root()/guest``."""
    return cache_root() / "guest"


class KernelPackage(BaseModel):
    """A Debian kernel image package, e.g. ``linux-image-6.1.0-56-amd64`` ``6.1.192-2``."""

    name: str
    version: str

    @property
    def release(self) -> str:
        """The kernel release (``uname -r``) the package installs: ``6.1.0-56-amd64``."""
        return self.name.removeprefix("linux-image-")


class GuestImages(BaseModel):
    """A built Linux guest: what to pass to ``-kernel``/``-initrd`` and where it came from."""

    directory: Path
    kernel: Path
    initrd: Path
    #: True when ``kernel`` is the ELF vmlinux booted through PVH, False for a bzImage
    pvh: bool
    kernel_package: KernelPackage
    digest: str
    built_at: str
    build_seconds: float


_MANIFEST = "manifest.json"


def _run(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 300.0) -> str:
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed (run scripts/setup.sh)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): " + " | ".join(tail))
    return proc.stdout


def resolve_kernel_package() -> KernelPackage:
    """Ask apt which kernel image package ``linux-image-amd64`` currently means.

    ``SPICE_LIBVIRT_KERNEL_PACKAGE=linux-image-X`` pins another one.
    """
    name = os.environ.get("SPICE_LIBVIRT_KERNEL_PACKAGE", "").strip()
    if not name:
        out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE], timeout=60)
        for line in out.splitlines():
            dep = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
                name = dep
                break
        if not name:
            raise LabError(
                f"apt knows no kernel behind {KERNEL_META_PACKAGE} (is 'apt-get update' done?)"
            )
    out = _run(["apt-cache", "show", "--no-all-versions", name], timeout=60)
    for line in out.splitlines():
        if line.startswith("Version:"):
            return KernelPackage(name=name, version=line.split(":", 1)[1].strip())
    raise LabError(f"apt-cache show {name} printed no version")


def _busybox_is_static(path: Path) -> bool:
    """True if ``path`` is an ELF64 without a PT_INTERP segment (no dynamic loader)."""
    with path.open("rb") as fh:
        header = fh.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        fh.seek(phoff)
        table = fh.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def inputs_digest(kernel: KernelPackage, busybox: Path = BUSYBOX) -> str:
    """Digest of everything the Linux guest is built from; names the cache entry."""
    h = hashlib.sha256()
    h.update(f"format={BUILD_FORMAT}\n".encode())
    h.update(f"kernel={kernel.name}={kernel.version}\n".encode())
    h.update(("modules=" + ",".join(VIRTIO_MODULES) + "\n").encode())
    for name in SOURCE_FILES:
        data = (SOURCE_DIR / name).read_bytes()
        h.update(f"{name}:{len(data)}\n".encode())
        h.update(data)
    try:
        h.update(hashlib.sha256(busybox.read_bytes()).digest())
    except OSError as exc:
        raise LabError(f"{busybox} is missing: install busybox-static") from exc
    return h.hexdigest()[:16]


def _load_manifest(directory: Path) -> GuestImages | None:
    try:
        images = GuestImages.model_validate_json((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not (images.kernel.is_file() and images.initrd.is_file()):
        return None
    return images


def find_linux_guest(
    cache_dir: Path | None = None, *, digest: str | None = None
) -> GuestImages | None:
    """A complete cached build (for ``digest``, or else the newest one), without building."""
    cache_dir = cache_dir or guest_cache_dir()
    if digest is not None:
        return _load_manifest(cache_dir / f"linux-{digest}")
    found = [m for d in sorted(cache_dir.glob("linux-*")) if (m := _load_manifest(d)) is not None]
    return max(found, key=lambda m: m.built_at) if found else None


def _locked(directory: Path, timeout: float) -> contextlib.AbstractContextManager[None]:
    return exclusive_lock(
        directory / ".lock",
        timeout,
        f"another process has been building in {directory} for {timeout:.0f} s",
        poll=0.2,
    )


def _download_kernel(kernel: KernelPackage, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    arch = _run(["dpkg", "--print-architecture"], timeout=30).strip()
    deb = debs / f"{kernel.name}_{kernel.version.replace(':', '%3a')}_{arch}.deb"
    if deb.is_file():
        return deb
    for stale in debs.glob("linux-image-*.deb"):
        stale.unlink(missing_ok=True)
    _run(["apt-get", "download", "-q", f"{kernel.name}={kernel.version}"], cwd=debs, timeout=600)
    if not deb.is_file():
        candidates = sorted(debs.glob(f"{kernel.name}_*.deb"))
        if not candidates:
            raise LabError(f"apt-get download {kernel.name} produced no .deb in {debs}")
        deb = candidates[-1]
    return deb


def _kernel_files(deb: Path, release: str) -> tuple[bytes, dict[str, bytes], set[str]]:
    """Stream the package's data tar once; return (bzImage, modules by name, built-ins)."""
    wanted = {f"{m}.ko": m for m in VIRTIO_MODULES} | {f"{m}.ko.xz": m for m in VIRTIO_MODULES}
    vmlinuz: bytes | None = None
    modules: dict[str, bytes] = {}
    builtin: set[str] = set()
    with subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                path = member.name.removeprefix("./")
                base = path.rsplit("/", 1)[-1]
                if path == f"boot/vmlinuz-{release}":
                    vmlinuz = _read_member(tar, member)
                elif base in wanted and path.startswith(f"lib/modules/{release}/"):
                    data = _read_member(tar, member)
                    modules[wanted[base]] = lzma.decompress(data) if base.endswith(".xz") else data
                elif path == f"lib/modules/{release}/modules.builtin":
                    text = _read_member(tar, member).decode()
                    builtin = {line.rsplit("/", 1)[-1].removesuffix(".ko") for line in text.split()}
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise LabError(f"dpkg-deb --fsys-tarfile {deb} failed: {stderr.strip()}")
    if vmlinuz is None:
        raise LabError(f"{deb.name} contains no boot/vmlinuz-{release}")
    return vmlinuz, modules, builtin


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:
        raise LabError(f"cannot read {member.name} from the kernel package")
    return fh.read()


def _elf_vmlinux(vmlinuz: bytes, out: Path) -> bool:
    """Unpack the bzImage's XZ payload to ``out`` (stripped). False if it is not XZ."""
    start = vmlinuz.find(_XZ_MAGIC)
    if start < 0:
        return False
    try:
        elf = lzma.LZMADecompressor().decompress(vmlinuz[start:])
    except lzma.LZMAError as exc:
        raise LabError(f"cannot decompress the kernel payload: {exc}") from exc
    if elf[:4] != b"\x7fELF":
        return False
    full = out.with_suffix(".full")
    full.write_bytes(elf)
    try:
        _run(["strip", "-o", str(out), str(full)], timeout=120)
    except LabError:
        full.rename(out)  # unstripped boots just as well, it is only larger
    finally:
        full.unlink(missing_ok=True)
    return True


def _compile(source: Path, out: Path) -> None:
    _run(["gcc", "-O2", "-Wall", "-s", "-static", "-o", str(out), str(source)], timeout=120)


def _initramfs(root: Path, out: Path) -> None:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    listing = "\n".join([".", *names]) + "\n"
    try:
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "--owner=0:0"],
            cwd=root,
            input=listing.encode(),
            capture_output=True,
            timeout=120,
            check=False,
        )
    except FileNotFoundError as exc:
        raise LabError("cpio is not installed (run scripts/setup.sh)") from exc
    if proc.returncode != 0:
        raise LabError(f"cpio failed: {proc.stderr.decode(errors='replace').strip()}")
    out.write_bytes(gzip.compress(proc.stdout, compresslevel=9, mtime=0))


def _build(kernel: KernelPackage, digest: str, cache_dir: Path) -> GuestImages:
    started = time.monotonic()
    if not _busybox_is_static(BUSYBOX):
        raise LabError(f"{BUSYBOX} is not a static binary: install busybox-static")
    deb = _download_kernel(kernel, cache_dir / "debs")
    final = cache_dir / f"linux-{digest}"
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir))
    try:
        out = work / "out"
        out.mkdir()
        vmlinuz, modules, builtin = _kernel_files(deb, kernel.release)
        kernel_path = out / "vmlinux"
        pvh = _elf_vmlinux(vmlinuz, kernel_path)
        if not pvh:
            kernel_path = out / "vmlinuz"
            kernel_path.write_bytes(vmlinuz)
        root = work / "root"
        for sub in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        for helper in ("seqwriter", "dirtier"):
            _compile(SOURCE_DIR / f"{helper}.c", root / "bin" / helper)
        for module in VIRTIO_MODULES:
            if module in modules:
                (root / "lib/modules" / f"{module}.ko").write_bytes(modules[module])
            elif module not in builtin:
                raise LabError(f"{kernel.name} has no {module} module and does not build it in")
        shutil.copy2(SOURCE_DIR / "init", root / "init")
        (root / "init").chmod(0o755)
        _initramfs(root, out / "initrd.gz")
        shutil.rmtree(root)
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    images = GuestImages(
        directory=final,
        kernel=final / kernel_path.name,
        initrd=final / "initrd.gz",
        pvh=pvh,
        kernel_package=kernel,
        digest=digest,
        built_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        build_seconds=round(time.monotonic() - started, 2),
    )
    (final / _MANIFEST).write_text(images.model_dump_json(indent=2) + "\n")
    return images


def _prune(cache_dir: Path, keep: Path) -> None:
    for old in cache_dir.glob("linux-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    for tmp in cache_dir.glob("build-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_linux_guest(
    *, cache_dir: Path | None = None, force: bool = False, lock_timeout: float = 900.0
) -> GuestImages:
    """Return the cached Linux guest for the current inputs, building it first if needed.

    Safe to call from several processes at once (one builds, the others wait on a lock
    and then reuse the result). If apt cannot say which kernel is current (no package
    lists, offline) but a build exists, that build is used with a warning, unless
    ``SPICE_LIBVIRT_KERNEL_PACKAGE`` pins a package: then the error stands. Within one
    process the answer is remembered per cache directory (``force`` bypasses that).
    """
    cache_dir = cache_dir or guest_cache_dir()
    memo = _memo.get(cache_dir)
    if not force and memo is not None and memo.kernel.is_file() and memo.initrd.is_file():
        return memo
    images = _ensure(cache_dir, force=force, lock_timeout=lock_timeout)
    _memo[cache_dir] = images
    return images


#: Builds already checked by this process: asking apt again costs about a second per VM.
_memo: dict[Path, GuestImages] = {}


def _ensure(cache_dir: Path, *, force: bool, lock_timeout: float) -> GuestImages:
    try:
        kernel = resolve_kernel_package()
    except LabError as exc:
        pinned = bool(os.environ.get("SPICE_LIBVIRT_KERNEL_PACKAGE", "").strip())
        fallback = None if force or pinned else find_linux_guest(cache_dir)
        if fallback is None:
            raise
        log.warning("using cached guest %s: %s", fallback.directory, exc)
        return fallback
    digest = inputs_digest(kernel)
    if not force and (images := _load_manifest(cache_dir / f"linux-{digest}")) is not None:
        return images
    with _locked(cache_dir, lock_timeout):
        if not force and (images := _load_manifest(cache_dir / f"linux-{digest}")) is not None:
            return images  # someone else built it while we waited
        log.info("building the linux guest (%s %s)", kernel.name, kernel.version)
        images = _build(kernel, digest, cache_dir)
        _prune(cache_dir, images.directory)
        return images


def cache_command(
    argv: Sequence[str] | None,
    *,
    module: str,
    what: str,
    build: Callable[[Path | None, bool], BaseModel],
    find: Callable[[Path | None], BaseModel | None],
) -> int:
    """``python -m MODULE build|show``: build (or find) a cached guest and print where it is,
    or print the cached build without building (exit 1 when there is none, 10 on a lab
    error). The linux guest's command line and the memcheck guest's."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=f"Build or show the cached {what} of the spice-libvirt lab.",
    )
    parser.add_argument("action", choices=("build", "show"))
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: the guest cache")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    name = module.rsplit(".", 1)[-1]
    logging.basicConfig(level=logging.WARNING, format=f"spice-libvirt {name}: %(message)s")
    try:
        if args.action == "build":
            built = build(args.cache_dir, args.force)
        else:
            found = find(args.cache_dir)
            if found is None:
                print(f"no {what} built yet", file=sys.stderr)
                return 1
            built = found
    except LabError as exc:
        print(f"spice-libvirt {name}: error: {exc}", file=sys.stderr)
        return 10
    if not args.quiet:
        print(built.model_dump_json(indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cache_command(
        argv,
        module="spice_libvirt_lab.guest",
        what="linux test guest",
        build=lambda cache_dir, force: ensure_linux_guest(cache_dir=cache_dir, force=force),
        find=find_linux_guest,
    )


if __name__ == "__main__":
    sys.exit(main())
