"""Read-only access to the running libvirt daemon, through libvirt-python or ``virsh -r``.

Why two ways: a hypervisor that runs only the hook (and the role's venv, which sees the
distribution's ``python3-libvirt`` only when it is installed) may have no Python bindings,
but every libvirt host has ``virsh``. The doctor asks the same three questions either way:
the daemon's version, the running domains, and each one's live XML.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any, Protocol

#: one virsh call's bound: a daemon that does not answer in this time is a finding
_VIRSH_TIMEOUT_S = 20.0


class DaemonAccessError(Exception):
    """The daemon could not be asked; the message says why, in one line."""


class Daemon(Protocol):
    def version(self) -> tuple[int, int, int]: ...
    def running(self) -> list[tuple[str, str]]: ...
    def close(self) -> None: ...


class _Bindings:
    """libvirt-python, read-only connection."""

    def __init__(self, libvirt: Any, uri: str) -> None:
        self._libvirt = libvirt
        try:
            self._conn = libvirt.openReadOnly(uri)
        except libvirt.libvirtError as exc:
            raise DaemonAccessError(f"{uri}: {exc.get_error_message()}") from exc

    def version(self) -> tuple[int, int, int]:
        try:
            n = int(self._conn.getLibVersion())
        except self._libvirt.libvirtError as exc:
            raise DaemonAccessError(f"version: {exc.get_error_message()}") from exc
        return n // 1_000_000, n // 1000 % 1000, n % 1000

    def running(self) -> list[tuple[str, str]]:
        flag = self._libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        try:
            return [(d.name(), d.XMLDesc(0)) for d in self._conn.listAllDomains(flag)]
        except self._libvirt.libvirtError as exc:  # e.g. a domain that stopped meanwhile
            raise DaemonAccessError(f"domains: {exc.get_error_message()}") from exc

    def close(self) -> None:
        self._conn.close()


class _Virsh:
    """``virsh --readonly --connect URI``, one process per question."""

    def __init__(self, virsh: str, uri: str) -> None:
        self._argv = [virsh, "--readonly", "--quiet", "--connect", uri]
        self._uri = uri

    def _run(self, *args: str) -> str:
        try:
            proc = subprocess.run(
                [*self._argv, *args], capture_output=True, text=True,
                timeout=_VIRSH_TIMEOUT_S, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise DaemonAccessError(f"{self._uri}: virsh {args[0]} timed out") from exc
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            raise DaemonAccessError(f"{self._uri}: {last.removeprefix('error: ')}")
        return proc.stdout

    def version(self) -> tuple[int, int, int]:
        for line in self._run("version", "--daemon").splitlines():
            if line.startswith("Running against daemon:"):
                parts = line.rpartition(":")[2].strip().split(".")
                numbers = [int(p) for p in parts[:3]] + [0, 0]
                return numbers[0], numbers[1], numbers[2]
        raise DaemonAccessError(f"{self._uri}: virsh did not say the daemon's version")

    def running(self) -> list[tuple[str, str]]:
        names = [n for n in self._run("list", "--name").splitlines() if n.strip()]
        return [(n, self._run("dumpxml", n)) for n in names]

    def close(self) -> None:
        return None


def open_daemon(uri: str) -> Daemon:
    """The bindings when installed, else ``virsh``; :class:`DaemonAccessError` if neither
    can reach the daemon (the message names the fix when neither is installed)."""
    try:
        import libvirt
    except ImportError:
        virsh = shutil.which("virsh")
        if virsh is None:
            raise DaemonAccessError(
                "neither libvirt-python nor virsh is installed (apt-get install libvirt-clients)"
            ) from None
        return _Virsh(virsh, uri)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no C-level stderr noise
    return _Bindings(libvirt, uri)
