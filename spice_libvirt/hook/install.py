"""Install, inspect and remove the libvirt hook shim.

Where: ``/etc/libvirt/hooks/qemu.d/50-spice-libvirt``. libvirt (since 6.5.0) runs every
executable in ``qemu.d/`` in alphabetical order *after* ``hooks/qemu``, feeding each one
the previous one's output XML. We never write ``hooks/qemu`` itself: on an oVirt host VDSM
owns that file, and other tools expect to own it too.

What: a sh shim of a few lines (VDSM's layout) that sets a UTF-8 locale and execs the hook
*by absolute path*, because libvirtd runs hooks with a minimal environment and PATH. Two
forms, both recognised by :func:`parse_shim`:

* the default (:func:`render_default_shim`): the venv's interpreter with ``-I -S`` on
  :mod:`spice_libvirt.hook.launch` inside the installed package. libvirtd runs the hook on
  every event of every domain, and skipping ``site`` (site-packages scan, ``.pth`` files)
  is most of what separates a hook call from a bare interpreter start
  (``benchmarks/bench_hook.py``);
* ``exec .../spice-libvirt-hook "$@"``, the console script (``--executable``; the form the
  Ansible role's template writes): the same :func:`~spice_libvirt.hook.qemu_hook.main`, with
  ``site``.

Either way root runs what the shim names, so :func:`install` refuses (exit 14, nothing
written) an interpreter, launcher, script, package or directory above them that is not
root's or that a group or others can write (:mod:`spice_libvirt.trust`), and ``doctor``
checks an installed shim the same way (:func:`trust_problem`).

The default form names a file inside the installed package, whose path carries the Python
version (``lib/python3.11/site-packages``). A shim whose launcher has gone (spice-libvirt
reinstalled for another Python) falls back to the venv's console script, so libvirt's calls
still reach the hook (a hook that cannot start fails every VM operation); ``hook status``
reports the target as not ok until ``hook install`` writes the shim again.

The paths are those of the venv this code runs from, baked in at install time;
``--config`` bakes in ``SPICE_LIBVIRT_CONFIG`` too, which is how a lab runs several
simulated hosts with different configurations on one file system.

libvirtd reads the hook directory when it starts, so every change here needs a restart of
libvirtd (or virtqemud); the functions say so in their messages.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from spice_libvirt import trust
from spice_libvirt.errors import ConfigError, HookError, UnsafePathError
from spice_libvirt.files import PUBLIC_EXECUTABLE, ensure_directory, write_file

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
#: The shim's file name in ``qemu.d``: ``50-`` leaves room on both sides for ordering.
SHIM_NAME = "50-spice-libvirt"
#: The second line of every shim we write; it is how we recognise our own file.
MARKER = "# spice-libvirt: libvirt qemu hook shim"
RESTART_HINT = "reload libvirtd (or virtqemud; systemctl reload, i.e. SIGHUP) to load the hook"
#: The libvirt version that introduced ``hooks/qemu.d/``.
QEMU_D_SINCE = (6, 5)
_VERSION_RE = re.compile(r"\b(\d+\.\d+(?:\.\d+)?)\s*$")


def libvirt_daemon_version(timeout: float = 5.0) -> str | None:
    """The version ``virtqemud --version`` or ``libvirtd --version`` reports, if either exists.

    Asking the daemon binary (not the libvirt API) works without a running daemon and
    without libvirt-python.
    """
    for daemon in ("virtqemud", "libvirtd"):
        exe = shutil.which(daemon) or shutil.which(daemon, path="/usr/sbin:/sbin")
        if exe is None:
            continue
        try:
            proc = subprocess.run(
                [exe, "--version"], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = _VERSION_RE.search(proc.stdout.strip())
        if proc.returncode == 0 and m:
            return m.group(1)
    return None


class HookStatus(BaseModel):
    """What ``spice-libvirt hook status`` reports."""

    hooks_dir: Path
    shim_path: Path
    #: a file exists at :attr:`shim_path`
    present: bool
    #: ... and it is one of ours (carries :data:`MARKER`)
    ours: bool
    #: the executable our shim execs, as written in it (the console script, or the
    #: interpreter of the default form)
    target: Path | None = None
    #: the default form's launcher file (``spice_libvirt/hook/launch.py``), else None
    launcher: Path | None = None
    #: that executable exists and is executable (and the launcher, if any, is a file)
    target_ok: bool = False
    #: the configuration file baked into the shim, if any
    config: Path | None = None
    #: a ``hooks/qemu`` script exists (VDSM's or another tool's; we leave it alone)
    foreign_qemu_hook: bool
    #: other scripts in ``qemu.d``, in the order libvirt runs them
    other_scripts: list[str]
    #: version of the local libvirt daemon (``libvirtd --version``), None if not found
    libvirt_version: str | None = None

    @property
    def qemu_d_supported(self) -> bool | None:
        """libvirt runs ``qemu.d/`` scripts since 6.5.0; None when the version is unknown."""
        if self.libvirt_version is None:
            return None
        try:
            parts = tuple(int(p) for p in self.libvirt_version.split(".")[:2])
        except ValueError:
            return None
        return parts >= QEMU_D_SINCE

    @property
    def installed(self) -> bool:
        return self.present and self.ours


class InstallResult(BaseModel):
    path: Path
    changed: bool
    message: str


def default_hook_executable() -> Path:
    """The ``spice-libvirt-hook`` script of the venv the running interpreter belongs to.

    ``sys.executable`` is the venv's ``bin/python`` (not resolved through its symlink), so
    its directory is the venv's ``bin``.
    """
    return Path(sys.executable).parent / "spice-libvirt-hook"


def default_launcher() -> Path:
    """This installation's ``spice_libvirt/hook/launch.py`` (what the default shim runs)."""
    return Path(__file__).resolve().with_name("launch.py")


#: The interpreter options of the default form: no environment, no ``site``.
LAUNCH_OPTIONS = ("-I", "-S")


def _shim_lines(exec_words: list[str], config: Path | None, fallback: str = "") -> str:
    lines = [
        "#!/bin/sh",
        MARKER,
        "# libvirt runs hooks with LC_ALL=C and a minimal PATH: force UTF-8 and exec the",
        "# hook by absolute path. See `spice-libvirt hook --help`.",
        "LC_ALL=C.UTF-8",
        "export LC_ALL",
    ]
    if config is not None:
        lines += [f"SPICE_LIBVIRT_CONFIG={shlex.quote(str(config))}", "export SPICE_LIBVIRT_CONFIG"]
    if fallback:
        lines.append(fallback)
    lines.append("exec " + " ".join(shlex.quote(w) for w in exec_words) + ' "$@"')
    return "\n".join(lines) + "\n"


def render_shim(
    executable: Path, config: Path | None = None, *, launcher: Path | None = None
) -> str:
    """The text of the shim that execs ``executable`` (and sets ``SPICE_LIBVIRT_CONFIG``).

    Without ``launcher``, ``executable`` is the ``spice-libvirt-hook`` console script; with
    it, ``executable`` is the venv's interpreter, run as ``executable -I -S launcher``, and
    the console script beside it is the fallback when the launcher is missing.
    """
    words = [str(executable)]
    fallback = ""
    if launcher is not None:
        words += [*LAUNCH_OPTIONS, str(launcher)]
        script = executable.parent / "spice-libvirt-hook"
        fallback = f'[ -f {shlex.quote(str(launcher))} ] || exec {shlex.quote(str(script))} "$@"'
    return _shim_lines(words, config, fallback)


def render_default_shim(config: Path | None = None) -> str:
    """The shim :func:`install` writes by default: this venv's interpreter, ``-I -S``, and
    this installation's launcher."""
    return render_shim(Path(sys.executable), config, launcher=default_launcher())


def parse_shim(text: str) -> tuple[Path | None, Path | None]:
    """Return (executable, config) written in one of our shims (None where absent)."""
    target, _launcher, config = parse_shim_full(text)
    return target, config


def parse_shim_full(text: str) -> tuple[Path | None, Path | None, Path | None]:
    """Return (executable, launcher, config) of one of our shims (None where absent)."""
    target: Path | None = None
    launcher: Path | None = None
    config: Path | None = None
    for line in text.splitlines():
        if line.startswith("exec "):
            with contextlib.suppress(ValueError):
                words = shlex.split(line)
                if len(words) >= 2:
                    target = Path(words[1])
                if len(words) >= 5 and tuple(words[2:4]) == LAUNCH_OPTIONS:
                    launcher = Path(words[4])
        elif line.startswith("SPICE_LIBVIRT_CONFIG="):
            with contextlib.suppress(ValueError):
                config = Path(shlex.split(line.partition("=")[2])[0])
    return target, launcher, config


def _paths(hooks_dir: Path) -> tuple[Path, Path]:
    qemu_d = hooks_dir / "qemu.d"
    shim = qemu_d / SHIM_NAME
    if shim.resolve() == (hooks_dir / "qemu").resolve():
        # qemu.d symlinked so that our file would land on hooks/qemu: never write that.
        raise HookError(f"refusing to write {hooks_dir / 'qemu'}: it belongs to another tool")
    return qemu_d, shim


def _is_ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            head = [f.readline() for _ in range(3)]
    except OSError:
        return False
    return any(line.rstrip("\n") == MARKER for line in head)


def status(hooks_dir: Path = DEFAULT_HOOKS_DIR) -> HookStatus:
    """Inspect ``hooks_dir`` without changing anything."""
    qemu_d, shim = _paths(hooks_dir)
    present = shim.is_file()
    ours = present and _is_ours(shim)
    target = launcher = config = None
    if ours:
        target, launcher, config = parse_shim_full(
            shim.read_text(encoding="utf-8", errors="replace")
        )
    others: list[str] = []
    if qemu_d.is_dir():
        others = sorted(p.name for p in qemu_d.iterdir() if p.name != SHIM_NAME)
    return HookStatus(
        hooks_dir=hooks_dir,
        shim_path=shim,
        present=present,
        ours=ours,
        target=target,
        launcher=launcher,
        target_ok=target is not None
        and target.is_file()
        and os.access(target, os.X_OK)
        and (launcher is None or launcher.is_file()),
        config=config,
        foreign_qemu_hook=(hooks_dir / "qemu").exists(),
        other_scripts=others,
        libvirt_version=libvirt_daemon_version(),
    )


def install(
    hooks_dir: Path = DEFAULT_HOOKS_DIR,
    *,
    executable: Path | None = None,
    config: Path | None = None,
) -> InstallResult:
    """Write the shim into ``hooks_dir/qemu.d`` (mode 0755), creating ``qemu.d`` if needed.

    By default the shim runs this venv's interpreter with ``-I -S`` on this installation's
    launcher (see the module docstring); ``executable`` names a ``spice-libvirt-hook``
    console script to exec instead. Idempotent: an identical shim is left alone (``changed`` is False). An older shim of
    ours is replaced; a file of the same name that is not ours is refused.
    """
    launcher = None
    if executable is None:
        exe, launcher = Path(sys.executable), default_launcher()
    else:
        exe = executable
    if not exe.is_absolute():
        raise ConfigError(f"hook executable must be an absolute path: {exe}")
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise ConfigError(
            f"{exe} is not an executable file; install spice-libvirt into this venv first "
            "(pip install spice-libvirt) or pass --executable"
        )
    if config is not None and not config.is_absolute():
        raise ConfigError(f"configuration path must be absolute: {config}")
    qemu_d, shim = _paths(hooks_dir)
    if qemu_d.exists() and not qemu_d.is_dir():
        raise HookError(f"{qemu_d} exists and is not a directory")
    require_trusted(exe, launcher, config, hooks_dir)
    text = render_shim(exe, config, launcher=launcher)
    if shim.exists():
        if not _is_ours(shim):
            raise HookError(f"{shim} exists and was not written by spice-libvirt; not touching it")
        if shim.read_text(encoding="utf-8", errors="replace") == text and os.access(shim, os.X_OK):
            return InstallResult(
                path=shim,
                changed=False,
                message=f"{shim} already installed; {RESTART_HINT} if it is not loaded yet",
            )
    try:
        # qemu.d is libvirt's (0755, root's alone); the shim is written beside the target
        # and renamed (libvirt never sees half a script), 0755 whatever the umask
        ensure_directory(qemu_d, PUBLIC_EXECUTABLE)
        write_file(shim, text, PUBLIC_EXECUTABLE)
    except UnsafePathError as exc:
        raise HookError(f"cannot write {shim}: {exc}") from exc
    return InstallResult(path=shim, changed=True, message=f"installed {shim}; {RESTART_HINT}")


def require_trusted(
    executable: Path, launcher: Path | None, config: Path | None, hooks_dir: Path
) -> None:
    """What libvirtd (root) will run and read through the shim is root's and writable by no
    one else (:mod:`spice_libvirt.trust`): the interpreter (or the console script and the
    interpreter its ``#!`` names), the launcher, this installation's code, the baked-in
    configuration and the hook directory the shim goes into. Raises
    :class:`~spice_libvirt.errors.UnsafePathError` with the first problem."""
    if launcher is None:
        trust.require_runnable_by_root(scripts=[executable], trees=trust.package_trees())
    else:
        trust.require_runnable_by_root(interpreter=executable, trees=trust.package_trees())
        trust.require_root_only(launcher, "launcher")
    if config is not None and config.exists():
        trust.require_root_only(config, "configuration")
    existing = next((d for d in (hooks_dir / "qemu.d", hooks_dir) if d.exists()), None)
    if existing is not None:
        trust.require_root_only(existing, "hook directory")


def trust_problem(status: HookStatus) -> str | None:
    """Why the installed shim makes root run something others can change (None: nothing)."""
    if not status.installed or status.target is None:
        return None
    try:
        if status.launcher is None:
            trust.require_runnable_by_root(scripts=[status.target])
        else:
            trust.require_runnable_by_root(interpreter=status.target)
            trust.require_root_only(status.launcher, "launcher")
            trust.require_root_only_tree(status.launcher.parent.parent)
        trust.require_root_only(status.shim_path, "hook shim")
    except UnsafePathError as exc:
        return str(exc)
    return None


def uninstall(hooks_dir: Path = DEFAULT_HOOKS_DIR) -> InstallResult:
    """Remove our shim (only ours); ``qemu.d`` and everything else stay."""
    _qemu_d, shim = _paths(hooks_dir)
    if not shim.exists():
        return InstallResult(path=shim, changed=False, message=f"{shim} is not installed")
    if not _is_ours(shim):
        raise HookError(f"{shim} was not written by spice-libvirt; not removing it")
    try:
        shim.unlink()
    except OSError as exc:
        raise HookError(f"cannot remove {shim}: {exc.strerror or exc}") from exc
    return InstallResult(
        path=shim, changed=True, message=f"removed {shim}; reload libvirtd (or virtqemud)"
    )
