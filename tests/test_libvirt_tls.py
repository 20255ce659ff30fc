"""On real libvirtds: SPICE over TLS as a manager sets it up, in the two-host lab.

``lab up --libvirt --tls``: a lab CA, per-host certificates (``O=lab,CN=hostA``), each host's
qemu.conf with ``spice_tls = 1``, the guest's graphics in ``defaultMode='secure'`` (or, mixed,
some channels secure), migrations whose graphics URI names the destination's ``tlsPort``
and ``tlsSubject``. Clients verify the CA and the subject on both hosts:

* the embedded client (lab migrate, namespace C) there and back: seamless, every channel on
  TLS before and after;
* remote-viewer (``--spice-ca-file``, ``--spice-host-subject``,
  ``--spice-secure-channels=all``) at 150 ms RTT there and back: seamless by its own log,
  and ``query-spice`` (``virsh qemu-monitor-command`` where the VM runs) shows the same
  session with every channel on TLS;
* certificate failures are reasons: a destination with the wrong subject, or signed by
  another CA -- ``--require-seamless`` aborts with the VM untouched and the report names the
  cause; the default path reports the outcome truthfully.

Every lab is torn down (by PID, namespaces deleted) also when an assertion fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from spice_libvirt.exitcodes import ExitCode, for_report
from spice_libvirt.migration.evidence import Sessions, sessions_from_query_spice
from spice_libvirt_lab import libvirt_lab, libvirt_tls
from spice_libvirt_lab.libvirt_lab import LabState
from spice_libvirt_lab.libvirt_migrate import lab_migrate
from tests.rigs.libvirt_lab import fresh_state, lab_marks
from tests.rigs.viewer import (
    VIEWER_CHANNELS,
    RemoteViewer,
    ViewerTls,
    XServer,
    full_session,
    migration_messages,
    start_viewer,
)

pytest.importorskip("libvirt")

#: the secure TLS lab the set-up and client tests share (each starts and ends where the
#: guest runs; the failure and mode tests build labs of their own)
pytestmark = lab_marks(tls=True)


def _state(lab: Path) -> LabState:
    state = libvirt_lab.load_state(lab)
    assert state is not None
    return state


def _query_spice(state: LabState, host: str) -> Sessions:
    """``query-spice`` through ``virsh qemu-monitor-command`` on ``host`` (root namespace,
    the host's UNIX socket): QEMU's own view of every channel, TLS included."""
    done = subprocess.run(
        [
            "virsh",
            "-c",
            state.hosts[host].uri_unix,
            "qemu-monitor-command",
            state.domain,
            json.dumps({"execute": "query-spice"}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return sessions_from_query_spice(json.loads(done.stdout))


def _graphics(state: LabState, host: str) -> ET.Element:
    """The running domain's ``<graphics>`` as libvirt reports it."""
    done = subprocess.run(
        ["virsh", "-c", state.hosts[host].uri_unix, "dumpxml", state.domain],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    node = ET.fromstring(done.stdout).find("./devices/graphics[@type='spice']")
    assert node is not None
    return node


def _where(state: LabState) -> str:
    return libvirt_lab.status(state.lab_dir).active_host or "?"


# --------------------------------------------------------------------------- set-up


def test_tls_lab_is_set_up_as_a_manager_would(shared_lab: LabState) -> None:
    """Configuration only (fast): qemu.conf, certificates, graphics XML, QEMU's -spice."""
    state = fresh_state(shared_lab)
    here = _where(state)
    there = "B" if here == "A" else "A"
    assert state.tls is not None
    assert state.tls.mode == "secure"
    assert state.tls.subjects == {"A": "O=lab,CN=hostA", "B": "O=lab,CN=hostB"}
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(state.tls.ca_cert.read_bytes())
    for name in ("A", "B"):
        host = state.host(name)
        conf = (host.etc_dir / "qemu.conf").read_text()
        assert "spice_tls = 1" in conf
        assert 'spice_tls_x509_cert_dir = "/etc/libvirt/spice-tls"' in conf
        cert_dir = libvirt_tls.cert_dir(host)
        cert = x509.load_pem_x509_certificate((cert_dir / "server-cert.pem").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN=host{name},O=lab"  # RFC 4514 reverses
        assert cert.issuer == ca.subject
        assert not (cert_dir / "ca-key.pem").exists()  # the CA key stays with the "manager"
    graphics = _graphics(state, here)
    assert graphics.get("defaultMode") == "secure"
    assert (graphics.get("port"), graphics.get("tlsPort")) == ("5900", "5901")
    argv = Path(f"/proc/{_qemu_pid(state, here)}/cmdline").read_bytes().split(b"\0")
    spice = argv[argv.index(b"-spice") + 1].decode().split(",")
    assert "tls-channel=default" in spice
    assert "tls-port=5901" in spice
    endpoint = libvirt_lab.spice_endpoint(state, here)  # type: ignore[arg-type]
    assert endpoint is not None
    assert endpoint.tls_port == 5901
    assert endpoint.subject == f"O=lab,CN=host{here}"
    # a plain link is refused with NEED_SECURED: nothing of the guest in plain text
    ip = state.hosts[there].config.ip
    assert libvirt_tls.graphics_uri(state, there) == (
        f"spice://{ip}:5900?tlsPort=5901&tlsSubject=O%3Dlab%2CCN%3Dhost{there}"
    )


def _qemu_pid(state: LabState, host: str) -> int:
    pidfile = (
        state.hosts[host].config.state_dir / "run" / "libvirt" / "qemu" / f"{state.domain}.pid"
    )
    return int(pidfile.read_text().strip())


def test_mixed_mode_secures_only_some_channels(libvirt_lab_dir: Path) -> None:
    state = libvirt_lab.up(libvirt_lab_dir, tls=True, tls_mode="mixed")
    graphics = _graphics(state, "A")
    assert graphics.get("defaultMode", "any") == "any"
    modes = {c.get("name"): c.get("mode") for c in graphics.findall("channel")}
    assert modes == {"main": "secure", "inputs": "secure", "cursor": "secure"}
    argv = Path(f"/proc/{_qemu_pid(state, 'A')}/cmdline").read_bytes().split(b"\0")
    spice = argv[argv.index(b"-spice") + 1].decode().split(",")
    assert {"tls-channel=main", "tls-channel=inputs", "tls-channel=cursor"} <= set(spice)
    assert "tls-channel=default" not in spice


# --------------------------------------------------------------------------- clients


def test_embedded_client_verifies_both_hosts_and_stays_on_tls(shared_lab: LabState) -> None:
    lab = shared_lab.lab_dir
    libvirt_lab.set_client_rtt(lab, 50)
    for expected in _there_and_back(shared_lab):
        report = lab_migrate(lab)
        assert report.migration.status == "completed", report.notes
        assert report.outcome == "seamless", (report.outcome, report.notes)
        assert for_report(report) is ExitCode.OK
        assert report.tls_downgraded is False
        assert "tlsSubject=O%3Dlab%2CCN%3Dhost" + expected in report.client_target
        [client] = report.clients
        assert client.kind == "embedded"
        assert (client.tls_before, client.tls_after) == (True, True)
        assert set(client.channels_after) >= {"main:0", "display:0", "inputs:0", "cursor:0"}
        assert _where(fresh_state(shared_lab)) == expected


def _there_and_back(lab: LabState) -> tuple[str, str]:
    """The hosts a ping-pong visits, from where the guest runs now."""
    here = _where(fresh_state(lab))
    return ("B" if here == "A" else "A"), here


def _secure_viewer(state: LabState, display: str, workdir: Path, name: str) -> RemoteViewer:
    """remote-viewer in the client namespace, verifying the lab CA and the source's subject."""
    host = _where(state)
    endpoint = libvirt_lab.spice_endpoint(state, host)  # type: ignore[arg-type]
    assert endpoint is not None
    assert state.tls is not None
    assert endpoint.subject is not None
    tls = ViewerTls(state.tls.ca_cert, endpoint.subject)
    return start_viewer(endpoint.uri, display, workdir, name=name, tls=tls, ns=state.client.netns)


def _full_tls_session(state: LabState, host: str, viewer: RemoteViewer) -> int:
    deadline = time.monotonic() + 60
    while True:
        sessions = _query_spice(state, host)
        cid = full_session(sessions)
        if cid is not None:
            return cid
        assert viewer.alive(), "remote-viewer exited"
        assert time.monotonic() < deadline, f"no full remote-viewer session on {host}: {sessions}"
        time.sleep(0.2)


def test_remote_viewer_all_secure_at_150ms_there_and_back(
    shared_lab: LabState, x_server: XServer, lab_dir: Path
) -> None:
    libvirt_lab.set_client_rtt(shared_lab.lab_dir, 150)
    there, here = _there_and_back(shared_lab)
    state = fresh_state(shared_lab)
    viewer = _secure_viewer(state, x_server.display, lab_dir, "rv-lv-tls")
    try:
        cid = _full_tls_session(state, here, viewer)
        assert _query_spice(state, here)[cid].all_tls is True
        for expected in (there, here):
            mark = len(viewer.log_text())
            report = lab_migrate(shared_lab.lab_dir, watch=False)
            assert report.migration.status == "completed", report.notes
            assert report.outcome == "seamless", (report.outcome, report.notes)
            assert report.tls_downgraded is False
            [client] = report.clients
            assert client.connection_id_before == cid
            assert (client.tls_before, client.tls_after) == (True, True)
            state = fresh_state(shared_lab)
            assert _where(state) == expected
            # the oracle: QEMU where the VM runs, through libvirt's monitor passthrough
            sessions = _query_spice(state, expected)
            assert list(sessions) == [cid], sessions
            assert set(sessions[cid].names) >= VIEWER_CHANNELS
            assert sessions[cid].tls_names(False) == [], sessions[cid].channels
            # and remote-viewer's own log
            text = viewer.log_text()[mark:]
            messages = migration_messages(text)
            assert "migrate-begin-seamless" in messages, messages
            assert "migrate-switch-host" not in messages, messages
        assert viewer.alive()
    finally:
        viewer.stop()


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ({"common_name": "hostX"}, "client could not verify the destination (subject mismatch)"),
        (
            {"foreign_ca": True},
            "client could not verify the destination (not signed by a trusted CA)",
        ),
    ],
    ids=["wrong-subject", "foreign-ca"],
)
def test_a_destination_the_client_cannot_verify_is_a_reason(
    libvirt_lab_dir: Path, damage: dict[str, object], reason: str
) -> None:
    state = libvirt_lab.up(libvirt_lab_dir, tls=True)
    libvirt_tls.reissue(libvirt_lab_dir, "B", **damage)  # type: ignore[arg-type]
    # --require-seamless: aborted, the VM untouched on A, the cause named
    report = lab_migrate(libvirt_lab_dir, options={"require_seamless": True})
    assert report.migration.status == "cancelled", report.notes
    assert report.outcome == "cancelled"
    assert report.link_wait.result == "connect-error"
    assert report.error is not None
    assert report.error.startswith(reason), report.error
    assert any(n.startswith(reason) for n in report.notes), report.notes
    assert for_report(report) is ExitCode.MIGRATION_FAILED
    assert report.placement == "source"
    assert _where(_state(libvirt_lab_dir)) == "A"
    sessions = _query_spice(state, "A")
    assert sessions == {}  # the embedded client left; nobody linked anything in plain text
    # the default path: the migration happens, the client cannot follow, and says why
    report = lab_migrate(libvirt_lab_dir)
    assert report.migration.status == "completed", report.notes
    assert report.outcome != "seamless"
    assert for_report(report) is not ExitCode.OK
    assert any(n.startswith(reason) for n in report.notes), report.notes
    [client] = report.clients
    assert client.tls_before is True
    assert client.tls_after is not False  # never a plain link, whatever happened


def test_tls_only_graphics_remote_viewer_still_seamless_because_libvirt_sends_port_0(
    libvirt_lab_dir: Path, x_server: XServer, lab_dir: Path
) -> None:
    """No plain port at all (what libvirt 9.0 makes of ``defaultMode='secure'`` with
    autoport). libvirt's ``client_migrate_info`` then carries ``port: 0`` -- not -1, which
    is what QEMU makes of an omitted port and spice-gtk 0.42 receives as 65535 and tries in
    plain text. spice-gtk treats 0 as "no plain port" and pre-links on TLS: seamless, every
    channel on TLS, there and back (measured here; the lab's default keeps a refusing plain
    port for clients that need one)."""
    state = libvirt_lab.up(libvirt_lab_dir, tls=True, tls_mode="tls-only")
    graphics = _graphics(state, "A")
    assert graphics.get("port") is None
    assert graphics.get("tlsPort") == "5901"
    assert libvirt_tls.graphics_uri(state, "B") == (
        f"spice://{state.hosts['B'].config.ip}?tlsPort=5901&tlsSubject=O%3Dlab%2CCN%3DhostB"
    )
    viewer = _secure_viewer(state, x_server.display, lab_dir, "rv-tls-only")
    try:
        cid = _full_tls_session(state, "A", viewer)
        for expected, source in (("B", "A"), ("A", "B")):
            mark = len(viewer.log_text())
            report = lab_migrate(libvirt_lab_dir, watch=False)
            assert report.outcome == "seamless", (report.outcome, report.notes)
            assert report.tls_downgraded is False
            sessions = _query_spice(state, expected)
            assert list(sessions) == [cid], sessions
            assert sessions[cid].tls_names(False) == [], sessions[cid].channels
            messages = migration_messages(viewer.log_text()[mark:])
            assert "migrate-begin-seamless" in messages, messages
            assert "migrate-switch-host" not in messages, messages
            monitor = (state.hosts[source].config.state_dir / "log" / "libvirtd.log").read_text()
            sent = re.findall(r'"execute":"client_migrate_info","arguments":(\{[^}]*\})', monitor)
            assert sent, "no client_migrate_info in the source's monitor log"
            assert json.loads(sent[-1])["port"] == 0, sent[-1]
    finally:
        viewer.stop()
