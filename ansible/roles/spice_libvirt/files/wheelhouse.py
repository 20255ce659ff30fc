#!/usr/bin/env python3
"""Build (or describe) the wheelhouse the role installs on hosts that have no package index.

Runs on the Ansible controller. The hosts get one tar of wheels (spice-libvirt and every
dependency, pinned by a constraints file) and install it with ``pip --no-index``; they never
see an index, a proxy or a compiler.

Whether a host is up to date is decided by the *manifest*: one line per wheel, the sha256
of the wheel's ``RECORD`` (the list of every file it installs with its hash) and the wheel's
name. Wheels are zip files whose timestamps change on every build; their RECORD does not
unless a file's content changed. So a rebuilt but identical wheelhouse has the same
manifest (the role changes nothing), whatever ``pip_spec`` asked for (``spice-libvirt``,
``spice-libvirt>=0.1``, a path), and an edited source tree with an unchanged version number
is still noticed.

Every wheel is hashed too: ``requirements.txt`` pins each one (``name==version
--hash=sha256:...``) and the hosts install with ``pip --require-hashes -r`` from the copy the
role writes from this run's answer, so a host installs the very files built here or nothing.
The wheelhouse is built in a *private* directory: it and its parent must be owned by the
user running this and writable by no one else, and are never symlinks (a world-shared
``/tmp`` path would let anyone swap a wheel between the build and the copy). Reusing a
wheelhouse (``--no-build``) re-hashes every wheel against its ``requirements.txt`` first.

The source tree is copied (without caches and build directories) before it is built: pip
builds a local project in place, and a stale ``build/`` directory would smuggle deleted
modules into the wheel. Only the product's package is copied: the labs (``lab/``, a
distribution of their own) never reach a wheelhouse.

Prints one JSON object: ``{"dir", "tar", "manifest", "digest", "project_wheel", "wheels",
"requirements"}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PROJECT = "spice_libvirt"
#: what a source tree needs to build (anything else, like tests or the lab's caches, is left out)
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in")
SOURCE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


class WheelhouseError(Exception):
    """Something the admin must fix (message printed on stderr, exit status 2)."""


def record_digest(wheel: Path) -> str:
    """sha256 of the wheel's RECORD: changes with the wheel's contents, not with its mtimes."""
    with zipfile.ZipFile(wheel) as zf:
        records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise WheelhouseError(f"{wheel.name}: not a wheel (no single RECORD)")
        return hashlib.sha256(zf.read(records[0])).hexdigest()


def manifest_of(wheel_dir: Path) -> str:
    """One ``<RECORD sha256>  <wheel file name>`` line per wheel, sorted by name."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise WheelhouseError(f"{wheel_dir}: no wheels")
    return "".join(f"{record_digest(w)}  {w.name}\n" for w in wheels)


#: a wheel's file name: distribution, version, optional build tag, python, abi, platform
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def requirements_of(wheel_dir: Path) -> str:
    """``name==version --hash=sha256:...`` for every wheel: what the hosts install, and only it."""
    lines = ["# every wheel of this wheelhouse, pinned and hashed (pip --require-hashes)\n"]
    for wheel in sorted(wheel_dir.glob("*.whl")):
        m = _WHEEL_NAME.match(wheel.name)
        if m is None:
            raise WheelhouseError(f"{wheel.name}: not a wheel file name")
        name = m.group("name").replace("_", "-").lower()
        lines.append(f"{name}=={m.group('version')} --hash=sha256:{sha256_of(wheel)}\n")
    return "".join(lines)


def _owned_and_closed(path: Path, what: str) -> None:
    """``path`` is a real directory of this user (or root), writable by no one else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise WheelhouseError(f"{path}: {what} is a symlink; give a private directory")
    if not stat.S_ISDIR(st.st_mode):
        raise WheelhouseError(f"{path}: {what} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise WheelhouseError(f"{path}: {what} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o022:
        raise WheelhouseError(
            f"{path}: {what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            " give a private directory"
        )


def private_dir(out: Path) -> Path:
    """Check (and create, 0700) the wheelhouse directory ``out`` and its parent.

    Both must be directories of this user (the parent may be root's), not symlinks, and
    writable by no one else; ``out`` itself is made 0700. Nothing is chmod-ed that this did
    not create: a directory that fails the check is refused, never repaired.
    """
    out = out.absolute()
    _owned_and_closed(out.parent, "the wheelhouse's parent directory")
    _owned_and_closed(out, "the wheelhouse directory")
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _owned_and_closed(out.parent, "the wheelhouse's parent directory")
    if out.exists() and out.stat().st_uid != os.geteuid():
        raise WheelhouseError(f"{out}: the wheelhouse directory is not this user's")
    return out


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Tar members owned by root, mode 0644: the host unpacks them as they are meant to be."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644
    return info


def copy_source(source: Path, dest: Path) -> Path:
    """A clean copy of a source tree: the project files and the package, no build leftovers."""
    if not (source / "pyproject.toml").is_file():
        raise WheelhouseError(f"{source}: no pyproject.toml (spice_libvirt_source_dir)")
    dest.mkdir(parents=True)
    for name in SOURCE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    shutil.copytree(source / PROJECT, dest / PROJECT, ignore=SOURCE_IGNORE)
    return dest


def build(
    *,
    out: Path,
    source: Path | None,
    spec: str,
    extras: str,
    constraints: Path,
    pip_args: list[str],
) -> None:
    """Build the wheelhouse into a fresh directory and swap it in for ``out``.

    A fresh directory keeps exactly one version of each distribution, so the hosts' pip
    cannot pick a stale one.
    """
    if not constraints.is_file():
        raise WheelhouseError(f"{constraints}: constraints file missing")
    out = private_dir(out)
    work = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=out.parent))  # 0700
    try:
        if source is not None:
            target = str(copy_source(source, work / "src"))
            if extras:
                target += f"[{extras}]"
        else:
            target = spec
        wheels = work / "wheels"
        argv = [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
            "--wheel-dir", str(wheels), "--constraint", str(constraints), *pip_args, target,
        ]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise WheelhouseError(f"pip wheel failed: {proc.stderr.strip()[-2000:]}")
        manifest = manifest_of(wheels)
        (wheels / "MANIFEST").write_text(manifest)
        (work / "requirements.txt").write_text(requirements_of(wheels))
        digest = hashlib.sha256(manifest.encode()).hexdigest()[:16]
        with tarfile.open(work / f"wheelhouse-{digest}.tar", "w") as tar:
            for item in sorted(wheels.glob("*.whl")):
                tar.add(item, arcname=item.name, filter=_as_root)
        shutil.rmtree(work / "src", ignore_errors=True)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def describe(out: Path) -> dict[str, object]:
    """What the role needs to know about a built wheelhouse, checked again first: the
    directory private, every wheel hashed in ``requirements.txt`` and matching its hash."""
    out = private_dir(out)
    wheels = out / "wheels"
    try:
        requirements = (out / "requirements.txt").read_text()
    except FileNotFoundError:
        raise WheelhouseError(f"{out}/requirements.txt missing: rebuild the wheelhouse") from None
    if requirements_of(wheels) != requirements:
        raise WheelhouseError(
            f"{out}: the wheels do not match the hashes in requirements.txt (changed since "
            "they were built?): rebuild the wheelhouse"
        )
    manifest = manifest_of(wheels)
    digest = hashlib.sha256(manifest.encode()).hexdigest()[:16]
    tar = out / f"wheelhouse-{digest}.tar"
    if not tar.is_file():
        raise WheelhouseError(f"{tar} missing: rebuild the wheelhouse")
    names = [line.split("  ", 1)[1] for line in manifest.splitlines()]
    ours = [n for n in names if n.startswith(f"{PROJECT}-")]
    if len(ours) != 1:
        raise WheelhouseError(f"{wheels}: expected one {PROJECT} wheel, found {ours}")
    return {
        "dir": str(out),
        "tar": str(tar),
        "manifest": manifest,
        "digest": digest,
        "project_wheel": ours[0],
        "wheels": names,
        "requirements": requirements,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="wheelhouse directory")
    parser.add_argument("--source", type=Path, help="source tree to build spice-libvirt from")
    parser.add_argument("--spec", default="", help="pip requirement instead of a source tree")
    parser.add_argument("--extras", default="", help="comma-separated extras of spice-libvirt")
    parser.add_argument("--constraints", type=Path, help="pinned versions of every dependency")
    parser.add_argument(
        "--pip-arg", action="append", default=[], help="extra pip wheel argument (repeatable)"
    )
    parser.add_argument(
        "--no-build", action="store_true", help="only describe an existing wheelhouse"
    )
    args = parser.parse_args(argv)
    try:
        if not args.no_build:
            if (args.source is None) == (not args.spec):
                raise WheelhouseError("give exactly one of --source and --spec")
            if args.constraints is None:
                raise WheelhouseError("--constraints is required to build")
            build(
                out=args.out,
                source=args.source,
                spec=args.spec,
                extras=args.extras,
                constraints=args.constraints,
                pip_args=args.pip_arg,
            )
        print(json.dumps(describe(args.out)))
    except (WheelhouseError, OSError) as exc:
        print(f"wheelhouse: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
