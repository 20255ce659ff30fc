"""Can root run this code? Only if no one but root can change it, all the way up.

``hook install`` writes a shim that libvirtd (root) runs on every guest operation, and
``agent unit`` a unit that systemd (root) starts; both name an interpreter, a launcher or a
script, and a package. If any of those files, or any directory above them, belongs to
another user or can be written by a group or by others, that user can make root run their
code: ``sudo spice-libvirt hook install`` from a user's venv would hand the user root. So
both refuse such an installation before they write anything, and ``doctor`` checks what is
installed.

The rule, for every path checked (symlinks followed: the link, then its target, each with
the directories above it):

* every directory from ``/`` down is owned by root and writable by no one else, except a
  root-owned directory with the sticky bit (``/tmp``): there no one else can remove or
  rename what root owns in it;
* the file itself is owned by root and writable by no one else.

A tree (the package, a venv's ``site-packages``) is checked entry by entry with the same rule.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path

from spice_libvirt.errors import UnsafePathError
from spice_libvirt.files import change_refusal

#: symlinks followed per path before giving up (the kernel's own limit)
_MAX_LINKS = 40


def _require(path: Path, st: os.stat_result, what: str, checked: Path) -> None:
    """Raise for ``path``, naming ``checked`` (the file asked about) when ``path`` is one of
    the directories above it."""
    reason = change_refusal(path, st, sticky_ok=True)
    if reason is None:
        return
    if path == checked:
        raise UnsafePathError(f"{what} {reason}")
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "link target"
    raise UnsafePathError(f"{what} {checked}: {kind} {reason}")


def require_root_only(path: Path, what: str = "file") -> None:
    """Raise :class:`UnsafePathError` unless ``path`` and every directory above it are
    root's and writable by no one else (see the module docstring); ``what`` names the file
    in the message ("interpreter", "launcher", ...)."""
    checked = Path(os.path.abspath(path))
    _walk(checked, what, checked, links=0)


def _walk(path: Path, what: str, checked: Path, links: int) -> None:
    if links > _MAX_LINKS:
        raise UnsafePathError(f"{what} {checked}: too many levels of symlinks")
    current = Path("/")
    parts = path.parts[1:]
    try:
        _require(current, os.lstat(current), what, checked)
        for index, part in enumerate(parts):
            here = current / part
            st = os.lstat(here)
            if stat.S_ISLNK(st.st_mode):
                # the link lives in ``current`` (checked); its target is checked afresh
                target = Path(os.readlink(here))
                rest = parts[index + 1 :]
                resolved = Path(os.path.normpath(current / target)).joinpath(*rest)
                _walk(resolved, what, resolved if here == checked else checked, links + 1)
                return
            _require(here, st, what, checked)
            current = here
    except FileNotFoundError:
        raise UnsafePathError(f"{what} {checked} does not exist") from None
    except OSError as exc:
        raise UnsafePathError(
            f"{what} {checked} cannot be checked: {exc.strerror or exc}"
        ) from None


def require_root_only_tree(root: Path, what: str = "package") -> None:
    """:func:`require_root_only` for ``root``, then the same rule for everything inside it
    (a symlink inside is followed as its own path)."""
    require_root_only(root, what)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue  # gone meanwhile (a __pycache__ being rewritten)
            if stat.S_ISLNK(st.st_mode):
                require_root_only(path, f"file of the {what}")
            else:
                _require(path, st, f"file of the {what}", path)


def shebang_interpreter(script: Path) -> Path | None:
    """The interpreter a script's ``#!`` line names (absolute paths only), else None."""
    try:
        with script.open("rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if not words or not words[0].startswith("/"):
        return None
    return Path(words[0])


def package_trees() -> list[Path]:
    """What root imports from when it runs this installation: the ``spice_libvirt``
    package and, in a venv, the venv's own ``site-packages`` (its dependencies)."""
    trees = {Path(__file__).resolve().parent}
    if sys.prefix != sys.base_prefix:
        prefix = Path(sys.prefix).resolve()
        for entry in sys.path:
            path = Path(entry).resolve() if entry else None
            if path is not None and path.is_dir() and path.is_relative_to(prefix):
                trees.add(path)
    # a tree inside another is checked with it
    return sorted(t for t in trees if not any(t != o and t.is_relative_to(o) for o in trees))


def require_runnable_by_root(
    *, interpreter: Path | None = None, scripts: Iterable[Path] = (), trees: Iterable[Path] = ()
) -> None:
    """The whole chain root would run: each script (and the interpreter its ``#!`` names),
    the interpreter, and every tree of code it imports. The first problem is raised."""
    for script in scripts:
        require_root_only(script, "script")
        named = shebang_interpreter(script)
        if named is not None:
            require_root_only(named, "interpreter")
    if interpreter is not None:
        require_root_only(interpreter, "interpreter")
    for tree in trees:
        require_root_only_tree(tree)
