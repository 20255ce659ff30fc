"""Every file and directory spice-libvirt creates on a host, made one way.

Root runs the hook, the agent and usually the CLI, and what they write names guests,
clients and destinations (the journal, hold records, the agent's status, reports and
timelines). So each file and directory gets an explicit mode -- set with ``fchmod``/``chmod``
after creation, never left to the caller's umask -- private by default (files 0600,
directories 0700), and a path is refused, with one clear error and nothing written, when

* it is a symbolic link (``O_NOFOLLOW`` too, for the window after the check), or not a
  regular file/directory;
* its directory can be written by anyone but root and us (group- or world-writable, or
  owned by another user): whoever can write there can swap a symlink in between any check
  and any write, so no check inside such a directory is worth anything.

Only :mod:`os` and :mod:`spice_libvirt.errors`: the hook imports this on every guest event
(``tests/test_hook_launch.py`` checks what a hook call loads).
"""

from __future__ import annotations

import os

from spice_libvirt.errors import UnsafePathError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
#: for what must be run or read by others and names nothing (the hook's shim)
PUBLIC_EXECUTABLE = 0o755

_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFLNK = 0o120000


def _kind(mode: int) -> int:
    return mode & _S_IFMT


def change_refusal(
    path: object,
    st: os.stat_result,
    owners: frozenset[int] = frozenset({0}),
    *,
    sticky_ok: bool = False,
) -> str | None:
    """Why someone other than ``owners`` could change ``path`` (``st``: its status), or None.

    The one rule every trust check here applies (the shim's interpreter and package, a
    directory written in, a QEMU's pid file, the lab's directories): the owner is one of
    ``owners``, and neither its group nor others may write it -- except, with
    ``sticky_ok``, a directory with the sticky bit (``/tmp``: no one else can remove or
    rename what is ours in it)."""
    if st.st_uid not in owners:
        allowed = " or ".join("root" if uid == 0 else f"uid {uid}" for uid in sorted(owners))
        return f"{path} belongs to uid {st.st_uid}, not {allowed}"
    mode = st.st_mode & 0o7777
    if mode & 0o022 and not (sticky_ok and _kind(st.st_mode) == _S_IFDIR and mode & 0o1000):
        who = {0o022: "its group and others", 0o020: "its group"}.get(mode & 0o022, "others")
        return f"{path} is writable by {who} (mode {mode:04o})"
    return None


def check_directory(directory: str) -> None:
    """Refuse ``directory`` (symlinks followed: ``/var/run`` -> ``/run`` is fine) unless it
    is a directory only root and we can write to."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise UnsafePathError(f"{directory}: {exc.strerror or exc}") from exc
    if _kind(st.st_mode) != _S_IFDIR:
        raise UnsafePathError(f"cannot use {directory}: not a directory")
    reason = change_refusal(directory, st, frozenset({0, os.geteuid()}))
    if reason is not None:
        raise UnsafePathError(
            f"{reason}: another user could swap a file there for a symlink; refused, nothing "
            "written (use a directory only root or you can write)"
        )


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) or "/"


def ensure_directory(
    path: str | os.PathLike[str], mode: int = PRIVATE_DIR, *, private: bool = False
) -> str:
    """``path`` as a directory we may write in: created with ``mode`` (missing parents too,
    each with ``mode``), or an existing one only root and we can write. With ``private``, an
    existing directory must also be closed to others already (``mode & 0o077 == 0``): it is
    never chmodded to fit, since it may be someone else's (``--state-dir /etc``)."""
    path = os.path.abspath(os.fspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = _parent(path)
        if parent != path and not os.path.isdir(parent):
            ensure_directory(parent, mode)
        check_directory(parent)
        try:
            os.mkdir(path, mode)
            os.chmod(path, mode)  # mkdir's mode went through the umask
        except FileExistsError:  # created meanwhile (another hook): check it as found
            return ensure_directory(path, mode, private=private)
        except OSError as exc:
            raise UnsafePathError(f"cannot create {path}: {exc.strerror or exc}") from exc
        return path
    except OSError as exc:
        raise UnsafePathError(f"{path}: {exc.strerror or exc}") from exc
    if _kind(st.st_mode) == _S_IFLNK:
        raise UnsafePathError(f"{path} is a symbolic link; refused, nothing written")
    check_directory(path)
    if private and st.st_mode & 0o077:
        raise UnsafePathError(
            f"{path} exists and is open to others (mode {st.st_mode & 0o7777:04o}); spice-libvirt "
            "keeps guest and client names there: give it a new directory, or make this one "
            "private (chmod 700) yourself"
        )
    return path


def _refuse_link(path: str) -> os.stat_result | None:
    """The file's own status (None: absent); refuses a symlink or a non-regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnsafePathError(f"{path}: {exc.strerror or exc}") from exc
    if _kind(st.st_mode) == _S_IFLNK:
        raise UnsafePathError(f"{path} is a symbolic link; refused, nothing written")
    if _kind(st.st_mode) != _S_IFREG:
        raise UnsafePathError(f"{path} is not a regular file; refused, nothing written")
    return st


def open_file(
    path: str | os.PathLike[str], mode: int = PRIVATE_FILE, flags: int = os.O_RDWR
) -> int:
    """A descriptor of ``path`` (created if absent) with exactly ``mode``, in a directory
    only root and we can write; a file we own that has a wider mode is narrowed to it."""
    path = os.fspath(path)
    check_directory(_parent(path))
    st = _refuse_link(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise UnsafePathError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        now = os.fstat(fd)
        if (now.st_mode & 0o7777) != mode and (st is None or now.st_uid == os.geteuid()):
            os.fchmod(fd, mode)
    except OSError as exc:
        os.close(fd)
        raise UnsafePathError(f"cannot set the mode of {path}: {exc.strerror or exc}") from exc
    return fd


def ensure_file(
    path: str | os.PathLike[str], mode: int = PRIVATE_FILE, *, siblings: tuple[str, ...] = ()
) -> None:
    """``path`` exists with ``mode`` (see :func:`open_file`); ``siblings`` are suffixes of
    files another library creates beside it (SQLite's ``-wal``, ``-shm``), which must not be
    symlinks either and get the same mode when they exist."""
    os.close(open_file(path, mode, os.O_RDONLY))
    for suffix in siblings:
        other = f"{os.fspath(path)}{suffix}"
        st = _refuse_link(other)
        if st is not None and (st.st_mode & 0o7777) != mode and st.st_uid == os.geteuid():
            os.chmod(other, mode, follow_symlinks=False)


def check_target(path: str | os.PathLike[str]) -> None:
    """Refuse now, before any work, a file :func:`write_file` would refuse later."""
    path = os.fspath(path)
    check_directory(_parent(path))
    _refuse_link(path)


def write_file(
    path: str | os.PathLike[str], data: str | bytes, mode: int = PRIVATE_FILE, *, sync: bool = False
) -> None:
    """Replace ``path`` with ``data`` atomically (a temporary file beside it, then
    ``rename``), the new file with exactly ``mode``. Refuses a symlink at ``path`` and a
    directory others can write."""
    path = os.fspath(path)
    check_directory(_parent(path))
    _refuse_link(path)
    tmp = os.path.join(_parent(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise UnsafePathError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        try:  # noqa: SIM105 - contextlib is an import the hook does not pay for
            os.unlink(tmp)
        except OSError:
            pass
        raise UnsafePathError(f"cannot write {path}: {exc.strerror or exc}") from exc


__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "PUBLIC_EXECUTABLE",
    "UnsafePathError",
    "change_refusal",
    "check_directory",
    "check_target",
    "ensure_directory",
    "ensure_file",
    "open_file",
    "write_file",
]
