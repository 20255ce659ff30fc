"""The Debian package of this tree, built once per content and kept in the cache.

``scripts/build-deb.sh`` builds it with Debian's tools in about two minutes (lintian
included); the Vagrant lab installs it on one of its hosts and the package's test checks it,
so both use this: the cache key is the digest of everything the package is built from
(``pyproject.toml``, ``README.md``, ``LICENSE``, ``spice_libvirt/``, ``debian/`` and the
script itself), and a tree that did not change is not built again. The bundled wheels come
from a local directory when one is given (offline), else the script fetches them from PyPI;
their hashes are checked either way.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from spice_libvirt.errors import LabError
from spice_libvirt_lab.procs import exclusive_lock
from spice_libvirt_lab.vagrant_box import NICE_ARGV, cache_root

REPO = Path(__file__).resolve().parent.parent.parent
SCRIPT = REPO / "scripts" / "build-deb.sh"
#: what the package is built from (the script copies exactly these)
INPUTS = (
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "spice_libvirt",
    "debian",
    "scripts/build-deb.sh",
)
BUILD_TIMEOUT_S = 1200.0


def deb_digest(root: Path = REPO) -> str:
    """Every input file's path and bytes (caches and build leftovers aside)."""
    h = hashlib.sha256()
    for name in INPUTS:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts or rel.parts[:2] in (
                ("debian", "vendor-wheels"),
                ("debian", "spice-libvirt"),
                ("debian", ".debhelper"),
            ):
                continue
            h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ensure_deb(log: Path, wheels: Path | None = None) -> Path:
    """The ``.deb`` of this tree: from the cache, or built now (one build at a time)."""
    digest = deb_digest()
    root = cache_root() / "deb"
    root.mkdir(parents=True, exist_ok=True)
    out = root / digest
    with exclusive_lock(root / ".lock", BUILD_TIMEOUT_S, "another package build is running"):
        found = sorted(out.glob("spice-libvirt_*.deb")) if out.is_dir() else []
        if found:
            return found[0]
        argv = [*NICE_ARGV, "bash", str(SCRIPT)]
        if wheels is not None:
            argv += ["--find-links", str(wheels)]
        with open(log, "ab") as err:
            try:
                proc = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                    text=True, timeout=BUILD_TIMEOUT_S, check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise LabError(f"building the Debian package timed out (see {log})") from exc
        built = Path(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
        if proc.returncode != 0 or built is None or not built.is_file():
            tail = log.read_text(errors="replace")[-1500:]
            raise LabError(f"scripts/build-deb.sh failed (exit {proc.returncode}):\n{tail}")
        tmp = Path(tempfile.mkdtemp(prefix=".deb-", dir=root))
        shutil.copy2(built, tmp / built.name)
        tmp.rename(out)
        return out / built.name
