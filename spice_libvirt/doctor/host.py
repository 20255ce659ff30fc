"""Checks of this host's own files: configuration, hook shim, journal evidence, TLS files.

Why these questions: a hook that is installed but not loaded by the running libvirtd, a
configuration the hook refuses (it then fails open, silently for the admin), no
``spice_address`` (incoming migrations are never rewritten), or a SPICE certificate that
expires next week all let a migration *run* and the client fall back to switch-host or
lose the TLS session. None of them shows until the next migration; the doctor shows them
before a drain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from spice_libvirt.config import DEFAULT_CONFIG_FILE, Settings, load_config
from spice_libvirt.doctor.model import Check, fail, ok, skip, warn
from spice_libvirt.errors import ConfigError, HookError
from spice_libvirt.hook import install as hook_install
from spice_libvirt.hook.journal import Journal

#: libvirt's default directory of the SPICE TLS files (``spice_tls_x509_cert_dir``).
DEFAULT_TLS_DIR = Path("/etc/pki/libvirt-spice")
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
#: how far back journal rows count as "libvirtd ran the hook" (rows are bounded anyway)
_JOURNAL_LOOKBACK = 500


def check_config(path: Path | None) -> tuple[Check, Settings | None]:
    """The configuration the hook will read, loaded exactly as the hook loads it."""
    try:
        settings = load_config(path)
    except ConfigError as exc:
        fix = "correct the file (commented example: spice_libvirt/config.example.toml)"
        return fail("config", str(exc), fix), None
    where = str(path or os.environ.get("SPICE_LIBVIRT_CONFIG") or DEFAULT_CONFIG_FILE)
    state = "valid" if os.path.isfile(where) else "absent, all defaults"
    return ok("config", f"{where}: {state}"), settings


def check_spice_address(settings: Settings | None, local: frozenset[str]) -> Check:
    """``spice_address`` set, not loopback, and one of this host's addresses."""
    name = "spice-address"
    if settings is None:
        return skip(name, "configuration invalid")
    addr = settings.spice_address
    fix = 'set spice_address = "<this host\'s address that clients reach>" in config.toml'
    if addr is None:
        return fail(
            name, "spice_address is not set: incoming migrations keep a foreign address", fix
        )
    import ipaddress

    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return ok(name, f"{addr} (a host name; clients must resolve it)")
    if ip.is_loopback or ip.is_unspecified:
        return fail(name, f"{addr} is not an address a client on another machine can reach", fix)
    if local and addr not in local:
        return fail(name, f"{addr} is not an address of this host", fix)
    return ok(name, f"{addr} (an address of this host)")


def check_hook_installed(status: hook_install.HookStatus) -> Check:
    name = "hook-installed"
    fix = f"spice-libvirt hook install --hooks-dir {status.hooks_dir}"
    if not status.installed:
        what = "not ours" if status.present else "missing"
        return fail(name, f"{status.shim_path}: {what}", fix)
    if not status.target_ok:
        return fail(name, f"{status.shim_path} execs {status.target}, which is missing", fix)
    return ok(name, f"{status.shim_path} -> {status.target}")


def check_hook_seen(
    status: hook_install.HookStatus,
    settings: Settings | None,
    daemon: tuple[int, float] | None,
) -> Check:
    """Whether the running libvirtd runs our hook: a journal row written by one of its calls
    since the shim was written, or a daemon that started after it (libvirt looks at its
    hook directories when it starts; a SIGHUP reload is not visible from outside, so that
    case is a warning, not a failure)."""
    name = "hook-seen"
    if not status.installed:
        return skip(name, "hook not installed")
    written = status.shim_path.stat().st_mtime
    if settings is not None:
        try:
            rows = Journal(settings.journal_path).entries(limit=_JOURNAL_LOOKBACK)
        except HookError:
            rows = []
        for row in rows:  # newest first
            if row.source == "libvirt" and row.operation != "self-test" and row.ts >= written:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.ts))
                return ok(name, f"libvirtd ran it at {when} ({row.operation} {row.suboperation})")
    fix = "reload libvirtd (systemctl reload libvirtd, i.e. SIGHUP; guests keep running)"
    if daemon is not None:
        pid, started = daemon
        if started > written:
            return ok(name, f"libvirtd (pid {pid}) started after the hook was written")
        return warn(name, f"libvirtd (pid {pid}) started before the hook was written and has "
                    "not run it since (a reload is not visible from here)", fix)  # fmt: skip
    return warn(name, "no journal row from libvirtd since the hook was written", fix)


def check_tls(tls_dir: Path, days: int, required: bool) -> list[Check]:
    """SPICE TLS files present, readable, and the certificates valid ``days`` from now.

    ``required``: a running domain has a TLS port, so missing files are a failure; else a
    missing directory means "TLS not used here".
    """
    if not tls_dir.is_dir():
        if required:
            return [fail("tls", f"{tls_dir} missing but a domain uses a TLS port",
                         f"install {', '.join(TLS_FILES)} into {tls_dir}")]  # fmt: skip
        return [skip("tls", f"{tls_dir} does not exist (SPICE TLS not configured)")]
    checks = []
    for file in TLS_FILES:
        path = tls_dir / file
        name = f"tls:{file}"
        if not path.is_file():
            checks.append(fail(name, f"{path} missing", f"install {file} into {tls_dir}"))
        elif not os.access(path, os.R_OK):
            checks.append(fail(name, f"{path} not readable", f"chmod/chown {path} for QEMU"))
        elif file.endswith("-cert.pem"):
            checks.append(_expiry(name, path, days))
        else:
            checks.append(ok(name, f"{path} readable"))
    return checks


def _expiry(name: str, path: Path, days: int) -> Check:
    """``openssl x509 -checkend``: the CLI every hypervisor has (no ``cryptography`` here)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return warn(name, f"{path}: expiry not checked (no openssl)", "apt-get install openssl")
    base = [openssl, "x509", "-noout", "-in", str(path)]
    end = subprocess.run(
        [*base, "-enddate"], capture_output=True, text=True, timeout=10, check=False
    )
    if end.returncode != 0:
        return fail(name, f"{path}: not a PEM certificate", f"replace {path}")
    until = end.stdout.strip().partition("=")[2]
    soon = subprocess.run(
        [*base, "-checkend", str(days * 86400)], capture_output=True, timeout=10, check=False
    )
    if soon.returncode != 0:
        return fail(name, f"{path} expires {until} (within {days} days)",
                    f"renew {path} before {until}")  # fmt: skip
    return ok(name, f"{path} valid until {until}")
