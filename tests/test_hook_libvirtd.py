"""The hook inside real, private libvirtd instances.

Each simulated host is a network namespace plus a private mount and UTS namespace in which
``/etc/libvirt``, ``/run``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and
``/var/cache/libvirt`` are bind mounts of a per-test directory (all of ``/run``, because a
``/run/libvirt`` mount point would have to be created in the shared ``/run``); its own virtlogd and libvirtd
run there (the root namespace's libvirtd is not used). The hook is installed into the private
``/etc/libvirt/hooks/qemu.d`` *before* libvirtd starts (libvirt reads hooks at start-up), with
the host's configuration file baked into the shim, so that two hosts on one file system can
have different SPICE addresses and journals.

Everything started here is stopped by PID; the namespaces are deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spice_libvirt.hook import install as hook_install
from spice_libvirt.hook.journal import Journal, JournalEntry

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

VENV_HOOK = hook_install.default_hook_executable()


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, bind mounts)"
    for tool in ("libvirtd", "virtlogd", "virsh", "ip", "unshare", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm not usable"
    if not VENV_HOOK.exists():
        return f"{VENV_HOOK} missing: pip install -e . into the venv"
    return None


if (_why := _missing()) is not None:
    pytestmark.append(pytest.mark.skip(reason=_why))


def _run(cmd: list[str], timeout: float = 60, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed rc={proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: the daemons are not our children (they daemonised)."""
    if not _pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@dataclass
class Host:
    """One simulated hypervisor: netns + private mount/UTS namespace + virtlogd + libvirtd."""

    name: str
    state: Path
    netns: str
    address: str
    peers: dict[str, str]
    libvirtd_pid: int | None = None
    virtlogd_pid: int | None = None
    listen_tcp: bool = False
    journal_path: Path = field(init=False)
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.journal_path = self.state / "journal.sqlite3"
        self.config_path = self.state / "spice-libvirt.toml"

    @property
    def socket(self) -> Path:
        return self.state / "run" / "libvirt" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    def virsh(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return _run(["virsh", "-c", self.uri, *args], timeout=timeout, check=check)

    def prepare(self, *, spice_address: str, listen_tcp: bool, install_hook: bool = True) -> None:
        s = self.state
        self.listen_tcp = listen_tcp
        for sub in ("run/libvirt", "run/lock", "lib/qemu", "log/qemu", "cache/qemu"):
            (s / sub).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", s / "etc", symlinks=True)
        for link in (s / "etc/qemu/networks/autostart").glob("*"):
            link.unlink()
        for old in ("qemu", "qemu.d"):
            p = s / "etc/hooks" / old
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        tcp = (
            f'listen_tcp = 1\nlisten_addr = "{self.address}"\nauth_tcp = "none"\n'
            if listen_tcp
            else "listen_tcp = 0\n"
        )
        (s / "etc/libvirtd.conf").write_text(
            "listen_tls = 0\n"
            + tcp
            + 'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            + f'host_uuid = "{uuid.uuid4()}"\n'
            + 'log_filters = "1:qemu.qemu_migration 2:qemu 3:*"\n'
            + 'log_outputs = "1:file:/var/log/libvirt/libvirtd.log"\n'
        )
        (s / "etc/qemu.conf").write_text(
            'user = "+0"\ngroup = "+0"\n'
            f'spice_listen = "{self.address}"\n'
            + (f'migration_address = "{self.address}"\n' if listen_tcp else "")
        )
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in self.peers.items())
        (s / "hosts").write_text(hosts)
        self.config_path.write_text(
            f'spice_address = "{spice_address}"\njournal_path = "{self.journal_path}"\n'
        )
        if install_hook:
            self.install_hook()

    def install_hook(self) -> None:
        res = hook_install.install(self.state / "etc/hooks", config=self.config_path)
        assert res.changed

    def start(self) -> None:
        s = self.state
        script = f"""
set -e
hostname {self.name}
mount --bind {s}/etc /etc/libvirt
mount --bind {s}/run /run
mount --bind {s}/lib /var/lib/libvirt
mount --bind {s}/log /var/log/libvirt
mount --bind {s}/cache /var/cache/libvirt
mount --bind {s}/hosts /etc/hosts
virtlogd -d -p /run/libvirt/virtlogd.pid
libvirtd -d {"-l" if self.listen_tcp else ""} -p /run/libvirt/libvirtd.pid
"""
        _run(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
            ],
            timeout=30,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.socket.exists() and (s / "run/libvirt/libvirtd.pid").exists():
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"libvirtd of {self.name} did not come up")
        self.virtlogd_pid = int((s / "run/libvirt/virtlogd.pid").read_text())
        self.libvirtd_pid = int((s / "run/libvirt/libvirtd.pid").read_text())

    def stop(self) -> None:
        if self.libvirtd_pid is not None and _pid_alive(self.libvirtd_pid):
            for dom in self.virsh("list", "--name", timeout=20, check=False).split():
                self.virsh("destroy", dom, timeout=30, check=False)
        for pid in (self.libvirtd_pid, self.virtlogd_pid):
            if pid is not None:
                _stop_pid(pid)

    def restart(self) -> None:
        """Stop both daemons (their namespaces die with them) and start them afresh."""
        self.stop()
        self.start()

    def journal(self, domain: str | None = None) -> list[JournalEntry]:
        return list(reversed(Journal(self.journal_path).entries(limit=None, domain=domain)))


def _domain_xml(name: str, listen_address: str | None) -> str:
    listen = (
        f"<listen type='address' address='{listen_address}'/>"
        if listen_address
        else "<listen type='address'/>"
    )
    return f"""<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <graphics type='spice' autoport='yes'>{listen}</graphics>
    <video><model type='qxl'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Host]]:
    """Two hosts ``hostA``/``hostB`` in two network namespaces joined by one veth pair."""
    tag = uuid.uuid4().hex[:8]
    addrs = {"hostA": "10.253.0.1", "hostB": "10.253.0.2"}
    hosts = {
        n: Host(
            name=n,
            state=tmp_path / n,
            netns=f"h4{n[-1].lower()}-{tag}",
            address=a,
            peers=addrs,
        )
        for n, a in addrs.items()
    }
    created: list[str] = []
    try:
        for h in hosts.values():
            _run(["ip", "netns", "add", h.netns])
            created.append(h.netns)
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        a, b = hosts["hostA"], hosts["hostB"]
        _run(
            ["ip", "-n", a.netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
             "netns", b.netns]
        )  # fmt: skip
        for h in hosts.values():
            _run(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0"])
            _run(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
        for h in hosts.values():
            h.prepare(spice_address=h.address, listen_tcp=True)
            h.start()
        yield hosts
    finally:
        for h in hosts.values():
            try:
                h.stop()
            except Exception as exc:
                print(f"teardown of {h.name}: {exc}")
        for ns in created:
            _run(["ip", "netns", "del", ns], check=False)


def _ops(entries: list[JournalEntry]) -> list[tuple[str, str]]:
    return [(e.operation, e.suboperation) for e in entries]


def test_start_and_destroy_are_journaled_with_name_and_uuid(lab: dict[str, Host]) -> None:
    a = lab["hostA"]
    xml = a.state / "dom.xml"
    xml.write_text(_domain_xml("h4vm", None))
    a.virsh("define", str(xml))
    dom_uuid = a.virsh("domuuid", "h4vm").strip()
    a.virsh("start", "h4vm", timeout=120)
    entries = a.journal("h4vm")
    assert _ops(entries)[:3] == [("prepare", "begin"), ("start", "begin"), ("started", "begin")]
    for e in entries[:3]:
        assert e.source == "libvirt"
        assert e.object == "h4vm"
        assert e.domain == "h4vm"
        assert e.uuid == dom_uuid
        assert e.outcome == "ok"
        assert e.duration_ms is not None
        assert e.duration_ms < 2000
    a.virsh("destroy", "h4vm", timeout=60)
    ops = _ops(a.journal("h4vm"))
    assert ("stopped", "end") in ops
    assert ("release", "end") in ops
    # No hook changed this domain's XML, so libvirt did not mark it as tainted.
    log = (a.state / "log/qemu/h4vm.log").read_text(errors="replace")
    assert "hook-script" not in log


def test_migration_destination_rewrites_spice_listen(lab: dict[str, Host]) -> None:
    """A guest pinned to the source's address can only start on B because the hook fixes it."""
    a, b = lab["hostA"], lab["hostB"]
    xml = a.state / "dom.xml"
    xml.write_text(_domain_xml("h4mig", a.address))
    a.virsh("define", str(xml))
    dom_uuid = a.virsh("domuuid", "h4mig").strip()
    a.virsh("start", "h4mig", timeout=120)
    src_xml = ET.fromstring(a.virsh("dumpxml", "h4mig"))
    assert src_xml.find("./devices/graphics/listen").get("address") == a.address  # type: ignore[union-attr]

    t0 = time.monotonic()
    a.virsh(
        "migrate",
        "--live",
        "--p2p",
        "h4mig",
        f"qemu+tcp://{b.address}/system",
        timeout=180,
    )
    elapsed = time.monotonic() - t0
    print(f"migration took {elapsed:.2f} s")

    entries = b.journal("h4mig")
    mig = [e for e in entries if (e.operation, e.suboperation) == ("migrate", "begin")]
    assert len(mig) == 1
    assert mig[0].outcome == "rewritten"
    assert mig[0].uuid == dom_uuid
    assert f"{a.address} -> {b.address}" in mig[0].detail
    assert mig[0].duration_ms is not None
    assert mig[0].duration_ms < 2000
    after = _ops(entries)[_ops(entries).index(("migrate", "begin")) :]
    assert after[:4] == [
        ("migrate", "begin"),
        ("prepare", "begin"),
        ("start", "begin"),
        ("started", "begin"),
    ]

    dst = ET.fromstring(b.virsh("dumpxml", "h4mig"))
    graphics = dst.find("./devices/graphics")
    assert graphics is not None
    assert graphics.get("listen") == b.address
    listen = graphics.find("listen")
    assert listen is not None
    assert listen.get("address") == b.address
    assert b.virsh("domstate", "h4mig").strip() == "running"
    # libvirt taints a domain whose XML a hook replaced: proof that ours did it.
    assert "hook-script" in (b.state / "log/qemu/h4mig.log").read_text(errors="replace")

    # The source saw no migrate hook of its own, only the stop of its QEMU afterwards.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ("release", "end") not in _ops(a.journal("h4mig")):
        time.sleep(0.2)
    src_ops = _ops(a.journal("h4mig"))
    assert ("migrate", "begin") not in src_ops
    assert ("release", "end") in src_ops


@pytest.fixture
def single(tmp_path: Path) -> Iterator[Host]:
    """One host in a network namespace of its own (loopback only); hook NOT installed yet."""
    h = Host(
        name="hostS",
        state=tmp_path / "hostS",
        netns=f"h4s-{uuid.uuid4().hex[:8]}",
        address="127.0.0.1",
        peers={},
    )
    created = False
    try:
        _run(["ip", "netns", "add", h.netns])
        created = True
        _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        h.prepare(spice_address="127.0.0.1", listen_tcp=False, install_hook=False)
        yield h
    finally:
        try:
            h.stop()
        finally:
            if created:
                _run(["ip", "netns", "del", h.netns], check=False)


def test_hook_is_loaded_only_after_a_libvirtd_restart(single: Host) -> None:
    """Why ``hook install`` says to restart libvirtd: a hook added later is not called."""
    h = single
    h.start()
    h.install_hook()
    xml = h.state / "dom.xml"
    xml.write_text(_domain_xml("h4late", None))
    h.virsh("define", str(xml))
    h.virsh("start", "h4late")
    h.virsh("destroy", "h4late")
    assert h.journal() == []
    h.restart()
    h.virsh("start", "h4late")
    assert _ops(h.journal("h4late"))[:3] == [
        ("prepare", "begin"),
        ("start", "begin"),
        ("started", "begin"),
    ]


def test_fail_closed_hook_stops_a_start_with_one_logged_line(single: Host) -> None:
    """libvirt refuses the start and reports our single stderr line; fail-open lets it run."""
    h = single
    (h.state / "not-a-dir").write_text("")
    broken = f'journal_path = "{h.state}/not-a-dir/journal.sqlite3"\n'
    h.config_path.write_text(broken + "fail_closed = true\n")
    h.install_hook()
    h.start()
    xml = h.state / "dom.xml"
    xml.write_text(_domain_xml("h4closed", None))
    h.virsh("define", str(xml))
    proc = subprocess.run(
        ["virsh", "-c", h.uri, "start", "h4closed"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    print(f"libvirt says: {proc.stderr.strip()}")
    assert proc.returncode != 0
    assert "spice-libvirt-hook: h4closed prepare begin: journal" in proc.stderr
    assert h.virsh("domstate", "h4closed").strip() == "shut off"
    # the configuration is read on every call: fail-open needs no restart
    h.config_path.write_text(broken + "fail_closed = false\n")
    h.virsh("start", "h4closed")
    assert h.virsh("domstate", "h4closed").strip() == "running"


# --- in the project's two-host libvirt lab (spice_libvirt.lab.libvirt_lab) ---------------


def test_hook_in_both_hosts_of_the_libvirt_lab(tmp_path: Path) -> None:
    """The hook installed by ``before_start`` into both lab hosts; ping-pong migration.

    The lab's guest takes its SPICE address from each host's ``spice_listen``; here it is
    redefined with A's address pinned in its XML, which only the hook can make migratable.
    """
    pytest.importorskip("libvirt")
    from spice_libvirt.lab import libvirt_lab
    from spice_libvirt.lab.libvirt_host import LibvirtHost
    from spice_libvirt.lab.libvirt_lab import HostName

    lab_dir = Path(tempfile.mkdtemp(prefix="h4lab-"))  # short: unix socket paths
    journals: dict[str, Path] = {}

    def install_hook(host: LibvirtHost) -> None:
        cfg = host.state_dir / "spice-libvirt.toml"
        journals[host.config.name] = host.state_dir / "journal.sqlite3"
        cfg.write_text(
            f'spice_address = "{host.config.ip}"\njournal_path = "{journals[host.config.name]}"\n'
        )
        hook_install.install(host.etc_dir / "hooks", config=cfg)

    def rows(name: str) -> list[JournalEntry]:
        return list(reversed(Journal(journals[name]).entries(limit=None)))

    try:
        state = libvirt_lab.up(lab_dir / "lab", before_start=install_hook, memory_mib=128)
        a = state.host("A")
        dom = state.domain

        def virsh(host: LibvirtHost, *args: str) -> str:
            return _run(["virsh", "-c", host.uri_unix, *args], timeout=120)

        assert ("started", "begin") in _ops(rows("A"))
        virsh(a, "destroy", dom)
        virsh(a, "undefine", dom)
        pinned = state.domain_xml.read_text().replace(
            "<listen type='address'/>", f"<listen type='address' address='{a.config.ip}'/>"
        )
        assert a.config.ip in pinned
        (lab_dir / "pinned.xml").write_text(pinned)
        virsh(a, "define", str(lab_dir / "pinned.xml"))
        virsh(a, "start", dom)
        dom_uuid = virsh(a, "domuuid", dom).strip()

        legs: tuple[tuple[HostName, HostName], ...] = (("A", "B"), ("B", "A"))
        for src, dst in legs:
            src_ip = state.hosts[src].config.ip
            dst_ip = state.hosts[dst].config.ip
            result = libvirt_lab.migrate(lab_dir / "lab", to=dst)
            assert result.ok, result.error
            mig = [e for e in rows(dst) if e.operation == "migrate"]
            assert mig, _ops(rows(dst))
            last = mig[-1]
            assert (last.suboperation, last.outcome, last.uuid) == ("begin", "rewritten", dom_uuid)
            assert f"listen address {src_ip} -> {dst_ip}" in last.detail
            assert last.duration_ms is not None
            assert last.duration_ms < 2000
            live = ET.fromstring(virsh(state.host(dst), "dumpxml", dom))
            listen = live.find("./devices/graphics/listen")
            assert listen is not None
            assert listen.get("address") == dst_ip
            assert result.spice_after is not None
            assert result.spice_after.address == dst_ip
    finally:
        libvirt_lab.down(lab_dir / "lab")
        shutil.rmtree(lab_dir, ignore_errors=True)
