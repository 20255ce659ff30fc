"""Where labs keep their state: one default directory, created private, removed only inside.

Every lab kind (the QEMU lab, the libvirt lab in ``<lab dir>/libvirt``) starts from the same
:func:`default_lab_dir`, so ``lab up``, ``lab status`` and ``lab down`` find each other's
state whichever kind is up. The directory holds PIDs that ``lab down`` signals and sockets
that QEMU and libvirtd listen on, so a directory someone else could write to would let them
steer what we kill or connect to: it is created 0700 and refused when it is not ours.

The default is under ``/run`` for root (nothing of a lab survives a reboot; neither should
its state). The libvirt lab's hosts bind-mount their own ``/run`` inside their mount
namespaces; :mod:`spice_libvirt_lab.libvirt_host` mounts it last, so a lab directory under
``/run`` stays reachable while the namespace is set up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from spice_libvirt.errors import LabError
from spice_libvirt.files import change_refusal

#: Overrides the default lab directory for every lab command.
LAB_DIR_ENV = "SPICE_LIBVIRT_LAB_DIR"
#: The default for root.
ROOT_LAB_DIR = Path("/run/spice-libvirt/lab")
#: The libvirt lab's sub-directory of a lab directory.
LIBVIRT_SUBDIR = "libvirt"


class UnsafeLabDirectory(LabError):
    """The lab directory (or a directory above it) could be changed by another user."""


def default_lab_dir() -> Path:
    """``$SPICE_LIBVIRT_LAB_DIR``; else ``/run/spice-libvirt/lab`` (root) or a per-user dir.

    Non-root: ``$XDG_RUNTIME_DIR/spice-libvirt/lab`` (already private to the user), else
    ``/tmp/spice-libvirt-UID/lab``, which :func:`ensure_private_dir` creates 0700 and checks.
    """
    env = os.environ.get(LAB_DIR_ENV)
    if env:
        return Path(env).absolute()
    if os.geteuid() == 0:
        return ROOT_LAB_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "spice-libvirt" / "lab"
    return Path(f"/tmp/spice-libvirt-{os.getuid()}") / "lab"


def libvirt_lab_dir(base: Path | None = None) -> Path:
    """The libvirt lab's directory inside lab directory ``base`` (default: the default)."""
    return ((base or default_lab_dir()) / LIBVIRT_SUBDIR).absolute()


def _check_ancestor(path: Path, uid: int) -> None:
    """An ancestor may be root's or ours; writable by others only if sticky (like /tmp)."""
    reason = change_refusal(path, path.stat(), frozenset({0, uid}), sticky_ok=True)
    if reason is not None:
        raise UnsafeLabDirectory(reason)


def _check_own(path: Path, uid: int) -> None:
    """The lab directory itself: a real directory, ours, writable by nobody else."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeLabDirectory(f"lab directory {path} is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeLabDirectory(f"lab directory {path} is not a directory")
    reason = change_refusal(path, st, frozenset({uid}))
    if reason is not None:
        raise UnsafeLabDirectory(f"lab directory {reason}")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700, or check the one that exists.

    :raise UnsafeLabDirectory: the directory is not ours, is group/world-writable or is a
        symlink, or a directory above it could be changed by another user
    """
    path = path.absolute()
    uid = os.geteuid()
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for ancestor in [probe, *probe.parents]:
        _check_ancestor(ancestor, uid)
    for directory in reversed(missing):
        # made meanwhile by someone else: the checks below decide
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        _check_own(directory, uid)
    _check_own(path, uid)
    return path


def check_private_dir(path: Path) -> Path:
    """Check an existing lab directory as :func:`ensure_private_dir` does; create nothing.

    For read-only commands (``status``): state read from a directory others can write is
    not evidence of anything. A directory that does not exist passes (there is no lab).
    """
    path = path.absolute()
    if not path.exists() and not path.is_symlink():
        return path
    uid = os.geteuid()
    for ancestor in path.parents:
        _check_ancestor(ancestor, uid)
    _check_own(path, uid)
    return path


def remove_inside(root: Path, path: Path) -> None:
    """``rmtree(path)`` only if ``path`` lies strictly inside ``root`` (symlinks resolved).

    State files name the directories to remove; a damaged or planted state file must not
    make ``lab down`` remove anything outside the lab.
    """
    real_root, real = root.resolve(), path.resolve()
    if real == real_root or real_root not in real.parents:
        raise UnsafeLabDirectory(f"refusing to remove {path}: not inside the lab directory {root}")
    shutil.rmtree(real, ignore_errors=True)


__all__ = [
    "LAB_DIR_ENV",
    "ROOT_LAB_DIR",
    "UnsafeLabDirectory",
    "check_private_dir",
    "default_lab_dir",
    "ensure_private_dir",
    "libvirt_lab_dir",
    "remove_inside",
]
