"""The host agent in the libvirt lab: one ``spice-libvirt agent run`` inside each host, as a
hypervisor runs it (its own libvirtd at ``qemu:///system``, the other host as its peer).

Its state directory and journal live in the host's own directory of the lab (its
``/var/lib/libvirt``, :data:`AGENT_DIR_INSIDE`), so ``lab status`` and the tests read them
from the root namespace; its log is ``agent.log`` there. Its Prometheus metrics are served
on the host's lab address (:data:`METRICS_PORT`), where a Prometheus inside either host
reaches both agents; ``lab status`` lists that address.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from spice_libvirt.agent.record import read_status
from spice_libvirt.errors import HookError, LabError
from spice_libvirt.hook.journal import Journal
from spice_libvirt_lab import netns
from spice_libvirt_lab.libvirt_state import HOSTS, HostName, LabProcess, LabState

#: The agent's directory in the host's own ``/var/lib/libvirt``, which is ``<state>/lib``
#: (:data:`~spice_libvirt_lab.libvirt_host.BIND_MOUNTS`): the agent runs in the host's mount
#: namespace, where a lab directory under ``/run`` (the default) is hidden by the host's own
#: ``/run``, so it is given the path it sees and the lab reads the same files from outside.
AGENT_DIR_INSIDE = Path("/var/lib/libvirt/spice-libvirt-agent")
#: the agents' metrics port on each host's lab address (the product's default port)
METRICS_PORT = 9474


def agent_dir(state: LabState, host: str) -> Path:
    """The agent's directory as the root namespace sees it."""
    return Path(state.hosts[host].config.state_dir) / "lib" / AGENT_DIR_INSIDE.name


def journal_path(state: LabState, host: str) -> Path:
    return agent_dir(state, host) / "journal.sqlite3"


def log_path(state: LabState, host: str) -> Path:
    return agent_dir(state, host) / "agent.log"


def agent_argv(
    state: LabState, host: str, extra: Sequence[str] = (), *, peers: bool = True
) -> list[str]:
    """``peers``: subscribe to the other host at start (else found from the migration)."""
    others = [h for h in HOSTS if h != host] if peers else []
    argv = [
        sys.executable,
        "-m",
        "spice_libvirt.cli",
        "agent",
        "run",
        "--state-dir",
        str(AGENT_DIR_INSIDE),
        "--journal",
        str(AGENT_DIR_INSIDE / journal_path(state, host).name),
        "--metrics-address",
        f"{state.hosts[host].config.ip}:{METRICS_PORT}",
    ]
    # the lab's libvirtds speak TCP without auth among themselves (a production host's
    # agent uses its TLS default)
    argv += ["--destination-uri", "qemu+tcp://{peer}/system"]
    for other in others:
        argv += ["--peer", f"qemu+tcp://{state.hosts[other].config.hostname}/system"]
    return [*argv, *extra]


def start_agent(
    state: LabState, host: str, extra: Sequence[str] = (), *, peers: bool = True
) -> netns.ProcRef:
    """Start the agent inside ``host``; return once it watches its libvirtd."""
    directory = agent_dir(state, host)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = log_path(state, host)
    mark = log.stat().st_size if log.exists() else 0
    argv = state.host(host).enter_argv(agent_argv(state, host, extra, peers=peers))
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    ref = netns.ProcRef.of(proc.pid, what=f"agent {host}")
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        text = log.read_bytes()[mark:].decode(errors="replace")
        if "agent: watching" in text:
            return ref
        if proc.poll() is not None:
            raise LabError(f"the agent in host {host} exited ({proc.returncode}): {text[-500:]}")
        time.sleep(0.05)
    netns.terminate([ref])
    raise LabError(f"the agent in host {host} did not start in 20 s (log {log})")


@contextlib.contextmanager
def running_agents(
    state: LabState, extra: Sequence[str] = (), *, peers: bool = True
) -> Iterator[dict[str, netns.ProcRef]]:
    """An agent in each host for the block (not recorded in the lab: stopped at its end)."""
    refs: dict[str, netns.ProcRef] = {}
    try:
        for host in HOSTS:
            refs[host] = start_agent(state, host, extra, peers=peers)
        yield refs
    finally:
        netns.terminate([r for r in refs.values() if r.alive()], timeout=15.0)


def verdicts(state: LabState, host: str) -> list[dict[str, Any]]:
    """The agent's verdicts in ``host``'s journal, newest first (none while the journal is
    still being created)."""
    journal = journal_path(state, host)
    try:
        entries = Journal(journal).entries(limit=50) if journal.exists() else []
    except HookError:  # the file is there, its table not yet
        return []
    return [json.loads(e.detail) for e in entries if e.source == "agent"]


def new_verdicts(
    state: LabState, host: str, before: int, count: int = 1, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """The verdicts after the ``before`` ones :func:`verdicts` listed, newest first, once
    there are ``count`` of them (LabError if not within ``timeout``: the agent judges once
    the client left the source, at most 11 s + 6 s after the migration ended)."""
    deadline = time.monotonic() + timeout
    while True:
        found = verdicts(state, host)
        if len(found) >= before + count:
            return found[: len(found) - before]
        if time.monotonic() >= deadline:
            raise LabError(
                f"{len(found) - before} of {count} agent verdicts on host {host} within {timeout} s"
            )
        time.sleep(0.1)


def next_verdict(state: LabState, host: str, before: int, timeout: float = 30.0) -> dict[str, Any]:
    """The newest verdict after the ``before`` ones (:func:`new_verdicts`)."""
    return new_verdicts(state, host, before, 1, timeout)[0]


def start_agents(state: LabState) -> None:
    """An agent in each host, recorded with the lab's per-host daemons (``lab down`` stops
    them by PID, ``lab status`` lists them)."""
    from spice_libvirt_lab import libvirt_daemons

    for host in HOSTS:
        ref = start_agent(state, host)
        process = LabProcess(
            where=host,
            what=ref.what,
            proc=ref,
            log=log_path(state, host),
            address=metrics_address(state, host),
        )
        libvirt_daemons.record(state, process)


def metrics_address(state: LabState, host: str) -> str | None:
    """Where the running agent of ``host`` serves its metrics, as it says (status file)."""
    status = read_status(agent_dir(state, host)) or {}
    address = status.get("metrics_address")
    return address if isinstance(address, str) else None


# ------------------------------------------------------------------ migrations by "someone else"


def domain_states(state: LabState) -> dict[HostName, str | None]:
    """The lab domain's state on each host as libvirt gives it (``virsh domstate --reason``:
    ``running (migrated)``, ``paused (migration)``, ``shut off (destroyed)``...), None where
    the host does not know the domain, asked of both libvirtds: plain ``virsh`` migrations
    move the guest behind the lab's bookkeeping."""
    states: dict[HostName, str | None] = {}
    for host in HOSTS:
        done = subprocess.run(
            ["virsh", "-c", state.hosts[host].uri_unix, "domstate", "--reason", state.domain],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        error = done.stderr.strip()
        if done.returncode == 0:
            states[host] = done.stdout.strip()
        elif "failed to get domain" in error:
            states[host] = None
        else:
            states[host] = f"unknown ({error.splitlines()[0] if error else done.returncode})"
    return states


def where_running(states: dict[HostName, str | None]) -> HostName | None:
    """The host whose state (:func:`domain_states`) is running, if any."""
    for host, text in states.items():
        if text is not None and text.split(" (")[0] == "running":
            return host
    return None


def running_host(state: LabState) -> tuple[HostName, HostName]:
    """(the host the lab domain runs on, the other one); LabError with each host's state
    when it runs on neither."""
    states = domain_states(state)
    host = where_running(states)
    if host is None:
        seen = ", ".join(f"{h}: {text or 'not defined'}" for h, text in states.items())
        raise LabError(f"{state.domain} runs on neither host ({seen})")
    return host, ("B" if host == "A" else "A")


def plain_migrate_argv(state: LabState, src: str, dst: str, extra: Sequence[str] = ()) -> list[str]:
    """A plain ``virsh migrate --live --p2p`` of the lab domain: a caller that is not us."""
    return [
        "virsh", "-c", state.hosts[src].uri_unix, "migrate", "--live", "--p2p", *extra,
        state.domain, f"qemu+tcp://{state.hosts[dst].config.hostname}/system",
    ]  # fmt: skip
