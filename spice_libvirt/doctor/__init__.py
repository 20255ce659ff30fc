"""``spice-libvirt doctor``: is this hypervisor ready for seamless SPICE migration?

Like ``vdsm-tool is-configured``, for what this project needs on a host: the hook
installed and loaded by the running libvirtd, a valid configuration with ``spice_address``,
every running domain's SPICE reachable by clients, TLS files usable and not about to
expire, migration TLS (the guest's memory encrypted between hosts), libvirt new enough for
``qemu.d/``, the peers' ports reachable, and no SPICE ticket about to land in libvirt's debug
log (:mod:`.daemon_logs`). Modules, one concern each: :mod:`.model` (the typed result),
:mod:`.host` (files on this host), :mod:`.transport` (migration TLS),
:mod:`.daemon` (the running libvirtd, read-only), :mod:`.peers` (other hosts' ports),
:mod:`.trust` (what root runs for us: the shim's and the unit's code, root's only).

Why before a drain: every one of these failures lets a migration start and the client
fall back (or the migration fail) only at the end; the evacuation play runs the doctor
first and stops before touching a guest.
"""

from __future__ import annotations

import os
from pathlib import Path

from spice_libvirt.config import CONFIG_ENV
from spice_libvirt.doctor.access import DaemonAccessError
from spice_libvirt.doctor.daemon import (
    DomainListen,
    check_domains,
    check_version,
    daemon_process,
    local_socket,
    open_read_only,
    running_domains,
)
from spice_libvirt.doctor.daemon_logs import check_monitor_logging
from spice_libvirt.doctor.host import (
    DEFAULT_TLS_DIR,
    check_config,
    check_hook_installed,
    check_hook_seen,
    check_spice_address,
    check_tls,
)
from spice_libvirt.doctor.model import Check, DoctorReport, fail
from spice_libvirt.doctor.peers import check_peer
from spice_libvirt.doctor.transport import check_migration_tls
from spice_libvirt.doctor.trust import check_agent_unit, check_hook_trust
from spice_libvirt.hook import install as hook_install
from spice_libvirt.hook.local import host_addresses

__all__ = ["DEFAULT_TLS_DIR", "INCOMING_ONLY", "Check", "DoctorReport", "diagnose"]

#: Checks that only matter for migrations *into* this host: its hook rewrites the incoming
#: XML to its own ``spice_address``; an outgoing migration runs the destination's hook.
INCOMING_ONLY = frozenset({"spice-address", "hook-installed", "hook-seen"})


def diagnose(
    connect: str = "qemu:///system",
    *,
    hooks_dir: Path = hook_install.DEFAULT_HOOKS_DIR,
    config: Path | None = None,
    peers: tuple[str, ...] = (),
    tls_dir: Path = DEFAULT_TLS_DIR,
    tls_days: int = 30,
    timeout: float = 3.0,
    drain: bool = False,
    agent_unit: Path | None = None,
) -> DoctorReport:
    """Run every check against this host; never raises for what it finds.

    ``drain``: the host is about to be drained, so the :data:`INCOMING_ONLY` checks
    are warnings (still shown, with their fix, for when guests come back). ``agent_unit``:
    the agent's unit file (default: systemd's usual places).
    """
    checks: list[Check] = []
    domains = _ask_daemon(connect, checks)
    status = hook_install.status(hooks_dir)
    if config is None and not os.environ.get(CONFIG_ENV):
        config = status.config  # the file the installed shim points the hook at, if any
    config_check, settings = check_config(config)
    checks.append(config_check)
    checks.append(check_spice_address(settings, host_addresses()))
    checks.append(check_hook_installed(status))
    checks.append(check_hook_seen(status, settings, daemon_process(local_socket(connect))))
    checks.append(check_hook_trust(status))
    checks.append(check_agent_unit(agent_unit))
    if domains is not None:
        checks += check_domains(domains)
    checks += check_tls(tls_dir, tls_days, required=any(d.tls for d in domains or ()))
    checks.append(check_monitor_logging())
    checks.append(check_migration_tls())
    for peer in peers:
        checks += check_peer(peer, timeout)
    if drain:
        checks = [_for_drain(c) for c in checks]
    return DoctorReport.of(os.uname().nodename, connect, checks)


def _ask_daemon(connect: str, checks: list[Check]) -> list[DomainListen] | None:
    """The daemon's version check into ``checks``, and its running domains (None when the
    daemon could not be asked: then the failed ``libvirt`` check says why)."""
    daemon, problem = open_read_only(connect)
    if daemon is None:
        assert problem is not None
        checks.append(problem)
        return None
    try:
        checks.append(check_version(daemon))
        return running_domains(daemon)
    except DaemonAccessError as exc:
        checks.append(fail("libvirt", str(exc), "check libvirtd (journalctl -u libvirtd)"))
        return None
    finally:
        daemon.close()


def _for_drain(check: Check) -> Check:
    if check.name not in INCOMING_ONLY or check.status != "fail":
        return check
    detail = f"{check.detail} (matters for migrations into this host, not for draining it)"
    return check.model_copy(update={"status": "warn", "detail": detail})
