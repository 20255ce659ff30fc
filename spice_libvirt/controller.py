"""The seamless migration controller for bare QEMU, over QMP.

Why this exists (issue 3): ``client_migrate_info`` returns at once, and a small guest
migrates in tens of milliseconds. If QEMU finishes before the SPICE client has told the
source "I linked every channel to the destination" (``MIGRATE_CONNECTED_SEAMLESS``),
spice-server falls back to ``SWITCH_HOST``: the session is reset and in-flight data is
lost. The fix is to *wait between* ``client_migrate_info`` *and* ``migrate`` until the
client has linked every channel to the destination, plus a short grace for its
confirmation to reach the source (``spice-protocol-facts.md`` §6-§7,
``rtt-seamless.md``).

The flow, each step bounded by a timeout::

    connect both QMPs -> preflight -> snapshot the client(s) on the source
      -> client_migrate_info -> wait for the client's links on the destination
      -> capabilities + parameters -> migrate -> progress -> completed
      -> SPICE_MIGRATE_COMPLETED -> settle -> verdict

On failure after ``migrate`` the migration is cancelled, the source resumed if it was
running, and the client stays on the source (spice-server sends it MIGRATE_CANCEL).

Two kinds of evidence feed the verdict: QMP alone (any client, e.g. remote-viewer: the
destination's ``SPICE_INITIALIZED`` connection ids) and, when our embedded client is
attached through a :class:`MigrationWitness`, its message-by-message record.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import struct
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field, model_validator

from spice_libvirt import errors
from spice_libvirt.progress import MigrationProgress, NullReporter, ProgressReporter, RunLog
from spice_libvirt.qmp import (
    EventStream,
    QMPAddress,
    QMPConnection,
    QMPDisconnectedError,
    QMPEvent,
)
from spice_libvirt.report import (
    ClientVerdict,
    Endpoint,
    LinkWait,
    MigrationFigures,
    MigrationReport,
    channel_name,
    classify_outcome,
    embedded_path_is_seamless,
    parse_channel_name,
)
from spice_libvirt.spice.record import ClientMigrationRecord, ClientPath, StreamStats

log = logging.getLogger(__name__)

FINAL_STATES = frozenset({"completed", "failed", "cancelled"})


@runtime_checkable
class MigrationWitness(Protocol):
    """What the controller needs from an embedded SPICE client attached to the source.

    :class:`spice_libvirt.spice.client.SpiceClient` satisfies it; tests may pass any
    object with the same shape. Without a witness the verdict comes from QMP alone.
    """

    @property
    def session_id(self) -> int: ...

    @property
    def channels(self) -> list[str]: ...

    @property
    def migration_count(self) -> int:
        """Migrations the server started so far; read before ``client_migrate_info``."""
        ...

    async def wait_migration_connected(
        self, timeout: float, after: int | None = None
    ) -> float | None:
        """Monotonic time the client told the source it linked (None: CONNECT_ERROR).

        :raise TimeoutError: no answer within ``timeout``
        """
        ...

    async def next_migration(self, timeout: float) -> ClientMigrationRecord: ...

    def stream_stats(self) -> StreamStats: ...


#: assumed client RTT when a witness cannot tell its own
DEFAULT_WITNESS_RTT = 0.05


class MigrationRequest(BaseModel):
    """Everything one QMP-driven migration needs; validated before anything is touched."""

    source_qmp: str = Field(description="unix socket path, or host:port")
    destination_qmp: str
    migrate_uri: str = Field(description="where the source sends the stream, e.g. tcp:h:p")
    #: the destination's SPICE address *as the client reaches it* (not the host's view)
    client_host: str
    client_port: int | None = None
    client_tls_port: int | None = None
    client_cert_subject: str | None = None
    require_seamless: bool = False
    wait_client: bool = True
    link_timeout: float = Field(default=10.0, gt=0)
    #: minimum pause after the destination shows every link (QMP signal), so that the
    #: client's MIGRATE_CONNECTED_SEAMLESS reaches the source (about one RTT)
    grace: float = Field(default=0.25, ge=0)
    #: pause after the embedded client reports it sent MIGRATE_CONNECTED_SEAMLESS, on top
    #: of the one-way latency it measured (its message must reach the source first)
    embedded_grace: float = Field(default=0.005, ge=0)
    max_grace: float = Field(default=2.0, ge=0)
    downtime_limit_ms: int | None = Field(default=None, gt=0)
    max_bandwidth: int | None = Field(default=None, gt=0, description="bytes/s")
    connect_timeout: float = Field(default=10.0, gt=0)
    command_timeout: float = Field(default=10.0, gt=0)
    completion_timeout: float = Field(default=300.0, gt=0)
    cancel_timeout: float = Field(default=10.0, gt=0)
    spice_completed_timeout: float = Field(default=15.0, gt=0)
    #: after SPICE_MIGRATE_COMPLETED: how long to watch the destination for a new session
    settle: float = Field(default=1.0, ge=0)
    poll_interval: float = Field(default=0.1, gt=0)
    #: how long the embedded client may take to hand over its record after the migration
    record_timeout: float = Field(default=10.0, gt=0)
    #: PID of the source QEMU, to check ``seamless-migration=on`` in its command line;
    #: found through SO_PEERCRED when the source QMP is a local unix socket
    source_pid: int | None = None

    @model_validator(mode="after")
    def _check_ports(self) -> MigrationRequest:
        if self.client_port is None and self.client_tls_port is None:
            raise ValueError("client_migrate_info needs client_port or client_tls_port")
        for port in (self.client_port, self.client_tls_port):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"port out of range: {port}")
        return self

    @property
    def client_target(self) -> str:
        tls = f"/tls:{self.client_tls_port}" if self.client_tls_port else ""
        return f"{self.client_host}:{self.client_port or '-'}{tls}"


def parse_qmp_address(text: str) -> QMPAddress:
    """``/run/x.qmp`` or ``unix:/run/x.qmp`` -> path; ``host:port`` / ``tcp:host:port`` -> pair."""
    if text.startswith("unix:"):
        return text[5:]
    rest = text[4:] if text.startswith("tcp:") else text
    if "/" not in rest and ":" in rest:
        host, _, port = rest.rpartition(":")
        if port.isdigit():
            return (host.strip("[]"), int(port))
    return text


def qemu_pid_of_socket(path: str) -> int | None:
    """The PID listening on a unix socket (SO_PEERCRED), or None if it cannot be told."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", raw)
    return pid or None


def seamless_option_of(pid: int) -> bool | None:
    """Whether QEMU ``pid`` runs with ``-spice ...,seamless-migration=on`` (None: unknown)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    found: bool | None = None
    for i, arg in enumerate(argv[:-1]):
        if arg in (b"-spice", b"--spice"):
            opts = argv[i + 1].decode(errors="replace").split(",")
            found = any(o in ("seamless-migration=on", "seamless-migration=yes") for o in opts)
    return found


class _SpiceClientView(BaseModel):
    """A client on the source as QMP shows it: one connection id and its channels."""

    connection_id: int
    channels: set[tuple[int, int]] = Field(default_factory=set)
    tls: bool | None = None


def _channels_of(event_or_entry: dict[str, Any]) -> tuple[int, tuple[int, int]] | None:
    client = event_or_entry.get("client", event_or_entry)
    try:
        # QEMU prints spice-server's u32 connection id as a signed int32 (negative ids
        # are seen); clients know it as the u32 session_id of MAIN_INIT
        cid = int(client["connection-id"]) & 0xFFFFFFFF
        return cid, (int(client["channel-type"]), int(client["channel-id"]))
    except (KeyError, TypeError, ValueError):
        return None


def _names(channels: set[tuple[int, int]]) -> list[str]:
    return sorted(channel_name(t, i) for t, i in channels)


class QemuMigrationController:
    """Runs one migration; :meth:`run` returns the verdict. Use :func:`migrate_qemu`."""

    def __init__(
        self,
        request: MigrationRequest,
        witness: MigrationWitness | None = None,
        reporter: ProgressReporter | None = None,
    ) -> None:
        self.req = request
        self.witness = witness
        self.reporter: ProgressReporter = reporter or NullReporter()
        self.log = RunLog(self.reporter)
        self._dst_tls: dict[int, bool] = {}

    # -- helpers ----------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.log.note(text)

    # -- the flow ---------------------------------------------------------------------

    async def run(self) -> MigrationReport:
        req = self.req
        started_at = dt.datetime.now(dt.UTC)
        src = QMPConnection("src", command_timeout=req.command_timeout)
        dst = QMPConnection("dst", command_timeout=req.command_timeout)
        src_addr = parse_qmp_address(req.source_qmp)
        dst_addr = parse_qmp_address(req.destination_qmp)
        source_pid = req.source_pid
        if source_pid is None and isinstance(src_addr, str):
            source_pid = await asyncio.to_thread(qemu_pid_of_socket, src_addr)
        try:
            async with self.log.phase("connect"):
                await asyncio.gather(
                    src.connect(src_addr, timeout=req.connect_timeout),
                    dst.connect(dst_addr, timeout=req.connect_timeout),
                )
            async with (
                src.events(
                    ["SPICE_INITIALIZED", "SPICE_DISCONNECTED", "SPICE_MIGRATE_COMPLETED"]
                ) as src_spice,
                src.events(["MIGRATION", "MIGRATION_PASS", "STOP", "RESUME"]) as src_mig,
                dst.events(["SPICE_INITIALIZED", "SPICE_DISCONNECTED", "RESUME"]) as dst_spice,
            ):
                return await self._run_connected(
                    src, dst, src_spice, src_mig, dst_spice, started_at, source_pid
                )
        finally:
            await asyncio.gather(src.close(), dst.close())
            self.reporter.close()

    async def _run_connected(
        self,
        src: QMPConnection,
        dst: QMPConnection,
        src_spice: EventStream,
        src_mig: EventStream,
        dst_spice: EventStream,
        started_at: dt.datetime,
        source_pid: int | None,
    ) -> MigrationReport:
        req = self.req
        source = Endpoint(qmp=req.source_qmp)
        destination = Endpoint(qmp=req.destination_qmp)
        report = MigrationReport(
            outcome="failed",
            started_at=started_at,
            source=source,
            destination=destination,
            migrate_uri=req.migrate_uri,
            client_target=req.client_target,
            require_seamless=req.require_seamless,
        )

        # -- preflight: raises MigrationError before anything is changed ---------------
        async with self.log.phase("preflight"):
            seamless_on = await self._preflight(src, dst, source, destination, source_pid)

        # -- who is connected on the source, and with which channels -------------------
        clients = await self._source_clients(src, src_spice)
        witness_cid = self.witness.session_id if self.witness is not None else None
        if self.witness is not None:
            view = clients.setdefault(
                self.witness.session_id, _SpiceClientView(connection_id=self.witness.session_id)
            )
            for name in self.witness.channels:
                view.channels.add(parse_channel_name(name))
        expected: set[tuple[int, int]] = set()
        for view in clients.values():
            expected |= view.channels
        link = LinkWait(
            timeout_s=req.link_timeout,
            channels_expected=_names(expected),
        )
        report.link_wait = link
        dst_spice.drain()  # destination events before client_migrate_info are not ours

        migrations_before = self.witness.migration_count if self.witness is not None else None

        # -- tell the client where to go ----------------------------------------------
        async with self.log.phase("client_migrate_info"):
            args: dict[str, object] = {"protocol": "spice", "hostname": req.client_host}
            if req.client_port is not None:
                args["port"] = req.client_port
            if req.client_tls_port is not None:
                args["tls-port"] = req.client_tls_port
            if req.client_cert_subject:
                args["cert-subject"] = req.client_cert_subject
            await src.execute("client_migrate_info", args)
        t_cmi = time.monotonic()

        record_task: asyncio.Task[ClientMigrationRecord] | None = None
        if self.witness is not None:
            record_task = asyncio.create_task(
                self.witness.next_migration(
                    req.link_timeout + req.completion_timeout + req.spice_completed_timeout + 30
                )
            )
        try:
            linked = await self._link_wait(dst_spice, clients, link, t_cmi, migrations_before)
            if not linked and req.require_seamless and clients:
                report.outcome = "cancelled"
                report.error_phase = "link-wait"
                report.error = (
                    f"the client did not link every channel to the destination within "
                    f"{req.link_timeout:g} s; --require-seamless: migration not started, "
                    "the VM is untouched"
                )
                source.status_after = await self._status(src)
                self._finish(report, clients, {}, {}, None, seamless_on)
                return report

            # -- capabilities, parameters, migrate --------------------------------------
            async with self.log.phase("parameters"):
                await self._set_parameters(src, report.migration)
            was_running = source.status_before == "running"
            t_migrate = time.monotonic()
            try:
                async with self.log.phase("migrate"):
                    await src.execute("migrate", {"uri": req.migrate_uri})
                async with self.log.phase("transfer") as timing:
                    final = await self._follow(src, src_mig, report.migration, t_migrate)
                    timing.detail = final
                    timing.ok = final == "completed"
            except (asyncio.CancelledError, KeyboardInterrupt):
                await self._recover(src, report, was_running, "interrupted")
                raise
            except errors.SpiceLibvirtError as exc:
                await self._recover(src, report, was_running, "migrate")
                report.error = report.error or str(exc)
                report.error_phase = report.error_phase or "migrate"
                final = report.migration.status or "failed"
            if report.migration.status != "completed":
                if report.source_resumed is None:
                    await self._recover(src, report, was_running, "migrate")
                await self._settle_failed(src_spice)
                record = await self._collect_record(record_task, 5.0)
                source.status_after = await self._status(src)
                destination.status_after = await self._status(dst)
                src_channels, _ = await self._spice_sessions(src)
                self._finish(report, clients, src_channels, {}, record, seamless_on)
                return report

            # -- SPICE hand-over, then the verdict --------------------------------------
            async with self.log.phase("spice-migrate-completed"):
                report.spice_migrate_completed = await self._wait_spice_completed(
                    src, src_spice, bool(clients)
                )
            t_done = time.monotonic()
            if report.migration.migrate_to_completed_ms is not None:
                completed_at = t_migrate + report.migration.migrate_to_completed_ms / 1000
                report.migration.completed_to_spice_ms = round((t_done - completed_at) * 1e3, 3)
            record = await self._collect_record(record_task, req.record_timeout)
            settle = req.settle
            if record is not None and record.path == "seamless" and len(clients) == 1:
                # the only client says it kept its session: nothing new can show up on
                # the destination, a short look for stray links is enough
                settle = min(settle, 0.1)
            async with self.log.phase("settle"):
                dst_seen = await self._settle(dst_spice, clients, settle)
            source.status_after = await self._status(src)
            destination.status_after = await self._status(dst)
            dst_channels, self._dst_tls = await self._spice_sessions(dst)
            for cid, chans in dst_seen.items():
                dst_channels.setdefault(cid, set()).update(chans)
            self._finish(report, clients, {}, dst_channels, record, seamless_on, witness_cid)
            return report
        finally:
            if record_task is not None and not record_task.done():
                record_task.cancel()
                with contextlib.suppress(BaseException):
                    await record_task

    # -- steps ------------------------------------------------------------------------

    async def _preflight(
        self,
        src: QMPConnection,
        dst: QMPConnection,
        source: Endpoint,
        destination: Endpoint,
        source_pid: int | None,
    ) -> bool | None:
        """Check both ends; raise MigrationError('preflight') without changing anything."""

        def fail(message: str) -> errors.MigrationError:
            return errors.MigrationError("preflight", message)

        for conn, end, role in ((src, source, "source"), (dst, destination, "destination")):
            version = await conn.execute_retrying("query-version")
            q = version.get("qemu", {})
            end.qemu_version = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
            end.status_before = (await conn.execute_retrying("query-status"))["status"]
            spice = await conn.execute_retrying("query-spice")
            if not spice.get("enabled"):
                raise fail(f"SPICE is not enabled on the {role} QEMU")
            end.spice_version = spice.get("compiled-version")
            end.spice_host = spice.get("host")
            end.spice_port = spice.get("port")
            end.spice_tls_port = spice.get("tls-port")
        if source.status_before not in ("running", "paused"):
            raise fail(f"the source is in state {source.status_before!r}, not running/paused")
        if destination.status_before != "inmigrate":
            raise fail(
                f"the destination is in state {destination.status_before!r}, not 'inmigrate' "
                "(start it with -incoming)"
            )
        mig = await src.execute_retrying("query-migrate")
        if mig.get("status") in ("setup", "active", "pre-switchover", "device", "cancelling"):
            raise fail(f"a migration is already running on the source ({mig.get('status')})")
        if source.qemu_version != destination.qemu_version:
            self.note(
                f"QEMU versions differ: source {source.qemu_version}, "
                f"destination {destination.qemu_version}"
            )
        if source.spice_version != destination.spice_version:
            self.note(
                f"spice-server versions differ: source {source.spice_version}, "
                f"destination {destination.spice_version}"
            )
        seamless_on = seamless_option_of(source_pid) if source_pid else None
        if seamless_on is False:
            message = "the source QEMU runs without -spice seamless-migration=on"
            if self.req.require_seamless:
                raise fail(message + " (--require-seamless)")
            self.note(message + ": the client can at best migrate semi-seamlessly")
        elif seamless_on is None:
            self.note("could not read the source command line: seamless-migration not checked")
        return seamless_on

    async def _source_clients(
        self, src: QMPConnection, src_spice: EventStream
    ) -> dict[int, _SpiceClientView]:
        """Clients on the source: query-spice plus SPICE_INITIALIZED seen since connect.

        query-spice may list fewer channels than the client has (test-guest.md pitfall 4),
        so both sources are merged.
        """
        clients: dict[int, _SpiceClientView] = {}
        for entry in (await src.execute_retrying("query-spice")).get("channels", []):
            got = _channels_of(entry)
            if got:
                view = clients.setdefault(got[0], _SpiceClientView(connection_id=got[0]))
                view.channels.add(got[1])
                view.tls = bool(entry.get("tls")) and view.tls is not False
        for event in src_spice.drain():
            if event.name != "SPICE_INITIALIZED":
                continue
            got = _channels_of(event.data)
            if got and got[0] in clients:
                clients[got[0]].channels.add(got[1])
        return clients

    async def _link_wait(
        self,
        dst_spice: EventStream,
        clients: dict[int, _SpiceClientView],
        link: LinkWait,
        t_cmi: float,
        migrations_before: int | None = None,
    ) -> bool:
        """Wait until the client(s) linked every channel to the destination; True if so."""
        req = self.req
        if not req.wait_client:
            link.skipped, link.result = True, "skipped"
            self.note("--no-wait-client: migrating without waiting for the client (diagnosis)")
            return False
        if not clients:
            link.result = "no-client"
            return True
        async with self.log.phase("link-wait") as timing:
            deadline = t_cmi + req.link_timeout
            linked: dict[int, set[tuple[int, int]]] = {cid: set() for cid in clients}

            def all_linked() -> bool:
                return all(linked[c] >= v.channels for c, v in clients.items())

            def absorb(event: QMPEvent) -> None:
                if event.name != "SPICE_INITIALIZED":
                    return
                got = _channels_of(event.data)
                if got and got[0] in linked:
                    linked[got[0]].add(got[1])

            witness_task: asyncio.Task[float | None] | None = None
            if self.witness is not None:
                link.signal = "embedded-client"
                witness_task = asyncio.create_task(
                    self.witness.wait_migration_connected(req.link_timeout, migrations_before)
                )
            else:
                link.signal = "qmp-destination"
            connected_at: float | None = None
            try:
                while True:
                    for event in dst_spice.drain():
                        absorb(event)
                    if witness_task is not None and witness_task.done():
                        try:
                            connected_at = witness_task.result()
                            if connected_at is None:
                                link.result = "connect-error"
                        except TimeoutError:
                            link.result = "timeout"
                        except errors.SpiceLibvirtError as exc:
                            self.note(f"embedded client: {exc}")
                            link.result = "connect-error"
                        break
                    if witness_task is None and all_linked():
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        link.result = "timeout"
                        break
                    with contextlib.suppress(errors.QMPError):
                        absorb(await dst_spice.get(timeout=min(left, 0.05)))
            finally:
                if witness_task is not None and not witness_task.done():
                    witness_task.cancel()
                    with contextlib.suppress(BaseException):
                        await witness_task
            for event in dst_spice.drain():
                absorb(event)
            link.channels_linked = _names(set().union(*linked.values()))
            end = connected_at if connected_at is not None else time.monotonic()
            link.duration_ms = round((end - t_cmi) * 1000.0, 3)
            if link.result in ("timeout", "connect-error"):
                timing.ok = False
                timing.detail = link.result
                self.note(
                    f"link wait: {link.result} after {link.duration_ms:.0f} ms; "
                    f"linked {link.channels_linked} of {link.channels_expected}"
                )
                return False
            link.result = "linked"
            if witness_task is not None:
                # the client has *sent* CONNECTED_SEAMLESS; it reaches the source half an
                # RTT later. The client measured its RTT to the source (TCP connect);
                # twice the one-way time covers jitter on the way.
                # (``rtt_estimate`` is optional in a witness: SpiceClient has it)
                rtt = getattr(self.witness, "rtt_estimate", None)
                rtt = rtt if isinstance(rtt, float) else DEFAULT_WITNESS_RTT
                grace = min(req.max_grace, req.embedded_grace + rtt)
                if not all_linked():
                    self.note(
                        "the embedded client reported CONNECTED_SEAMLESS before the destination "
                        f"showed every channel (saw {link.channels_linked})"
                    )
            else:
                # the destination sees the last link about one RTT before the source gets
                # MIGRATE_CONNECTED_SEAMLESS, and linking takes about 6 RTT + 50 ms
                # (rtt-seamless.md: margins of RTT + 100..250 ms worked), so a fraction of
                # the link time tracks the RTT without knowing it
                grace = min(req.max_grace, max(req.grace, 0.4 * (end - t_cmi)))
            link.grace_ms = round(grace * 1000.0, 3)
            timing.detail = f"linked in {link.duration_ms:.0f} ms, grace {link.grace_ms:.0f} ms"
            await asyncio.sleep(grace)
            return True

    async def _set_parameters(self, src: QMPConnection, figures: MigrationFigures) -> None:
        await src.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events", "state": True}]},
        )
        params: dict[str, object] = {}
        if self.req.downtime_limit_ms is not None:
            params["downtime-limit"] = self.req.downtime_limit_ms
        if self.req.max_bandwidth is not None:
            params["max-bandwidth"] = self.req.max_bandwidth
        if params:
            await src.execute("migrate-set-parameters", params)
        current = await src.execute_retrying("query-migrate-parameters")
        figures.downtime_limit_ms = current.get("downtime-limit")
        figures.max_bandwidth = current.get("max-bandwidth")

    async def _follow(
        self,
        src: QMPConnection,
        src_mig: EventStream,
        figures: MigrationFigures,
        t_migrate: float,
    ) -> str:
        """Follow the migration to a final state; cancel it if it exceeds its bound."""
        req = self.req
        deadline = t_migrate + req.completion_timeout
        status = "setup"
        info: dict[str, Any] = {}
        while True:
            # events first: MIGRATION carries the state change the moment it happens
            with contextlib.suppress(errors.QMPError):
                event = await src_mig.get(timeout=req.poll_interval)
                if event.name == "MIGRATION":
                    status = str(event.data.get("status", status))
                    if status in FINAL_STATES and status == "completed":
                        figures.migrate_to_completed_ms = round(
                            (event.received - t_migrate) * 1000.0, 3
                        )
            try:
                info = await src.execute_retrying("query-migrate")
            except QMPDisconnectedError:
                figures.status = "failed"
                figures.error_desc = "the source QEMU went away during the migration"
                raise
            status = str(info.get("status", status))
            self.reporter.update(MigrationProgress.from_query(info))
            if status in FINAL_STATES:
                break
            if time.monotonic() > deadline:
                self.note(f"migration not finished after {req.completion_timeout:g} s: cancel")
                status = await self._cancel(src, src_mig)
                info = await src.execute_retrying("query-migrate")
                status = str(info.get("status", status))
                if status == "completed":  # it made it after all
                    break
                figures.status = status
                self._fill_figures(figures, info)
                figures.error_desc = figures.error_desc or "completion timeout"
                return status
        if status == "completed" and figures.migrate_to_completed_ms is None:
            figures.migrate_to_completed_ms = round((time.monotonic() - t_migrate) * 1e3, 3)
        if status == "completed":
            # QEMU sets COMPLETED before it computes total-time/downtime (migration
            # cleanup): ask again briefly until the figures are in
            for _ in range(20):
                if info.get("total-time"):
                    break
                await asyncio.sleep(0.025)
                info = await src.execute_retrying("query-migrate")
        figures.status = status
        self._fill_figures(figures, info)
        return status

    @staticmethod
    def _fill_figures(figures: MigrationFigures, info: dict[str, Any]) -> None:
        ram: dict[str, Any] = info.get("ram") or {}
        figures.total_time_ms = info.get("total-time", figures.total_time_ms)
        figures.downtime_ms = info.get("downtime", figures.downtime_ms)
        figures.setup_time_ms = info.get("setup-time", figures.setup_time_ms)
        figures.transferred_bytes = ram.get("transferred", figures.transferred_bytes)
        figures.total_bytes = ram.get("total", figures.total_bytes)
        figures.normal_pages = ram.get("normal", figures.normal_pages)
        figures.duplicate_pages = ram.get("duplicate", figures.duplicate_pages)
        figures.mbps = ram.get("mbps", figures.mbps)
        figures.passes = ram.get("dirty-sync-count", figures.passes)
        figures.dirty_pages_rate = ram.get("dirty-pages-rate", figures.dirty_pages_rate)
        if info.get("error-desc"):
            figures.error_desc = str(info["error-desc"])

    async def _cancel(self, src: QMPConnection, src_mig: EventStream) -> str:
        """migrate_cancel and wait (bounded) for a final state."""
        with contextlib.suppress(errors.QMPError):
            await src.execute("migrate_cancel")
        deadline = time.monotonic() + self.req.cancel_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(errors.QMPError):
                info = await src.execute("query-migrate", timeout=2)
                status = str(info.get("status", ""))
                if status in FINAL_STATES or status == "none":
                    return status
            with contextlib.suppress(errors.QMPError):
                await src_mig.get(timeout=0.05)
        return "cancelling"

    async def _recover(
        self, src: QMPConnection, report: MigrationReport, was_running: bool, phase: str
    ) -> None:
        """After a failure: cancel what still runs, resume the source if it ran before."""
        figures = report.migration
        try:
            info = await src.execute("query-migrate", timeout=3)
            status = str(info.get("status", "none"))
            if status not in FINAL_STATES and status != "none":
                self.note(f"{phase}: cancelling the migration (state {status})")
                async with src.events("MIGRATION") as stream:
                    status = await self._cancel(src, stream)
                info = await src.execute("query-migrate", timeout=3)
                status = str(info.get("status", status))
                report.error_phase = report.error_phase or phase
            figures.status = status if status != "none" else figures.status or "failed"
            self._fill_figures(figures, info)
            state = (await src.execute("query-status", timeout=3))["status"]
            if was_running and state not in ("running",) and status != "completed":
                self.note(f"source is {state!r} after the failure: resuming it")
                await src.execute("cont", timeout=5)
                state = (await src.execute("query-status", timeout=3))["status"]
            report.source_resumed = state == "running" if was_running else None
        except errors.QMPError as exc:
            report.source_resumed = False
            self.note(f"recovery on the source failed: {exc}")

    async def _wait_spice_completed(
        self, src: QMPConnection, src_spice: EventStream, had_clients: bool
    ) -> bool:
        """SPICE_MIGRATE_COMPLETED on the source, or ``query-spice.migrated``, bounded."""
        deadline = time.monotonic() + self.req.spice_completed_timeout
        for event in src_spice.history:
            if event.name == "SPICE_MIGRATE_COMPLETED":
                return True
        while time.monotonic() < deadline:
            with contextlib.suppress(errors.QMPError):
                event = await src_spice.get(timeout=0.2)
                if event.name == "SPICE_MIGRATE_COMPLETED":
                    return True
            with contextlib.suppress(errors.QMPError):
                if (await src.execute("query-spice", timeout=2)).get("migrated"):
                    return True
        self.note(
            f"no SPICE_MIGRATE_COMPLETED within {self.req.spice_completed_timeout:g} s"
            + ("" if had_clients else " (no client was connected)")
        )
        return False

    async def _settle(
        self, dst_spice: EventStream, clients: dict[int, _SpiceClientView], settle: float
    ) -> dict[int, set[tuple[int, int]]]:
        """Watch the destination for ``settle`` s: a new connection id means SWITCH_HOST."""
        seen: dict[int, set[tuple[int, int]]] = {}

        def absorb(event: QMPEvent) -> None:
            if event.name == "SPICE_INITIALIZED":
                got = _channels_of(event.data)
                if got:
                    seen.setdefault(got[0], set()).add(got[1])

        for event in dst_spice.history:
            absorb(event)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            with contextlib.suppress(errors.QMPError):
                absorb(await dst_spice.get(timeout=max(0.01, deadline - time.monotonic())))
            new_ids = set(seen) - set(clients)
            if new_ids and all(seen[c] >= {(1, 0)} for c in new_ids):
                # a fresh main link arrived; give its other channels a moment to follow
                await asyncio.sleep(0.2)
                for event in dst_spice.drain():
                    absorb(event)
                break
        return seen

    async def _settle_failed(self, src_spice: EventStream) -> None:
        """After a failed migration give spice-server a moment to MIGRATE_CANCEL the client."""
        await asyncio.sleep(min(self.req.settle, 0.5))
        src_spice.drain()

    async def _collect_record(
        self, task: asyncio.Task[ClientMigrationRecord] | None, timeout: float
    ) -> ClientMigrationRecord | None:
        if task is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            self.note(f"the embedded client gave no migration record within {timeout:g} s")
        except errors.SpiceLibvirtError as exc:
            self.note(f"the embedded client failed: {exc}")
        return None

    @staticmethod
    async def _status(conn: QMPConnection) -> str | None:
        try:
            return str((await conn.execute("query-status", timeout=3))["status"])
        except errors.QMPError:
            return None

    @staticmethod
    async def _spice_sessions(
        conn: QMPConnection,
    ) -> tuple[dict[int, set[tuple[int, int]]], dict[int, bool]]:
        """One ``query-spice``: per connection id its channels, and whether all use TLS."""
        channels: dict[int, set[tuple[int, int]]] = {}
        tls: dict[int, bool] = {}
        try:
            spice = await conn.execute("query-spice", timeout=3)
        except errors.QMPError:
            return channels, tls
        for entry in spice.get("channels", []):
            got = _channels_of(entry)
            if got:
                channels.setdefault(got[0], set()).add(got[1])
                tls[got[0]] = tls.get(got[0], True) and bool(entry.get("tls"))
        return channels, tls

    # -- the verdict ------------------------------------------------------------------

    def _finish(
        self,
        report: MigrationReport,
        clients: dict[int, _SpiceClientView],
        src_after: dict[int, set[tuple[int, int]]],
        dst_after: dict[int, set[tuple[int, int]]],
        record: ClientMigrationRecord | None,
        seamless_on: bool | None,
        witness_cid: int | None = None,
    ) -> None:
        status = report.migration.status
        completed = status == "completed"
        linked_ok = report.link_wait.result == "linked"
        verdicts: list[ClientVerdict] = []
        known = set(clients)
        new_ids = sorted(set(dst_after) - known)
        for cid, view in clients.items():
            embedded = witness_cid is not None and cid == witness_cid
            verdict = ClientVerdict(
                kind="embedded" if embedded else "external",
                path="none",
                connection_id_before=cid,
                channels_before=_names(view.channels),
                linked_before_migrate=linked_ok,
                tls_before=view.tls,
            )
            if completed:
                if cid in dst_after:
                    verdict.connection_id_after = cid
                    verdict.connection_id_kept = True
                    verdict.channels_after = _names(dst_after[cid])
                    verdict.path = "semi-seamless" if seamless_on is False else "seamless"
                    if new_ids:
                        # the old links may linger while a fresh session comes up
                        verdict.connection_id_after = new_ids[0]
                        verdict.connection_id_kept = False
                        verdict.channels_after = _names(dst_after[new_ids[0]])
                        verdict.path = "switch-host"
                elif new_ids:
                    verdict.connection_id_after = new_ids[0]
                    verdict.channels_after = _names(dst_after[new_ids[0]])
                    verdict.path = "switch-host"
                else:
                    verdict.path = "failed"
                    verdict.note = "the client is not connected to the destination"
                if verdict.path == "seamless" and seamless_on is None and not embedded:
                    verdict.note = (
                        "QMP evidence only: connection id kept on the destination "
                        "(seamless and semi-seamless look alike from QMP)"
                    )
            else:
                verdict.path = "cancelled" if status == "cancelled" else "failed"
                if cid in src_after:
                    verdict.connection_id_after = cid
                    verdict.connection_id_kept = True
                    verdict.channels_after = _names(src_after[cid])
                    verdict.note = "the client stayed on the source"
            if verdict.connection_id_after is not None:
                verdict.tls_after = self._dst_tls.get(verdict.connection_id_after)
            if embedded and self.witness is not None:
                verdict.evidence = "client-record"
                verdict.stream = self.witness.stream_stats()
                report.stream = verdict.stream
                if record is not None:
                    verdict.record = record
                    verdict.blackout_ms = dict(record.blackout_ms)
                    if record.channels_before:
                        verdict.channels_before = list(record.channels_before)
                    if completed:
                        verdict.path = self._embedded_path(verdict, record)
                elif completed:
                    # QMP may show the id kept, but the client itself never finished its
                    # hand-over (e.g. a channel lost before MIGRATE_DATA): not seamless,
                    # and not a switch-host either
                    verdict.note = (
                        "the embedded client did not finish its migration (no record); "
                        f"QMP alone would say {verdict.path}"
                    )
                    verdict.path = "failed"
                else:
                    verdict.note = "no record from the embedded client"
            verdicts.append(verdict)
        report.clients = verdicts
        cancelled = status == "cancelled" or report.error_phase == "link-wait"
        report.outcome = (
            "cancelled"
            if report.error_phase == "link-wait"
            else classify_outcome(status, verdicts, cancelled=cancelled)
        )
        stream = report.stream
        broken = stream is not None and bool(stream.gaps or stream.duplicates)
        if report.outcome == "seamless" and stream is not None and broken:
            # the protocol path was seamless but guest data was lost or repeated: the
            # promise of seamless migration was not kept, so the verdict must not say so
            self.note(
                f"stream continuity broken: {stream.gaps} gaps, {stream.duplicates} duplicates"
            )
            report.outcome = "failed"
        report.seamless = report.outcome == "seamless"
        self.log.fill(report)

    def _embedded_path(self, verdict: ClientVerdict, record: ClientMigrationRecord) -> ClientPath:
        """Cross-check the embedded client's own path with what QMP showed."""
        if record.path == "seamless":
            if not embedded_path_is_seamless(record):
                self.note(
                    "the embedded client claimed seamless without BEGIN_SEAMLESS, MIGRATE and "
                    "MIGRATE_DATA all in its steps, or without keeping its connection id"
                )
                return "failed"
            if not verdict.connection_id_kept:
                self.note("the embedded client says seamless but QMP shows a new connection id")
                return "switch-host"
            return "seamless"
        if record.connection_id_after is not None:
            verdict.connection_id_after = record.connection_id_after
            verdict.connection_id_kept = record.connection_id_kept
        return record.path


async def migrate_qemu(
    request: MigrationRequest,
    witness: MigrationWitness | None = None,
    reporter: ProgressReporter | None = None,
) -> MigrationReport:
    """Migrate one QEMU to another over QMP, waiting for the SPICE client; return the verdict.

    :raise QMPConnectError: a QMP socket could not be reached.
    :raise MigrationError: preflight refused (nothing was changed).
    """
    return await QemuMigrationController(request, witness, reporter).run()


__all__ = [
    "MigrationRequest",
    "MigrationWitness",
    "QemuMigrationController",
    "migrate_qemu",
]
