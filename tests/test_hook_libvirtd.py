"""The hook inside real, private libvirtd instances: the lab's own hosts.

Each simulated host is a :class:`~spice_libvirt_lab.libvirt_host.LibvirtHost` (a network
namespace plus a private mount and UTS namespace with its own virtlogd and libvirtd; the
root namespace's libvirtd is not used). The hook is installed into the host's private
``/etc/libvirt/hooks/qemu.d`` *before* libvirtd starts (libvirt reads hooks at start-up),
with the host's configuration file baked into the shim, so that two hosts on one file
system can have different SPICE addresses and journals.

Everything started here is stopped by PID; the namespaces are deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spice_libvirt.hook import install as hook_install
from spice_libvirt.hook.journal import Journal, JournalEntry
from spice_libvirt_lab import netns
from spice_libvirt_lab.libvirt_host import HostConfig, LibvirtHost
from spice_libvirt_lab.libvirt_state import default_caps_seed

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

VENV_HOOK = hook_install.default_hook_executable()
#: Namespaced metadata as management applications write it (prefixed and default namespace).
META_APP = "http://example.org/spice-libvirt-test/app/1.0"
META_BLOB = "http://example.org/spice-libvirt-test/blob/1.0"
METADATA = (
    "<metadata>"
    f"<app:settings xmlns:app='{META_APP}'><app:owner id='7'>ops</app:owner></app:settings>"
    f"<blob xmlns='{META_BLOB}'><item k='v'/></blob>"
    "</metadata>"
)


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


@dataclass
class Hooked:
    """A lab host plus what the hook needs on it: a configuration file and a journal."""

    host: LibvirtHost

    @property
    def address(self) -> str:
        return self.host.config.ip

    @property
    def state(self) -> Path:
        return self.host.state_dir

    @property
    def config_path(self) -> Path:
        return self.state / "spice-libvirt.toml"

    @property
    def journal_path(self) -> Path:
        return self.state / "journal.sqlite3"

    @property
    def uri(self) -> str:
        return self.host.uri_unix

    def virsh(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return _run(["virsh", "-c", self.uri, *args], timeout=timeout, check=check)

    def prepare(self, *, spice_address: str, install_hook: bool = True) -> None:
        self.host.prepare()  # a fresh state directory: write our files after it
        self.write_config(f'spice_address = "{spice_address}"\n')
        if install_hook:
            self.install_hook()

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text + f'journal_path = "{self.journal_path}"\n')

    def install_hook(self) -> None:
        res = hook_install.install(self.host.etc_dir / "hooks", config=self.config_path)
        assert res.changed

    def stop(self) -> None:
        """Destroy the guests (QEMU outlives libvirtd), then stop the daemons by PID."""
        ref = self.host.runtime.libvirtd
        if ref is not None and ref.alive():
            for dom in self.virsh("list", "--name", timeout=20, check=False).split():
                self.virsh("destroy", dom, timeout=30, check=False)
        self.host.stop()

    def journal(self, domain: str | None = None) -> list[JournalEntry]:
        return list(reversed(Journal(self.journal_path).entries(limit=None, domain=domain)))


def _host(name: str, state: Path, ns: str, ip: str, peers: dict[str, str]) -> Hooked:
    seed = default_caps_seed(0)
    config = HostConfig(
        name=name,
        hostname=name,
        netns=ns,
        ip=ip,
        host_uuid=str(uuid.uuid4()),
        state_dir=state,
        hosts=peers,
        caps_seed=seed if seed.is_dir() else None,
    )
    return Hooked(LibvirtHost(config))


def _domain_xml(name: str, listen_address: str | None, *, metadata: str = "") -> str:
    listen = (
        f"<listen type='address' address='{listen_address}'/>"
        if listen_address
        else "<listen type='address'/>"
    )
    return f"""<domain type='kvm'>
  <name>{name}</name>
  {metadata}
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


@contextlib.contextmanager
def hooked_hosts(
    tmp_path: Path, addrs: dict[str, str], ns_prefix: str
) -> Iterator[dict[str, Hooked]]:
    """Hosts named as ``addrs``' keys, each in a network namespace on one veth pair, with
    our hook installed before its libvirtd started (SPICE address: its own); stopped by PID
    and the namespaces deleted afterwards. Also used by ``tests/test_doctor.py``."""
    tag = uuid.uuid4().hex[:8]
    hosts = {
        n: _host(n, tmp_path / n, f"{ns_prefix}{n[-1].lower()}-{tag}", a, addrs)
        for n, a in addrs.items()
    }
    created: list[str] = []
    try:
        for h in hosts.values():
            netns.add(h.host.config.netns)
            created.append(h.host.config.netns)
            netns.link_up(h.host.config.netns, "lo")
        first, second = (h.host.config.netns for h in hosts.values())
        netns.add_veth(first, "eth0", second, "eth0")
        for h in hosts.values():
            netns.add_address(h.host.config.netns, "eth0", f"{h.address}/24")
            netns.link_up(h.host.config.netns, "eth0")
        for h in hosts.values():
            h.prepare(spice_address=h.address)
            h.host.start()
        yield hosts
    finally:
        for h in hosts.values():
            try:
                h.stop()
            except Exception as exc:
                print(f"teardown of {h.host.config.name}: {exc}")
        for ns in created:
            netns.delete(ns)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Hooked]]:
    """Two hosts ``hostA``/``hostB`` in two network namespaces joined by one veth pair."""
    with hooked_hosts(tmp_path, {"hostA": "10.253.0.1", "hostB": "10.253.0.2"}, "h4") as hosts:
        yield hosts


def _ops(entries: list[JournalEntry]) -> list[tuple[str, str]]:
    return [(e.operation, e.suboperation) for e in entries]


def test_start_and_destroy_are_journaled_with_name_and_uuid(lab: dict[str, Hooked]) -> None:
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
    log = (a.host.log_dir / "qemu/h4vm.log").read_text(errors="replace")
    assert "hook-script" not in log


def test_migration_destination_rewrites_spice_listen(lab: dict[str, Hooked]) -> None:
    """A guest pinned to the source's address can only start on B because the hook fixes it.

    Its namespaced ``<metadata>`` goes through the hook's rewrite and must arrive intact.
    """
    a, b = lab["hostA"], lab["hostB"]
    xml = a.state / "dom.xml"
    xml.write_text(_domain_xml("h4mig", a.address, metadata=METADATA))
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
    assert "hook-script" in (b.host.log_dir / "qemu/h4mig.log").read_text(errors="replace")
    _assert_metadata_intact(b, "h4mig")

    # The source saw no migrate hook of its own, only the stop of its QEMU afterwards.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ("release", "end") not in _ops(a.journal("h4mig")):
        time.sleep(0.2)
    src_ops = _ops(a.journal("h4mig"))
    assert ("migrate", "begin") not in src_ops
    assert ("release", "end") in src_ops


def _assert_metadata_intact(h: Hooked, dom: str) -> None:
    """libvirt's own metadata API finds both elements by namespace URI, content unchanged."""
    app = ET.fromstring(h.virsh("metadata", dom, "--uri", META_APP))
    assert app.tag == "settings"  # libvirt's API hands the element back without a namespace
    owner = next(iter(app))
    assert (owner.get("id"), owner.text) == ("7", "ops")
    blob = ET.fromstring(h.virsh("metadata", dom, "--uri", META_BLOB))
    assert blob.tag == "blob"
    item = next(iter(blob))
    assert item.get("k") == "v"
    live = ET.fromstring(h.virsh("dumpxml", dom))
    assert live.find(f"./metadata/{{{META_APP}}}settings/{{{META_APP}}}owner") is not None
    assert live.find(f"./metadata/{{{META_BLOB}}}blob/{{{META_BLOB}}}item") is not None


@pytest.fixture
def single(tmp_path: Path) -> Iterator[Hooked]:
    """One host in a network namespace of its own; hook NOT installed yet.

    Its address is a non-loopback one on ``lo``: libvirt refuses a loopback
    ``migration_address`` (which every lab host gets).
    """
    ns = f"h4s-{uuid.uuid4().hex[:8]}"
    h = _host("hostS", tmp_path / "hostS", ns, "10.253.1.1", {})
    created = False
    try:
        netns.add(ns)
        created = True
        netns.link_up(ns, "lo")
        netns.add_address(ns, "lo", f"{h.address}/32")
        h.prepare(spice_address=h.address, install_hook=False)
        yield h
    finally:
        try:
            h.stop()
        finally:
            if created:
                netns.delete(ns)


def test_hook_is_loaded_only_after_a_libvirtd_restart(single: Hooked) -> None:
    """Why ``hook install`` says to restart libvirtd: a hook added later is not called."""
    h = single
    h.host.start()
    h.install_hook()
    xml = h.state / "dom.xml"
    xml.write_text(_domain_xml("h4late", None))
    h.virsh("define", str(xml))
    h.virsh("start", "h4late")
    h.virsh("destroy", "h4late")
    assert h.journal() == []
    h.host.restart_libvirtd()
    h.virsh("start", "h4late")
    assert _ops(h.journal("h4late"))[:3] == [
        ("prepare", "begin"),
        ("start", "begin"),
        ("started", "begin"),
    ]


def _start(h: Hooked, dom: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", h.uri, "start", dom], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def test_fail_closed_deadline_stops_a_start_with_one_logged_line(single: Hooked) -> None:
    """libvirt refuses the start and reports our single stderr line; fail-open lets it run.

    The failure is a budget shorter than the hook's own start-up (a deadline at once).
    """
    h = single
    h.write_config("hook_timeout_s = 0.05\nfail_closed = true\n")
    h.install_hook()
    h.host.start()
    xml = h.state / "dom.xml"
    xml.write_text(_domain_xml("h4closed", None))
    h.virsh("define", str(xml))
    proc = _start(h, "h4closed")
    print(f"libvirt says: {proc.stderr.strip()}")
    assert proc.returncode != 0
    assert "spice-libvirt-hook:" in proc.stderr
    assert "deadline" in proc.stderr
    assert h.virsh("domstate", "h4closed").strip() == "shut off"
    # the configuration is read on every call: fail-open needs no restart
    h.write_config("hook_timeout_s = 0.05\nfail_closed = false\n")
    h.virsh("start", "h4closed")
    assert h.virsh("domstate", "h4closed").strip() == "running"


def test_fail_closed_hook_never_refuses_for_its_journal(single: Hooked) -> None:
    """An unwritable journal with ``fail_closed``: the guest starts; stderr says why."""
    h = single
    (h.state / "not-a-dir").write_text("")
    h.config_path.write_text(
        f'journal_path = "{h.state}/not-a-dir/journal.sqlite3"\nfail_closed = true\n'
    )
    h.install_hook()
    h.host.start()
    xml = h.state / "dom.xml"
    xml.write_text(_domain_xml("h4jfull", None))
    h.virsh("define", str(xml))
    proc = _start(h, "h4jfull")
    assert proc.returncode == 0, proc.stderr
    assert h.virsh("domstate", "h4jfull").strip() == "running"


# --- in the project's two-host libvirt lab (spice_libvirt_lab.libvirt_lab) ---------------


def test_hook_in_both_hosts_of_the_libvirt_lab(libvirt_lab_dir: Path, tmp_path: Path) -> None:
    """The hook installed by ``before_start`` into both lab hosts; ping-pong migration.

    The lab's guest takes its SPICE address from each host's ``spice_listen``; here it is
    redefined with A's address pinned in its XML, which only the hook can make migratable.
    """
    pytest.importorskip("libvirt")
    from spice_libvirt_lab import libvirt_lab
    from spice_libvirt_lab.libvirt_lab import HostName

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

    state = libvirt_lab.up(libvirt_lab_dir, before_start=install_hook, memory_mib=128)
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
    (tmp_path / "pinned.xml").write_text(pinned)
    virsh(a, "define", str(tmp_path / "pinned.xml"))
    virsh(a, "start", dom)
    dom_uuid = virsh(a, "domuuid", dom).strip()

    legs: tuple[tuple[HostName, HostName], ...] = (("A", "B"), ("B", "A"))
    for src, dst in legs:
        src_ip = state.hosts[src].config.ip
        dst_ip = state.hosts[dst].config.ip
        result = libvirt_lab.migrate(libvirt_lab_dir, to=dst)
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
