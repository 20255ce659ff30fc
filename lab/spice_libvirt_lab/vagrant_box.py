"""The Vagrant lab's box: built once from Debian packages, kept in the cache, added to Vagrant.

No Vagrant Cloud is reachable from the machines this lab runs on, and the lab network has no
mirror, so the box is built here by ``vagrant/box/build.sh`` (mmdebstrap, extlinux, qcow2)
with everything the hypervisors need baked in (``vagrant/box/packages.txt``). Building takes
minutes, so it happens only when its inputs change: the cache key is the digest of the build
script and the package list, and it is also in the box's Vagrant name, so a rebuilt box is a
new name (and a new volume in vagrant-libvirt's pool) rather than a stale one under an old
name.

Vagrant's own state (boxes, plugins' data) lives in a ``VAGRANT_HOME`` inside the cache, not
in ``~/.vagrant.d``: the lab neither reads nor changes what a user keeps there.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel

from spice_libvirt.errors import LabError
from spice_libvirt_lab.procs import exclusive_lock

REPO_VAGRANT_DIR = Path(__file__).resolve().parent.parent.parent / "vagrant"
BUILD_SCRIPT = REPO_VAGRANT_DIR / "box" / "build.sh"
PACKAGES_FILE = REPO_VAGRANT_DIR / "box" / "packages.txt"
BOX_FILE_NAME = "spice-libvirt-debian12.box"
#: heavy work runs at the lowest CPU and I/O priority: the machine is shared
NICE_ARGV = ("nice", "-n", "19", "ionice", "-c3")
#: how long a box build may take (mmdebstrap fetches a few hundred MiB)
BUILD_TIMEOUT_S = 1800.0


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/spice-libvirt`` (``~/.cache/spice-libvirt``), like the other caches."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spice-libvirt"


def vagrant_home() -> Path:
    return cache_root() / "vagrant-home"


def box_digest(build_script: Path = BUILD_SCRIPT, packages: Path = PACKAGES_FILE) -> str:
    """What the box is made of: the build script and the package list, byte for byte."""
    h = hashlib.sha256()
    for path in (build_script, packages):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class Box(BaseModel):
    """A built box and the name it is known by to Vagrant."""

    digest: str
    path: Path
    name: str
    #: seconds spent building it now (0: it was in the cache)
    build_s: float = 0.0
    #: seconds spent in ``vagrant box add`` now (0: Vagrant had it)
    add_s: float = 0.0


def vagrant_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["VAGRANT_HOME"] = str(vagrant_home())
    env["VAGRANT_CHECKPOINT_DISABLE"] = "1"
    env["VAGRANT_NO_COLOR"] = "1"
    env.update(extra or {})
    return env


def _run(argv: list[str], log: Path, timeout: float, what: str) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=vagrant_env(),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{what}: timed out after {timeout:.0f} s (see {log})") from exc
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise LabError(f"{what} failed (exit {proc.returncode}); end of {log}:\n{tail}")


def build_box(out_dir: Path, log: Path) -> float:
    """Run the build script into ``out_dir`` at nice 19 / idle I/O; the seconds it took."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _run(
        [*NICE_ARGV, "bash", str(BUILD_SCRIPT), str(out_dir), str(PACKAGES_FILE)],
        log,
        BUILD_TIMEOUT_S,
        "building the Vagrant box",
    )
    if not (out_dir / BOX_FILE_NAME).is_file():
        raise LabError(f"the box build left no {BOX_FILE_NAME} in {out_dir} (see {log})")
    return time.monotonic() - t0


def _vagrant_has_box(name: str) -> bool:
    proc = subprocess.run(
        ["vagrant", "box", "list", "--machine-readable"],
        capture_output=True,
        text=True,
        env=vagrant_env(),
        timeout=120,
        check=False,
    )
    return f",box-name,{name}\n" in proc.stdout + "\n"


def ensure_box(log: Path) -> Box:
    """The box for the current inputs: built if the cache lacks it, added if Vagrant does.

    One build at a time per cache (a lock file), so two labs started together do not build
    the same box twice.
    """
    digest = box_digest()
    root = cache_root() / "vagrant-box"
    root.mkdir(parents=True, exist_ok=True)
    box_dir = root / digest
    box = Box(digest=digest, path=box_dir / BOX_FILE_NAME, name=f"spice-libvirt/debian12-{digest}")
    with exclusive_lock(root / ".lock", BUILD_TIMEOUT_S, "another box build is running"):
        if not box.path.is_file():
            box.build_s = round(build_box(box_dir, log), 1)
        if not _vagrant_has_box(box.name):
            t0 = time.monotonic()
            _run(
                [*NICE_ARGV, "vagrant", "box", "add", "--force", "--name", box.name, str(box.path)],
                log,
                900.0,
                "vagrant box add",
            )
            box.add_s = round(time.monotonic() - t0, 1)
    return box
