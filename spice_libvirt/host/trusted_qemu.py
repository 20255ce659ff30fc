"""Which process is a domain's QEMU: libvirt's own record, checked before it is trusted.

The agent reads a QEMU's sockets (its SPICE clients, its migration peer) as root, and acts on
what it finds: which clients to wait for, which destination libvirtd to connect to. The
process must therefore be the one libvirt started, not one that merely *looks* like it (any
local user can start a process whose argv says ``guest=NAME``). So:

* the PID comes from libvirt's pid file for the domain (``/run/libvirt/qemu/NAME.pid``,
  written by libvirtd as root), which must be a regular file owned by root, in a directory
  owned by root, neither writable by anyone else;
* the process must run as the user libvirt gave the domain (the DAC label of the live XML;
  root when there is none), every one of its uids;
* its executable must be the domain's ``<emulator>``, a root-owned file nobody else can
  write, and its command line must name the guest the way libvirt does;
* it must live in the agent's network namespace (the sockets read are that namespace's).

Any check that fails raises :class:`~spice_libvirt.errors.AgentError` naming it; the agent
then holds nothing (never worse than no agent). Parsing is pure (:func:`expected_qemu`);
:func:`trusted_qemu_pid` does the reading.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from spice_libvirt.errors import AgentError
from spice_libvirt.files import change_refusal

#: where the system libvirtd keeps its QEMU pid files
LIBVIRT_QEMU_RUN_DIR = Path("/run/libvirt/qemu")


@dataclasses.dataclass(frozen=True)
class ExpectedQemu:
    """What the domain's QEMU must be, from libvirt's live XML."""

    domain: str
    emulator: str
    uid: int


def _label_uid(label: str) -> int:
    """The user of a DAC label: ``+64055:+64055``, ``libvirt-qemu:kvm`` or ``+0:+0``."""
    user = label.split(":", 1)[0].strip()
    if user.startswith("+") and user[1:].isdigit():
        return int(user[1:])
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError as exc:
        raise AgentError(f"the domain's DAC label names an unknown user {user!r}") from exc


def expected_qemu(domain: str, live_xml: str) -> ExpectedQemu:
    """The emulator and the user libvirt runs ``domain``'s QEMU as (its live XML)."""
    try:
        root = ET.fromstring(live_xml)
    except ET.ParseError as exc:
        raise AgentError(f"the live XML of {domain!r} does not parse: {exc}") from exc
    emulator = (root.findtext("devices/emulator") or "").strip()
    if not emulator:
        raise AgentError(f"the live XML of {domain!r} names no emulator")
    uid = 0
    for seclabel in root.iter("seclabel"):
        if seclabel.get("model") == "dac" and seclabel.get("type") != "none":
            label = seclabel.findtext("label")
            if label:
                uid = _label_uid(label)
            break
    return ExpectedQemu(domain, emulator, uid)


def _private(path: Path, what: str, st: os.stat_result) -> None:
    """Owned by root and writable by nobody else, or the agent does not trust it."""
    reason = change_refusal(path, st)
    if reason is not None:
        raise AgentError(f"{what} {reason}")


def _read_pidfile(run_dir: Path, domain: str) -> int:
    _private(run_dir, "libvirt's run directory", os.stat(run_dir))
    path = run_dir / f"{domain}.pid"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise AgentError(f"no pid file of {domain!r} from libvirt ({path}): {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AgentError(f"{path} is not a regular file")
        _private(path, "the pid file", st)
        text = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if not text.isdigit() or int(text) <= 1:
        raise AgentError(f"{path} holds no PID ({text[:20]!r})")
    return int(text)


def _uids(pid: int, proc: Path) -> list[int]:
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AgentError(f"process {pid} shows no uids")


def _check_process(pid: int, expected: ExpectedQemu, proc: Path, same_netns: bool) -> None:
    where = proc / str(pid)
    uids = _uids(pid, proc)
    if any(uid != expected.uid for uid in uids):
        raise AgentError(
            f"process {pid} runs as uid {'/'.join(map(str, uids))}, not {expected.uid} "
            "(the user libvirt gave the domain)"
        )
    exe = os.readlink(where / "exe")
    # a QEMU whose binary was upgraded under it shows "... (deleted)": still the emulator
    exe = exe.removesuffix(" (deleted)")
    emulator = os.path.realpath(expected.emulator)
    if exe != emulator:
        raise AgentError(f"process {pid} runs {exe}, not the domain's emulator {emulator}")
    _private(Path(emulator), "the emulator", os.stat(emulator))
    argv = (where / "cmdline").read_bytes().split(b"\0")
    wanted = f"guest={expected.domain}".encode()
    if not any(arg == wanted or arg.startswith(wanted + b",") for arg in argv):
        raise AgentError(f"process {pid} does not name guest {expected.domain!r}")
    if same_netns and os.readlink(where / "ns" / "net") != os.readlink(
        proc / "self" / "ns" / "net"
    ):
        raise AgentError(f"process {pid} is not in the agent's network namespace")


def trusted_qemu_pid(
    expected: ExpectedQemu,
    *,
    run_dir: Path = LIBVIRT_QEMU_RUN_DIR,
    proc: Path = Path("/proc"),
    same_netns: bool = True,
) -> int:
    """The PID of the domain's QEMU, from libvirt's pid file and checked (module docstring).

    ``same_netns=False`` for a reader that takes the process's own tables
    (``/proc/PID/net``) and may sit outside its network namespace: the migration controller
    run beside a namespaced libvirtd (the labs), with that libvirtd's ``run_dir``.

    :raise AgentError: no pid file, or a check failed (the message says which)
    """
    pid = _read_pidfile(run_dir, expected.domain)
    try:
        _check_process(pid, expected, proc, same_netns)
    except OSError as exc:
        raise AgentError(f"process {pid} of {expected.domain!r} cannot be checked: {exc}") from exc
    return pid


__all__ = ["LIBVIRT_QEMU_RUN_DIR", "ExpectedQemu", "expected_qemu", "trusted_qemu_pid"]
