"""The built-in QEMU lab: two QEMUs on loopback that migrate back and forth.

``lab up`` starts side ``a`` (the guest running) and side ``b`` (``-incoming``), records
them in a JSON state file and *returns* while both keep running: they are spawned with
``subprocess.Popen(start_new_session=True)`` so they outlive the CLI process and its
terminal (an asyncio subprocess would be killed when its transport is collected).
``lab migrate`` migrates from the running side to the waiting one with the controller
(:func:`spice_libvirt.qemu.controller.migrate_qemu`), then re-arms the old source as a new
incoming QEMU, so repeated calls ping-pong. ``lab status`` and ``lab down`` read the same
state file; ``down`` stops the QEMUs by the PIDs recorded there, after checking that each
PID still is the QEMU we started (start time and command line), never by name.

The command lines come from :func:`spice_libvirt_lab.qemu_process.qemu_argv`, so the lab runs
exactly the VMs the tests run.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import shlex
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from spice_libvirt import errors
from spice_libvirt.migration.evidence import sessions_from_query_spice
from spice_libvirt.migration.progress import ProgressReporter
from spice_libvirt.migration.report import MigrationReport
from spice_libvirt.migration.witness import MigrationWitness
from spice_libvirt.qemu.controller import migrate_qemu
from spice_libvirt.qemu.qmp import QMPConnection
from spice_libvirt.qemu.request import MigrationRequest
from spice_libvirt_lab import guest as guest_mod
from spice_libvirt_lab import labdir, memcheck
from spice_libvirt_lab.ports import free_tcp_port, free_tcp_ports, port_is_free
from spice_libvirt_lab.procs import exclusive_lock, proc_start_time
from spice_libvirt_lab.qemu_lab_state import (
    _CHILDREN,
    STATE_FILE,
    GuestKind,
    LabState,
    LabStatus,
    LabTls,
    SideName,
    SideState,
    SideStatus,
    TlsMode,
    _spawn_detached,
    _tail,
    dump,
    side_alive,
    state_summary,
    stop_side,
)
from spice_libvirt_lab.qemu_process import QemuSpec, qemu_argv, resolve_accel

log = logging.getLogger(__name__)


#: what ``lab guest`` calls the QEMU lab's one guest (its hosts are the sides "a" and "b")
QEMU_LAB_DOMAIN = "lab"


def default_lab_dir() -> Path:
    """The one default lab directory (:func:`spice_libvirt_lab.labdir.default_lab_dir`)."""
    return labdir.default_lab_dir()


# -- the lab -----------------------------------------------------------------------------


class QemuLab:
    """The lab in one directory; every public method takes the directory lock."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = (directory or default_lab_dir()).absolute()
        self.state_path = self.directory / STATE_FILE

    # -- state ----------------------------------------------------------------------

    def _locked(self, timeout: float = 30.0) -> contextlib.AbstractContextManager[None]:
        labdir.ensure_private_dir(self.directory)
        return exclusive_lock(
            self.directory / "lab.lock",
            timeout,
            f"the lab in {self.directory} is busy (another lab command runs)",
        )

    def load(self) -> LabState | None:
        labdir.check_private_dir(self.directory)
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return None
        try:
            return LabState.model_validate_json(text)
        except ValueError as exc:
            raise errors.LabError(f"{self.state_path} is not a lab state file: {exc}") from exc

    def _save(self, state: LabState) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(state.model_dump_json(indent=1) + "\n")
        tmp.replace(self.state_path)

    # -- starting QEMUs ---------------------------------------------------------------

    def _spec(
        self,
        state_guest: GuestKind,
        memory_mib: int,
        side: SideName,
        incoming: str | None,
        tls: LabTls | None = None,
        options: memcheck.MemcheckOptions | None = None,
    ) -> QemuSpec:
        return QemuSpec(
            name=f"lab-{side}",
            guest=state_guest,
            memory_mib=memory_mib,
            memcheck=options,
            incoming=incoming,
            workdir=self.directory,
            tls_dir=tls.directory if tls else None,
            tls_channels=["default"] if tls is not None and tls.mode == "secure" else [],
        )

    async def _fresh_destination(self, state: LabState, side: SideState) -> SideState:
        """Stop ``side`` and start a fresh incoming QEMU in its place, on the same ports."""
        await asyncio.to_thread(stop_side, side)
        return await self._start_side(
            side.side,
            guest=state.guest,
            memory_mib=state.memory_mib,
            role="destination",
            spice_port=side.spice_port,
            spice_tls_port=side.spice_tls_port,
            tls=state.tls,
            options=state.memcheck,
        )

    async def _start_side(
        self,
        side: SideName,
        *,
        guest: GuestKind,
        memory_mib: int,
        role: Literal["source", "destination"],
        spice_port: int | None = None,
        spice_tls_port: int | None = None,
        tls: LabTls | None = None,
        options: memcheck.MemcheckOptions | None = None,
        timeout: float = 20.0,
    ) -> SideState:
        """Spawn one QEMU detached from our session and wait until its QMP answers."""
        migrate_port = free_tcp_port() if role == "destination" else None
        incoming = f"tcp:127.0.0.1:{migrate_port}" if migrate_port else None
        spec = self._spec(guest, memory_mib, side, incoming, tls, options)
        images: guest_mod.GuestImages | memcheck.MemcheckImage | None = None
        if guest == "linux":
            images = await asyncio.to_thread(guest_mod.ensure_linux_guest)
        elif guest == "memcheck":
            images = await asyncio.to_thread(memcheck.ensure_memcheck_guest)
        if spice_port is None or not port_is_free(spice_port):
            spice_port = free_tcp_ports(1)[0]
        if tls is not None and (spice_tls_port is None or not port_is_free(spice_tls_port)):
            spice_tls_port = free_tcp_ports(1)[0]
        if tls is None:
            spice_tls_port = None
        argv = qemu_argv(spec, spice_port=spice_port, spice_tls_port=spice_tls_port, images=images)
        for stale in (spec.qmp_path, spec.pidfile, spec.serial_log):
            stale.unlink(missing_ok=True)
        (self.directory / f"{spec.name}.cmdline").write_text(shlex.join(argv) + "\n")
        proc = _spawn_detached(argv, spec.log_path)
        state = SideState(
            side=side,
            role=role,
            name=spec.name,
            pid=proc.pid,
            start_time=proc_start_time(proc.pid),
            qmp_path=spec.qmp_path,
            spice_host=spec.spice_host,
            spice_port=spice_port,
            spice_tls_port=spice_tls_port,
            migrate_port=migrate_port,
            serial_log=spec.serial_log,
            log_path=spec.log_path,
            argv=argv,
            started_at=dt.datetime.now(dt.UTC),
        )
        # keep the handle for this process's lifetime: Popen.__del__ would otherwise warn
        # about a running child; the lab itself tracks the QEMU by PID and start time
        _CHILDREN[proc.pid] = proc
        try:
            await self._wait_qmp(state, timeout)
        except BaseException:
            stop_side(state)
            raise
        return state

    async def _wait_qmp(self, side: SideState, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not side.qmp_path.exists():
            if not side_alive(side):
                raise errors.LabError(f"QEMU {side.name} exited at start:\n{_tail(side.log_path)}")
            if time.monotonic() > deadline:
                raise errors.LabError(f"QEMU {side.name}: no QMP socket within {timeout:g} s")
            await asyncio.sleep(0.02)
        async with QMPConnection.open(
            side.qmp_path, name=side.name, timeout=max(0.5, deadline - time.monotonic())
        ) as qmp:
            await qmp.execute("query-status")

    async def _wait_guest_ready(self, side: SideState, marker: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not side_alive(side):
                raise errors.LabError(
                    f"QEMU {side.name} exited while booting:\n{_tail(side.log_path)}"
                )
            with contextlib.suppress(OSError):
                if marker in side.serial_log.read_text(errors="replace"):
                    return
            if time.monotonic() > deadline:
                raise errors.LabError(f"guest {side.name} printed no {marker} within {timeout:g} s")
            await asyncio.sleep(0.05)

    # -- commands ---------------------------------------------------------------------

    async def up(
        self,
        guest: GuestKind = "firmware",
        memory_mib: int | None = None,
        *,
        tls: bool = False,
        tls_mode: TlsMode = "secure",
        options: memcheck.MemcheckOptions | None = None,
    ) -> LabState:
        """Start both sides; :class:`LabError` if a lab already runs in this directory.

        The memcheck guest runs with ``options`` (default: a 256 MiB working set, idle);
        its RAM is the working set plus :data:`~spice_libvirt_lab.memcheck.RESERVED_MIB`,
        whatever ``memory_mib`` says.

        With ``tls`` both QEMUs also listen on a TLS port with a lab CA's certificate, and
        migrations send the client there with the certificate subject. ``tls_mode``
        ``secure`` (the default, as a production host runs) makes every channel refuse
        plain text (``tls-channel=default``), so a client on TLS is offered both ports,
        links the plain one, gets NEED_SECURED and stays on TLS -- seamless for spice-gtk
        too; ``mixed`` accepts plain links as well, the setup in which a client
        told the plain port would go plain.
        """
        memory = memory_mib or (256 if guest == "linux" else 128)
        if guest == "memcheck":
            options = options or memcheck.MemcheckOptions()
            memory = options.memory_mib
        elif options is not None:
            raise errors.ConfigError("memcheck options need the memcheck guest")
        with self._locked():
            existing = self.load()
            if existing is not None:
                alive = [s for s in existing.sides.values() if side_alive(s)]
                if alive:
                    pids = ", ".join(f"{s.side}={s.pid}" for s in alive)
                    raise errors.LabError(
                        f"a lab is already up in {self.directory} (pids {pids}); "
                        "run 'spice-libvirt lab down' first"
                    )
                self.state_path.unlink()
            accel = resolve_accel(self._spec(guest, memory, "a", None, options=options))
            lab_tls = await asyncio.to_thread(self._tls_material, tls_mode) if tls else None
            src = await self._start_side(
                "a", guest=guest, memory_mib=memory, role="source", tls=lab_tls, options=options
            )
            try:
                dst = await self._start_side(
                    "b",
                    guest=guest,
                    memory_mib=memory,
                    role="destination",
                    tls=lab_tls,
                    options=options,
                )
            except BaseException:
                stop_side(src)
                raise
            state = LabState(
                guest=guest,
                tls=lab_tls,
                accel=accel,
                memory_mib=memory,
                memcheck=options,
                directory=self.directory,
                created_at=dt.datetime.now(dt.UTC),
                sides={"a": src, "b": dst},
            )
            self._save(state)
        if guest != "firmware":
            marker = memcheck.READY_MARKER if guest == "memcheck" else guest_mod.READY_MARKER
            try:
                await self._wait_guest_ready(src, marker)
            except errors.LabError:
                await self.down()
                raise
        return state

    def _tls_material(self, mode: TlsMode) -> LabTls:
        from spice_libvirt_lab.tls import generate_tls_material

        material = generate_tls_material(self.directory / "tls")
        return LabTls(
            directory=material.directory,
            ca_cert=material.ca_cert,
            subject=material.subject,
            mode=mode,
        )

    def _require(self) -> LabState:
        state = self.load()
        if state is None:
            raise errors.LabError(f"no lab is up in {self.directory} (run 'spice-libvirt lab up')")
        return state

    async def status(self) -> LabStatus:
        state = self.load()
        if state is None:
            return LabStatus(up=False, directory=self.directory)

        async def side_status(side: SideState) -> SideStatus:
            alive = side_alive(side)
            qemu_status = None
            if alive:
                with contextlib.suppress(errors.SpiceLibvirtError):
                    async with QMPConnection.open(side.qmp_path, timeout=2) as qmp:
                        qemu_status = (await qmp.execute("query-status", timeout=2))["status"]
            return SideStatus(
                side=side.side,
                role=side.role,
                pid=side.pid,
                alive=alive,
                qemu_status=qemu_status,
                spice_uri=side.spice_uri,
                qmp=str(side.qmp_path),
                migrate_uri=f"tcp:127.0.0.1:{side.migrate_port}" if side.migrate_port else None,
            )

        src = await side_status(state.sides[state.source])
        dst = await side_status(state.sides[state.destination])
        return LabStatus(
            up=src.alive and dst.alive,
            directory=self.directory,
            guest=state.guest,
            tls_mode=state.tls.mode if state.tls else None,
            migrations=state.migrations,
            last_outcome=state.last_outcome,
            source=src,
            destination=dst,
        )

    def guest_accounts(self) -> list[memcheck.GuestAccount]:
        """The memcheck guest's own account, from the console of the side it runs on."""
        state = self._require()
        if state.guest != "memcheck":
            raise errors.ConfigError(
                f"the lab's guest is {state.guest}: only the memcheck guest keeps its own "
                "account (lab up --guest memcheck)"
            )
        side = state.sides[state.source]
        host = side.side if side_alive(side) else None
        return [memcheck.account(QEMU_LAB_DOMAIN, host, side.serial_log)]

    async def down(self) -> list[int]:
        """Stop every recorded QEMU by PID and remove the state; returns the PIDs stopped."""
        with self._locked():
            state = self.load()
            if state is None:
                return []
            stopped = []
            for side in state.sides.values():
                if side_alive(side):
                    stopped.append(side.pid)
                await asyncio.to_thread(stop_side, side)
            self.state_path.unlink(missing_ok=True)
            for name in ("lab-a", "lab-b"):
                for suffix in (".qmp", ".pid"):
                    (self.directory / f"{name}{suffix}").unlink(missing_ok=True)
            return stopped

    async def migrate(
        self,
        *,
        watch: bool = True,
        wait_client: bool = True,
        require_seamless: bool = False,
        reporter: ProgressReporter | None = None,
        request_overrides: dict[str, Any] | None = None,
        witness: MigrationWitness | None = None,
    ) -> MigrationReport:
        """Migrate to the waiting side, then re-arm the old source as the new destination."""
        with self._locked(timeout=60):
            state = self._require()
            src = state.sides[state.source]
            dst = state.sides[state.destination]
            for side in (src, dst):
                if not side_alive(side):
                    raise errors.LabError(
                        f"lab QEMU {side.name} (pid {side.pid}) is not running; "
                        "run 'lab down' and 'lab up'"
                    )
            assert dst.migrate_port is not None
            request = MigrationRequest(
                source_qmp=str(src.qmp_path),
                destination_qmp=str(dst.qmp_path),
                migrate_uri=f"tcp:127.0.0.1:{dst.migrate_port}",
                client_host=dst.spice_host,
                client_port=dst.spice_port,
                client_tls_port=dst.spice_tls_port,
                client_cert_subject=state.tls.subject if state.tls else None,
                require_seamless=require_seamless,
                wait_client=wait_client,
                source_pid=src.pid,
                **(request_overrides or {}),
            )
            report: MigrationReport
            other = await _connected_client(src) if witness is None and watch else None
            if other is not None:
                # spice-server runs one client per VM: linking ours would disconnect the
                # one the user is watching. Migrate theirs and judge it from QMP instead.
                watch = False
            if witness is not None or not watch:
                report = await migrate_qemu(request, witness, reporter)
                if other is not None:
                    report.notes.append(
                        f"a SPICE client (connection id {other}) was already connected to the "
                        "source: the embedded client was not attached (it would have replaced "
                        "it); verdict from QMP"
                    )
            else:
                async with embedded_client(src, state.tls) as client:
                    if client is None:
                        report = await migrate_qemu(request, None, reporter)
                        report.notes.append(
                            "the embedded SPICE client is not available in this build: "
                            "verdict from QMP only"
                        )
                    else:
                        report = await migrate_qemu(request, client, reporter)
            await self._rearm(state, report)
            return report

    async def _rearm(self, state: LabState, report: MigrationReport) -> None:
        """Make the lab ready for the next ``migrate`` whatever happened."""
        src = state.sides[state.source]
        dst = state.sides[state.destination]
        if report.migration.status == "completed":
            # the old source is in 'postmigrate': replace it by a fresh incoming QEMU
            new_dst = await self._fresh_destination(state, src)
            dst.role = "source"
            dst.migrate_port = None
            state.sides[src.side] = new_dst
            state.sides[dst.side] = dst
            state.source = dst.side
            state.migrations += 1
        elif not side_alive(dst) or not await _is_incoming(dst):
            # a failed migration may leave the destination dead or unusable: replace it
            state.sides[dst.side] = await self._fresh_destination(state, dst)
        state.last_outcome = report.outcome
        self._save(state)


async def _connected_client(side: SideState) -> int | None:
    """The connection id of a SPICE client connected to ``side``, if any."""
    async with QMPConnection.open(side.qmp_path, timeout=5) as qmp:
        spice = await qmp.execute("query-spice", timeout=5)
    sessions = sessions_from_query_spice(spice)
    return next(iter(sessions), None)


async def _is_incoming(side: SideState) -> bool:
    try:
        async with QMPConnection.open(side.qmp_path, timeout=2) as qmp:
            status = await qmp.execute("query-status", timeout=2)
            return bool(status["status"] == "inmigrate")
    except errors.SpiceLibvirtError:
        return False


@contextlib.asynccontextmanager
async def embedded_client(
    side: SideState, tls: LabTls | None = None
) -> AsyncIterator[MigrationWitness | None]:
    """Our SPICE client connected to ``side`` (None when the client is not built in).

    With ``tls`` it connects to the TLS port only, verifying the lab CA and the subject.

    This is the adapter between the lab and :mod:`spice_libvirt.spice.client`: the
    controller only sees the :class:`~spice_libvirt.migration.witness.MigrationWitness` shape.
    """
    try:
        from spice_libvirt.spice import client as client_mod
    except ImportError:
        yield None
        return
    options = client_mod.ClientOptions(
        host=side.spice_host,
        port=None if tls else side.spice_port,
        tls_port=side.spice_tls_port if tls else None,
        ca_file=tls.ca_cert if tls else None,
        host_subject=tls.subject if tls else None,
        stream_port_name=guest_mod.STREAM_PORT_NAME,
    )
    client = client_mod.SpiceClient(options)
    await client.connect(timeout=10)
    try:
        yield client
    finally:
        await client.close()


__all__ = [
    "STATE_FILE",
    "LabState",
    "LabStatus",
    "LabTls",
    "QemuLab",
    "SideState",
    "SideStatus",
    "TlsMode",
    "default_lab_dir",
    "dump",
    "embedded_client",
    "side_alive",
    "state_summary",
    "stop_side",
]
