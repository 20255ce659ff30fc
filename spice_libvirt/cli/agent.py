"""``spice-libvirt agent``: the host agent (``run``) and what it is doing (``status``).

``agent run`` is what the systemd unit starts on a hypervisor; it holds every outgoing
migration with SPICE clients until the client linked to the destination, whoever started
the migration (:mod:`spice_libvirt.agent`). ``agent status`` reads the status file the
running agent keeps in its state directory; exit 0 when an agent runs, 1 when none does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from spice_libvirt.agent.settings import (
    DEFAULT_AGENT_CONFIG,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_STATE_DIR,
)
from spice_libvirt.errors import ConfigError
from spice_libvirt.exitcodes import ExitCode


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"agent settings (default {DEFAULT_AGENT_CONFIG}, when it exists)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"hold records and the status file (default {DEFAULT_STATE_DIR})",
    )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "agent",
        help="the host agent: seamless migrations whoever starts them",
        description=(
            "Hold every outgoing migration of a domain with SPICE clients until the client "
            "linked to the destination, taint-free (libvirt's speed and downtime), whoever "
            "started the migration."
        ),
    )
    sub = parser.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run the agent (what the systemd unit starts)")
    _common(run)
    run.add_argument("--connect", metavar="URI", help="the local libvirtd (qemu:///system)")
    run.add_argument(
        "--peer",
        action="append",
        default=None,
        metavar="URI",
        help="a destination libvirtd to subscribe to at start (repeatable)",
    )
    run.add_argument(
        "--destination-uri",
        metavar="TEMPLATE",
        help="URI of a discovered destination, {peer} = its address (qemu+tls://{peer}/system; "
        "opened read-only)",
    )
    run.add_argument("--hold-timeout", type=float, metavar="S", help="bound of every hold (15)")
    run.add_argument("--margin-ms", type=float, metavar="MS", help="release margin (0, measured)")
    run.add_argument(
        "--hold-mode",
        choices=("switchover", "bulk"),
        help="switchover (default): the bulk at the caller's speed, held near its end; "
        "bulk: 1 MiB/s from the start",
    )
    run.add_argument(
        "--journal", type=Path, metavar="FILE", help="journal file (default: the hook's)"
    )
    run.add_argument(
        "--metrics-address",
        metavar="IP:PORT",
        help=f"serve Prometheus metrics here ({DEFAULT_METRICS_ADDRESS}; [IPv6]:PORT; port 0: any)",
    )
    run.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_const",
        const=False,
        default=None,
        help="serve no metrics (as metrics = false in the settings)",
    )
    run.set_defaults(handler=_run)
    unit = sub.add_parser(
        "unit",
        help="print the systemd unit for this installation",
        description=(
            "Print the agent's systemd unit: sandboxed (read-only system, writable only the "
            "state directory and the journal's directory of the settings, bounded "
            "capabilities, no new privileges), ExecStart naming this installation. Refused "
            "(exit 14, nothing printed) when root would run code that someone other than "
            "root can change: the command, its interpreter, the package or a directory above "
            "them not root's, or writable by a group or others."
        ),
    )
    unit.add_argument(
        "--exec",
        dest="exec_path",
        metavar="PATH",
        help="the spice-libvirt command the unit starts (default: this installation's)",
    )
    unit.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"agent settings the unit's agent reads (default {DEFAULT_AGENT_CONFIG}); their "
        "state directory and journal become the unit's only writable paths",
    )
    unit.set_defaults(handler=_unit)
    status = sub.add_parser("status", help="what the running agent is doing")
    _common(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)


def _settings(args: argparse.Namespace) -> Any:
    from spice_libvirt.agent.settings import load_agent_settings

    overrides: dict[str, object] = {"state_dir": args.state_dir}
    for key in (
        "connect",
        "destination_uri",
        "margin_ms",
        "metrics_address",
        "metrics",
        "hold_mode",
    ):
        overrides[key] = getattr(args, key, None)
    overrides["hold_timeout_s"] = getattr(args, "hold_timeout", None)
    overrides["journal_path"] = getattr(args, "journal", None)
    peers = getattr(args, "peer", None)
    overrides["peers"] = tuple(peers) if peers else None
    return load_agent_settings(args.config, overrides)


def _run(args: argparse.Namespace) -> int:
    from spice_libvirt.agent.service import serve

    # a service logs what it does: one line per verdict even without -v
    logging.getLogger("spice_libvirt.agent").setLevel(logging.INFO)
    asyncio.run(serve(_settings(args)))
    return int(ExitCode.OK)


def _exec_argv(exec_path: str | None) -> list[str]:
    """What ExecStart runs: ``exec_path``, or the ``spice-libvirt`` script beside this
    interpreter (as a venv or ``pip install`` puts it), or this interpreter with ``-m``."""
    if exec_path is not None:
        return [exec_path]
    script = Path(sys.executable).parent / "spice-libvirt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "spice_libvirt.cli"]


def _unit_path(path: Path) -> str:
    text = str(path)
    return f'"{text}"' if any(c.isspace() for c in text) else text


def unit_text(
    exec_path: str | None = None,
    *,
    config: Path | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    journal_dir: Path = Path("/var/lib/spice-libvirt"),
) -> str:
    """The packaged unit for this installation: ExecStart runs ``exec_path`` (see
    :func:`_exec_argv`) with ``--config`` when given; the only writable paths are
    ``state_dir`` (systemd's StateDirectory= when it is under /var/lib) and
    ``journal_dir``."""
    from importlib.resources import files

    argv = [*_exec_argv(exec_path), "agent", "run"]
    if config is not None:
        argv += ["--config", str(config)]
    paths: list[str] = []
    writable = [journal_dir]
    if state_dir.is_relative_to("/var/lib"):
        paths += [
            f"StateDirectory={state_dir.relative_to('/var/lib')}",
            "StateDirectoryMode=0700",
        ]
    else:
        writable.append(state_dir)
    # "-": a path that does not exist yet is no reason to refuse to start
    paths.append("ReadWritePaths=" + " ".join(f"-{_unit_path(p)}" for p in writable))
    template = files("spice_libvirt.agent").joinpath("spice-libvirt-agent.service").read_text()
    return template.replace("@EXEC@", " ".join(_unit_path(Path(a)) for a in argv)).replace(
        "@PATHS@", "\n".join(paths)
    )


def _unit(args: argparse.Namespace) -> int:
    from spice_libvirt import trust
    from spice_libvirt.agent.settings import load_agent_settings
    from spice_libvirt.config import load_config

    settings = load_agent_settings(args.config, {})
    journal = settings.journal_path or load_config().journal_path
    argv = _exec_argv(args.exec_path)
    command = Path(argv[0])
    if not command.is_absolute():
        raise ConfigError(f"--exec must be an absolute path: {command}")
    if len(argv) == 1:
        trust.require_runnable_by_root(scripts=[command], trees=trust.package_trees())
    else:
        trust.require_runnable_by_root(interpreter=command, trees=trust.package_trees())
    text = unit_text(
        args.exec_path,
        config=args.config,
        state_dir=settings.state_dir,
        journal_dir=journal.parent,
    )
    print(text, end="")
    return int(ExitCode.OK)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _status(args: argparse.Namespace) -> int:
    from spice_libvirt.agent.record import read_status

    settings = _settings(args)
    data = read_status(settings.state_dir) or {}
    running = _alive(data.get("pid"))
    data["running"] = running
    if args.json:
        print(json.dumps(data, indent=2))
    elif not data.get("pid"):
        print(f"no agent status in {settings.state_dir}")
    else:
        state = "running" if running else "not running"
        print(f"agent pid {data['pid']} {state}, since {data.get('started_at')}")
        print(
            f"  libvirt {data.get('connect')}: {'connected' if data.get('connected') else 'not connected'}"
        )
        print(f"  holding: {', '.join(data.get('holding') or []) or 'nothing'}")
        print(f"  destinations: {', '.join(data.get('destinations') or []) or 'none yet'}")
        metrics = data.get("metrics_address")
        print(f"  metrics: {f'http://{metrics}/metrics' if metrics else 'off'}")
        print(f"  migrations seen: {data.get('seen', 0)}")
        for verdict in data.get("recent") or []:
            print(
                f"    {verdict.get('at', '?')[:19]} {verdict.get('domain')}: {verdict.get('outcome')}"
                f" held {verdict.get('held_ms')} ms ({verdict.get('released_why')})"
            )
    return int(ExitCode.OK if running else ExitCode.FAILURE)
