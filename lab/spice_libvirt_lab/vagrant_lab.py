"""The Vagrant lab: two real hypervisor VMs (hv1, hv2) provisioned by the project's own role.

``lab up --vagrant`` does what an admin does with real hosts, on VMs:

1. the box (:mod:`spice_libvirt_lab.vagrant_box`: built once from Debian packages);
2. a private libvirtd for vagrant-libvirt (:mod:`spice_libvirt_lab.vagrant_libvirtd`), with a
   storage pool in the lab directory and one isolated network whose DHCP reserves each VM's
   address by MAC (the Vagrantfile sets the MACs), so every address is known in advance;
3. ``vagrant up --no-provision`` of both (in parallel), then provisioning over ssh once both
   are up: provisioning "from the last machine" while the others still boot races;
4. ``ansible-playbook ansible/lab.yml`` over ssh with an inventory written from
   ``vagrant ssh-config`` (Vagrant replaced the box's insecure key), installing the project
   on hv1 from a wheelhouse built here (no package index on the hosts) and on hv2 from the
   Debian package of this tree (:mod:`spice_libvirt_lab.deb`, built while the VMs boot),
   hv1's agent reaching hv2 over qemu+ssh and hv2's hv1 over qemu+tls (the lab's PKI and
   root key, :func:`write_secrets`);
5. the firmware guest (SeaBIOS, qxl, SPICE) defined and started on hv1 through libvirt's TCP
   listener, SPICE on hv1's lab address, reachable from this machine.

The VMs run under TCG here: this machine's KVM is nested, and a nested KVM boots a Linux
kernel about 100 times too slowly (:func:`choose_driver`). The inner guest then runs under
TCG inside TCG; it needs no kernel, so it starts in seconds. ``lab migrate`` lives in
:mod:`spice_libvirt_lab.vagrant_migrate`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from spice_libvirt.errors import LabError
from spice_libvirt_lab import deb, labdir, netns, ssh_masters, vagrant_box
from spice_libvirt_lab.libvirt_domain import render_domain_xml
from spice_libvirt_lab.vagrant_libvirtd import NICE_ARGV, PrivateLibvirtd
from spice_libvirt_lab.vagrant_state import (
    HOST_IPS,
    HOST_MACS,
    HOSTS,
    NETWORK_CIDR,
    NETWORK_GATEWAY,
    VagrantLabState,
    load_state,
    parse_ssh_config,
    write_access_files,
)

VAGRANT_SUBDIR = "vagrant"
REPO = vagrant_box.REPO_VAGRANT_DIR.parent
ANSIBLE_DIR = REPO / "ansible"
DRIVER_ENV = "SPICE_LIBVIRT_VAGRANT_DRIVER"
#: the inner guest's accelerator on the hypervisor VMs (``qemu`` = TCG, or ``kvm``)
INNER_ACCEL_ENV = "SPICE_LIBVIRT_VAGRANT_INNER_ACCEL"
NETWORK_NAME = "spice-lab"
POOL_NAME = "spice-lab-pool"
UP_TIMEOUT_S = 1200.0
PROVISION_TIMEOUT_S = 1200.0


def vagrant_lab_dir(base: Path | None = None) -> Path:
    return ((base or labdir.default_lab_dir()) / VAGRANT_SUBDIR).absolute()


def choose_driver() -> str:
    """``kvm`` where this machine has a usable KVM of its own, else ``qemu`` (TCG).

    ``$SPICE_LIBVIRT_VAGRANT_DRIVER`` decides when set. A machine that is itself a VM (the
    ``hypervisor`` CPU flag) only has a nested KVM, under which Linux guests boot far slower
    than under TCG (measured here: ~100x), so it gets TCG.
    """
    forced = os.environ.get(DRIVER_ENV, "").strip()
    if forced:
        if forced not in ("kvm", "qemu"):
            raise LabError(f"${DRIVER_ENV} must be 'kvm' or 'qemu', not {forced!r}")
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "qemu"
    with contextlib.suppress(OSError):
        flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        if flags and "hypervisor" in flags.group(1).split():
            return "qemu"
    return "kvm"


def _network_xml() -> str:
    hosts = "".join(f"<host mac='{HOST_MACS[h]}' ip='{HOST_IPS[h]}' name='{h}'/>" for h in HOSTS)
    return (
        f"<network><name>{NETWORK_NAME}</name><forward mode='none'/>"
        f"<ip address='{NETWORK_GATEWAY}' netmask='255.255.255.0'><dhcp>"
        "<range start='192.168.150.100' end='192.168.150.200'/>"
        f"{hosts}</dhcp></ip></network>"
    )


def vagrant_env(state: VagrantLabState) -> dict[str, str]:
    """The environment of every ``vagrant`` call: project, private dirs, the lab's choices."""
    if state.libvirtd is None or state.box is None:
        raise LabError("the Vagrant lab has no libvirtd or box yet")
    return vagrant_box.vagrant_env(
        {
            "VAGRANT_CWD": str(vagrant_box.REPO_VAGRANT_DIR),
            "VAGRANT_DOTFILE_PATH": str(state.directory / "dot-vagrant"),
            "SPICE_LIBVIRT_VAGRANT_LIBVIRT_URI": state.libvirtd.uri,
            "SPICE_LIBVIRT_VAGRANT_DRIVER": state.driver,
            "SPICE_LIBVIRT_VAGRANT_BOX": state.box.name,
            "SPICE_LIBVIRT_VAGRANT_POOL": state.pool,
            "SPICE_LIBVIRT_VAGRANT_NETWORK": state.network,
            "SPICE_LIBVIRT_VAGRANT_SERIAL_DIR": str(state.directory / "serial"),
        }
    )


def run_logged(
    argv: list[str], state: VagrantLabState, *, timeout: float, what: str, **kw: object
) -> str:
    """Run a stage's command, stderr streamed into ``lab.log`` and stdout into
    ``last-command.out`` (follow them while a TCG VM boots), stdout appended to the log
    afterwards; its stdout, or :class:`LabError` with the log's tail."""
    log = state.directory / "lab.log"
    out_file = state.directory / "last-command.out"
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
    with open(out_file, "w") as stdout, open(log, "a") as stderr:
        # a session of its own: on a timeout or an interruption the whole group goes (vagrant's
        # and ansible's children included), never only the command itself
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            **kw,  # type: ignore[call-overload]
        )
        try:
            proc.wait(timeout=timeout)
        except BaseException as exc:
            _end_group(proc)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise LabError(f"{what}: timed out after {timeout:.0f} s (see {log})") from exc
            raise
    text = out_file.read_text(errors="replace")
    out_file.unlink()
    with open(log, "a") as out:
        out.write(text)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise LabError(f"{what} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return text


def _end_group(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL to what is left after ``grace``."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


def _network_in_use() -> bool:
    out = subprocess.run(
        ["ip", "-4", "route", "show", "to", "match", NETWORK_GATEWAY],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return NETWORK_CIDR in out


def up(base: Path | None = None) -> VagrantLabState:
    """Bring the lab up (see the module docstring); on any failure, tear down what was made."""
    directory = labdir.ensure_private_dir(vagrant_lab_dir(base))
    old = load_state(directory)
    if old is not None and old.phase != "down":
        raise LabError(f"a Vagrant lab is already in {directory}: 'lab down' first")
    if _network_in_use():
        raise LabError(f"{NETWORK_CIDR} is already routed here: another Vagrant lab is up?")
    for tool in ("vagrant", "virsh", "ssh"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found (apt-get install vagrant vagrant-libvirt ...)")
    for stale in (
        "dot-vagrant", "libvirt", "pool", "serial", "wheelhouse", "ansible-home", "pki",
        "root-ssh", "cp",
    ):  # fmt: skip
        if (directory / stale).exists():
            labdir.remove_inside(directory, directory / stale)
    (directory / "serial").mkdir()
    state = VagrantLabState(directory=directory, driver=choose_driver())
    state.save()
    try:
        _bring_up(state)
    except BaseException:
        with contextlib.suppress(Exception):
            down(base)
        raise
    return state


def _timed(state: VagrantLabState, stage: str, t0: float) -> None:
    state.timings[stage] = round(time.monotonic() - t0, 1)
    state.save()


def _bring_up(state: VagrantLabState) -> None:
    t0 = time.monotonic()
    state.box = vagrant_box.ensure_box(state.directory / "box.log")
    state.timings["box_build"] = state.box.build_s
    _timed(state, "box", t0)

    t0 = time.monotonic()
    state.libvirtd = PrivateLibvirtd(state_dir=state.directory / "libvirt")
    state.libvirtd.prepare()
    state.save()
    state.libvirtd.start()
    state.save()
    pool_dir = state.directory / "pool"
    pool_dir.mkdir()
    state.pool, state.network = POOL_NAME, NETWORK_NAME
    state.libvirtd.virsh("pool-define-as", POOL_NAME, "dir", "--target", str(pool_dir))
    state.libvirtd.virsh("pool-start", POOL_NAME)
    net_xml = state.directory / "network.xml"
    net_xml.write_text(_network_xml())
    state.libvirtd.virsh("net-define", str(net_xml))
    state.libvirtd.virsh("net-start", NETWORK_NAME)
    _timed(state, "libvirtd", t0)

    t0 = time.monotonic()
    env = vagrant_env(state)
    # hv2's Debian package is built (or found in the cache) while the VMs boot
    with ThreadPoolExecutor(max_workers=1) as pool:
        package = pool.submit(deb.ensure_deb, state.directory / "deb.log", _find_links())
        run_logged(
            [*NICE_ARGV, "vagrant", "up", "--no-provision", "--provider", "libvirt", *HOSTS],
            state,
            timeout=UP_TIMEOUT_S,
            what="vagrant up",
            env=env,
        )
        _timed(state, "up", t0)
        state.deb = package.result()
    _timed(state, "up+deb", t0)
    write_secrets(state)

    ssh_text = run_logged(
        ["vagrant", "ssh-config", *HOSTS], state, timeout=120, what="vagrant ssh-config", env=env
    )
    state.hosts = parse_ssh_config(ssh_text)
    missing = [h for h in HOSTS if h not in state.hosts]
    if missing:
        raise LabError(f"vagrant ssh-config says nothing about {missing}")
    write_access_files(state)
    state.save()

    t0 = time.monotonic()
    provision(state)
    _timed(state, "provision", t0)

    t0 = time.monotonic()
    define_guest(state)
    _timed(state, "guest", t0)
    state.phase = "up"
    state.save()


def _find_links() -> Path | None:
    """The wheel cache the Ansible tests fill (same key), so the controller needs no index."""
    import hashlib

    constraints = ANSIBLE_DIR / "roles" / "spice_libvirt" / "files" / "constraints.txt"
    digest = hashlib.sha256(constraints.read_bytes()).hexdigest()[:12]
    cache = vagrant_box.cache_root() / f"ansible-find-links-{digest}"
    return cache if (cache / "COMPLETE").is_file() else None


def provision(state: VagrantLabState) -> None:
    """``lab.yml`` over ssh against both hosts, the project from a wheelhouse built here."""
    import json

    extra: dict[str, object] = {
        "spice_libvirt_apt_update_cache": False,
        "spice_libvirt_wheelhouse_dir": str(state.directory / "wheelhouse"),
    }
    links = _find_links()
    if links is not None:
        extra["spice_libvirt_wheelhouse_pip_args"] = ["--no-index", "--find-links", str(links)]
    extra_file = state.directory / "extra-vars.json"
    extra_file.write_text(json.dumps(extra))
    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env.update(
        {
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
            "ANSIBLE_HOME": str(state.directory / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(state.directory / "ansible-home" / "tmp"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_TIMEOUT": "60",
            "PATH": f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}",
        }
    )
    playbook = bindir / "ansible-playbook"
    if not playbook.exists():
        raise LabError(f"{playbook} not found: pip install ansible-core")
    try:
        run_logged(
            [*NICE_ARGV, str(playbook), "-i", str(state.inventory), "-e", f"@{extra_file}",
             "lab.yml"],
            state,
            timeout=PROVISION_TIMEOUT_S,
            what="ansible-playbook lab.yml",
            env=env,
            cwd=str(ANSIBLE_DIR),
        )  # fmt: skip
    finally:
        # the playbook's ssh masters detach from its process group: nothing else ends them
        ssh_masters.end_masters(state.control_dir)


def write_secrets(state: VagrantLabState) -> None:
    """The lab's libvirt PKI (a CA; per host a certificate good for server and client, its
    name and lab address in it) and root's ssh key for the hosts, in the lab directory
    (0700): lab.yml installs them so that each host agent reaches its peer over qemu+tls
    or qemu+ssh."""
    from spice_libvirt_lab.tls import create_ca, issue_server_certificate

    ca_dir = state.directory / "pki" / "ca"
    create_ca(ca_dir, organization="spice-libvirt lab")
    for host in HOSTS:
        issue_server_certificate(
            state.pki_dir(host), ca_dir=ca_dir, common_name=host,
            hosts=[host, HOST_IPS[host]], organization="spice-libvirt lab", client_too=True,
        )  # fmt: skip
    key = state.root_ssh_key
    key.parent.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "spice-libvirt-lab", "-f", str(key)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def guest_xml(state: VagrantLabState) -> str:
    """The firmware guest for a hypervisor VM: TCG unless told (the VM has no usable KVM)."""
    xml = render_domain_xml(name=state.domain, memory_mib=64)
    accel = os.environ.get(INNER_ACCEL_ENV, "qemu")
    if accel not in ("qemu", "kvm"):
        raise LabError(f"${INNER_ACCEL_ENV} must be 'qemu' or 'kvm', not {accel!r}")
    return re.sub(r"<domain type='\w+'>", f"<domain type='{accel}'>", xml, count=1)


def define_guest(state: VagrantLabState) -> None:
    """Define and start the guest on hv1 through libvirtd's TCP listener on the lab network.

    Meanwhile hv2's libvirtd probes its QEMU (a libvirtd does that on first use, and under
    TCG it takes tens of seconds): without it, the first migration's figures would include
    the destination's probe.
    """
    from concurrent.futures import ThreadPoolExecutor

    from spice_libvirt_lab.libvirt_host import call_with_timeout, require_libvirt

    lv = require_libvirt()

    def on(host: str, what: str, action: Callable[[Any], object], timeout: float) -> None:
        conn = call_with_timeout(lambda: lv.open(state.tcp_uri(host)), 60.0, f"connect {host}")
        try:
            call_with_timeout(lambda: action(conn), timeout, f"{what} on {host}")
        finally:
            conn.close()

    def start(conn: Any) -> object:
        return conn.defineXML(guest_xml(state)).create()

    def probe(conn: Any) -> object:
        return conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0)

    with ThreadPoolExecutor(max_workers=2) as pool:
        started = pool.submit(on, "hv1", "define and start the guest", start, 180.0)
        probed = pool.submit(on, "hv2", "QEMU capabilities", probe, 300.0)
        started.result()
        probed.result()
    state.location = "hv1"


class DownReport(BaseModel):
    removed: list[str] = Field(default_factory=list)
    leftovers: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)


def down(base: Path | None = None) -> DownReport:
    """``vagrant destroy``, then everything left in the private libvirtd, then the daemon.

    Whatever ``vagrant destroy`` missed (the box volume stays in the pool by design, a VM of a
    half-finished ``up``) is removed through the private libvirtd, which serves this lab only.
    """
    directory = vagrant_lab_dir(base)
    state = load_state(directory)
    report = DownReport()
    if state is None:
        return report
    t0 = time.monotonic()
    # an admin's playbook run against the lab's inventory (evacuate.yml) leaves masters too
    report.removed += [f"ssh master {pid}" for pid in ssh_masters.end_masters(state.control_dir)]
    if state.libvirtd is not None and state.libvirtd.alive() and state.box is not None:
        with contextlib.suppress(LabError):
            run_logged(
                [*NICE_ARGV, "vagrant", "destroy", "--force", *HOSTS],
                state,
                timeout=300,
                what="vagrant destroy",
                env=vagrant_env(state),
            )
            report.removed += [f"vm {h}" for h in HOSTS]
    if state.libvirtd is not None:
        if state.libvirtd.alive():
            report.removed += state.libvirtd.remove_everything()
        state.libvirtd.stop()
        report.removed.append("libvirtd")
        report.removed += state.libvirtd.remove_firewall_chains()
    # a VM's QEMU that outlived its libvirtd (a crash): ours, as its disk is in the lab
    strays = _processes_naming(directory)
    if strays:
        netns.terminate(strays, timeout=10.0)
        report.removed += [f"stray process {pid}" for pid in strays]
    for sub in ("pool", "dot-vagrant", "wheelhouse", "ansible-home", "pki", "root-ssh", "cp"):
        if (directory / sub).exists():
            labdir.remove_inside(directory, directory / sub)
    report.timings["down"] = round(time.monotonic() - t0, 1)
    state.phase = "down"
    state.timings.update(report.timings)
    state.save()
    report.leftovers = leftovers(state)
    return report


def _processes_naming(directory: Path) -> list[int]:
    """PIDs of the processes whose command line names the lab directory (not this one)."""
    marker = str(directory).encode()
    pids: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            # a process started with the lab directory as a plain argument (a pytest run,
            # this CLI's --dir) is a caller, not a VM: only paths inside it count
            if marker + b"/" in cmdline and b"qemu" in cmdline.split(b"\0")[0]:
                pids.append(int(proc.name))
    return pids


def leftovers(state: VagrantLabState) -> list[str]:
    """What of this lab still exists: daemons, QEMUs of our VMs, the network, the disks."""
    found: list[str] = []
    if state.libvirtd is not None:
        for ref in (state.libvirtd.libvirtd, state.libvirtd.virtlogd):
            if ref is not None and ref.alive():
                found.append(f"process {ref.pid} ({ref.what})")
    found += [f"process {pid}" for pid in _processes_naming(state.directory)]
    found += [f"ssh master {pid}" for pid in ssh_masters.masters(state.control_dir)]
    if _network_in_use():
        found.append(f"a route to {NETWORK_CIDR} (the lab network's bridge)")
    if (state.directory / "pool").exists():
        found.append(f"{state.directory / 'pool'}")
    return found
