"""Checks of what root runs for us: the installed hook shim and the agent's systemd unit.

``hook install`` and ``agent unit`` refuse to point root at code someone else can change
(:mod:`spice_libvirt.trust`), but files change after they were written: a venv chmod-ed, a
unit written by hand, a shim from an older release. These checks ask the same question of
what is installed now.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from spice_libvirt import trust
from spice_libvirt.doctor.model import Check, fail, ok, skip
from spice_libvirt.errors import UnsafePathError
from spice_libvirt.hook import install as hook_install

UNIT_NAME = "spice-libvirt-agent.service"
#: where a unit is looked for when none is named: the admin's, then a package's
UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
)
_FIX = (
    "install spice-libvirt where only root can write (a root-owned venv, mode 0755, or the "
    "Debian package), then run `spice-libvirt {}` again from there"
)


def check_hook_trust(status: hook_install.HookStatus) -> Check:
    name = "hook-trust"
    if not status.installed:
        return skip(name, "hook not installed")
    problem = hook_install.trust_problem(status)
    if problem is not None:
        return fail(name, f"libvirtd (root) would run it: {problem}", _FIX.format("hook install"))
    return ok(name, f"{status.target} and what it runs are root's, writable by root only")


def exec_start(unit_text: str) -> list[str]:
    """The command line of the unit's ``ExecStart=`` (its prefixes ``-@:+!`` dropped)."""
    for line in unit_text.splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == "ExecStart" and value.strip():
            try:
                words = shlex.split(value.strip())
            except ValueError:
                return []
            if words:
                words[0] = words[0].lstrip("-@:+!")
            return words
    return []


def check_agent_unit(unit: Path | None) -> Check:
    """The unit file (``unit``, or the first of :data:`UNIT_DIRS` that has one) and the
    command its ExecStart runs: root's and writable by root only."""
    name = "agent-unit-trust"
    candidates = [unit] if unit is not None else [d / UNIT_NAME for d in UNIT_DIRS]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        return skip(name, f"no agent unit at {', '.join(map(str, candidates))}")
    words = exec_start(found.read_text(errors="replace"))
    if not words or not words[0].startswith("/"):
        fix = _FIX.format("agent unit")
        return fail(name, f"{found}: no ExecStart with an absolute command", fix)
    command = Path(words[0])
    try:
        trust.require_root_only(found, "unit file")
        if "-m" in words[1:2]:
            trust.require_runnable_by_root(interpreter=command)
        else:
            trust.require_runnable_by_root(scripts=[command])
    except UnsafePathError as exc:
        return fail(name, f"systemd (root) would run it: {exc}", _FIX.format("agent unit"))
    return ok(name, f"{found} runs {command}: root's, writable by root only")
