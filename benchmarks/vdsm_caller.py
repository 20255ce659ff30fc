"""A VDSM-like migration caller: drain domains off a host the way oVirt's VDSM does.

Written from VDSM's behaviour as ``vdsm-migration-facts.md`` (shared docs) sets it out --
not from its code -- so that the host agent can be measured against the caller most
oVirt hosts have. Per domain, in VDSM's order:

1. take one of the host's outgoing-migration slots (``max_outgoing_migrations`` = 2);
2. start the monitor: the convergence schedule's ``init`` action at once
   (``migrateSetMaxDowntime``), then a look at ``jobStats`` every ``--monitor-interval``
   (VDSM: 10 s); on a look where libvirt's memory-iteration counter rose, the schedule's
   head step runs if its limit is below the count (at most one step per look):
   ``setDowntime`` -> ``migrateSetMaxDowntime``, ``postcopy`` -> ``migrateStartPostCopy``,
   ``abort`` -> ``abortJob``;
3. just before the call, if the domain has SPICE and a client is connected, extend the
   ticket's expiry to at least now + 120 s with ``connected='keep'`` (``updateDeviceFlags``
   of the secure XML's ``<graphics>``; VDSM's ``reviveTicket``);
4. one blocking ``migrateToURI3(qemu+tcp://DST/system, params, flags)`` with
   ``LIVE|PEER2PEER|PERSIST_DEST|ABORT_ON_ERROR`` (plus ``AUTO_CONVERGE``/``COMPRESSED``/
   ``POSTCOPY``/``TUNNELLED`` as the policy and options say) and the params VDSM sets:
   ``BANDWIDTH`` (52 MiB/s), ``URI`` (``tcp://DST``, unless tunnelled), ``DEST_XML``
   (the migratable XML) and ``GRAPHICS_URI`` only when a console address is configured
   (by default none: libvirt relocates the client from its migration cookie).

Not done (VDSM's, not libvirt's): the destination VDSM's ``migrationCreate`` (libvirt's own
Prepare phase defines the domain there), Engine's events, the desktop lock on disconnect.

Policies (Engine's built-ins): ``legacy`` (VDSM's own schedule without Engine: 101, 104,
120, 189, 500 ms, then abort), ``minimal`` (Minimal downtime), ``suspend`` (Suspend
workload if needed: auto-converge + compression, last step 5 s downtime), ``postcopy``
(Post-copy migration: the POSTCOPY flag, last step switches to post-copy).

Each domain's record (``--json``: one JSON line per domain) lists every action the caller
took and what libvirt reported back at each look, so a test can check that its schedule and
bandwidth were respected whatever else held the migration meanwhile::

    .venv/bin/python benchmarks/vdsm_caller.py --source qemu+unix:///system?socket=... \\
        --destination hostB vm-1 vm-2 vm-3 --json
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a file: benchutil puts the repository on sys.path
    import benchutil  # type: ignore[import-not-found]  # noqa: F401

import argparse
import dataclasses
import datetime as dt
import json
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import Any

from spice_libvirt.migration.switchover import HOLD_DOWNTIME_MS, HOLD_SPEED_MIBS

#: VDSM's defaults (``vdsm/common/config.py.in``)
MAX_BANDWIDTH_MIBS = 52
MAX_OUTGOING_MIGRATIONS = 2
MONITOR_INTERVAL_S = 10.0
MIGRATION_DOWNTIME_MS = 500
MIGRATION_DOWNTIME_STEPS = 5
SPICE_MIGRATION_HANDOVER_TIME_S = 120
TICKET_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


@dataclasses.dataclass(frozen=True)
class Step:
    """One stalling step: run ``action`` (with ``value``) once the count exceeds ``limit``
    (-1: at the next rise)."""

    limit: int
    action: str  # setDowntime, postcopy, abort
    value: int = 0


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    init_downtime_ms: int
    steps: tuple[Step, ...]
    auto_converge: bool = False
    compressed: bool = False

    @property
    def postcopy(self) -> bool:
        return any(s.action == "postcopy" for s in self.steps)


def exponential_downtime(downtime_ms: int, steps: int) -> list[int]:
    """VDSM's legacy downtime steps: offset D/n, then offset + base**i with
    base = (D - offset) ** (1 / (n - 1)); 500 ms in 5 steps gives 101, 104, 120, 189, 500."""
    offset = downtime_ms / steps
    base = (downtime_ms - offset) ** (1.0 / (steps - 1))
    return [int(offset + base**i) for i in range(steps)]


def _minimal_steps() -> tuple[Step, ...]:
    pairs = ((1, 150), (2, 200), (3, 300), (4, 400), (6, 500))
    return tuple(Step(limit, "setDowntime", ms) for limit, ms in pairs)


def policies() -> dict[str, Policy]:
    legacy = exponential_downtime(MIGRATION_DOWNTIME_MS, MIGRATION_DOWNTIME_STEPS)
    legacy_steps = [Step(i, "setDowntime", ms) for i, ms in enumerate(legacy[1:], start=1)]
    legacy_steps += [Step(42, "setDowntime", legacy[-1]), Step(-1, "abort")]
    return {
        "legacy": Policy("legacy", legacy[0], tuple(legacy_steps)),
        "minimal": Policy(
            "minimal", 100, (*_minimal_steps(), Step(-1, "abort")), auto_converge=True
        ),
        "suspend": Policy(
            "suspend",
            100,
            (*_minimal_steps(), Step(-1, "setDowntime", 5000), Step(-1, "abort")),
            auto_converge=True,
            compressed=True,
        ),
        "postcopy": Policy(
            "postcopy",
            100,
            (
                Step(1, "setDowntime", 150),
                Step(2, "setDowntime", 200),
                Step(-1, "postcopy"),
                Step(-1, "abort"),
            ),
            auto_converge=True,
        ),
    }


@dataclasses.dataclass
class Options:
    source_uri: str
    #: the destination host as the source libvirtd reaches it (its name or address)
    destination: str
    bandwidth_mibs: int = MAX_BANDWIDTH_MIBS
    max_outgoing: int = MAX_OUTGOING_MIGRATIONS
    monitor_interval_s: float = MONITOR_INTERVAL_S
    policy: str = "legacy"
    console_address: str | None = None
    tunnelled: bool = False
    #: VDSM revives the ticket only when its graphics events showed a client (``client_ip``)
    client_connected: bool = True
    #: the destination libvirtd's URI scheme (VDSM: qemu+tls when ``ssl``, else qemu+tcp)
    transport: str = "tcp"


@dataclasses.dataclass
class DomainRecord:
    """What the caller did for one domain, and what libvirt said."""

    domain: str
    policy: str
    flags: list[str] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    queued_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    ok: bool = False
    error: str | None = None
    ticket: str = ""
    #: the caller's actions: {"t": s after start, "action": ..., "value": ..., "count": ...}
    actions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: each look of the monitor: {"t", "iteration", "remaining", "speed_mibs", "downtime_ms"}
    looks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: the downtime the schedule had set last (what must be in force after any hold)
    downtime_ms: int | None = None

    @property
    def wall_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return round(self.ended_at - self.started_at, 3)

    def looks_after_hold(self) -> list[dict[str, Any]]:
        """The monitor's looks once the memory moved and a host agent's hold was off (the
        hold is the speed floor, or the caller's speed with a 1 ms downtime until the client
        linked): where the caller's own values must be in force."""
        moving = [look for look in self.looks if look["remaining"] > 0]
        held = [
            i
            for i, look in enumerate(moving)
            if look["speed_mibs"] == HOLD_SPEED_MIBS or look["downtime_ms"] == HOLD_DOWNTIME_MS
        ]
        return moving[held[-1] + 1 :] if held else moving

    def downtimes_set_by(self, t: float) -> set[int]:
        """Every downtime the schedule had set by ``t`` (s after the start; the monitor looks
        and steps in one loop, so an action a moment after a look may already show)."""
        return {
            int(a["value"])
            for a in self.actions
            if a["action"] == "setDowntime" and a["t"] <= t + 0.5
        }

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["wall_s"] = self.wall_s
        return data


def _libvirt() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def migration_flags(lv: Any, policy: Policy, options: Options) -> tuple[int, list[str]]:
    names = ["LIVE", "PEER2PEER", "PERSIST_DEST", "ABORT_ON_ERROR"]
    if policy.auto_converge:
        names.append("AUTO_CONVERGE")
    if policy.compressed:
        names.append("COMPRESSED")
    if policy.postcopy:
        names.append("POSTCOPY")
    if options.tunnelled:
        names.append("TUNNELLED")
    flags = 0
    for name in names:
        flags |= getattr(lv, f"VIR_MIGRATE_{name}")
    return flags, names


def migration_params(lv: Any, dom: Any, options: Options) -> tuple[dict[str, Any], dict[str, Any]]:
    """libvirt's params, and their JSON-able record (the XML only by its length)."""
    params: dict[str, Any] = {}
    if options.bandwidth_mibs:
        params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = options.bandwidth_mibs
    if not options.tunnelled:
        params[lv.VIR_MIGRATE_PARAM_URI] = f"tcp://{options.destination}"
    if options.console_address:
        params[lv.VIR_MIGRATE_PARAM_GRAPHICS_URI] = f"spice://{options.console_address}"
    params[lv.VIR_MIGRATE_PARAM_DEST_XML] = dom.XMLDesc(lv.VIR_DOMAIN_XML_MIGRATABLE)
    record = {k: (f"<{len(v)} chars>" if k == lv.VIR_MIGRATE_PARAM_DEST_XML else v)
              for k, v in params.items()}  # fmt: skip
    return params, record


def revive_ticket(lv: Any, dom: Any, seconds: int, now: dt.datetime | None = None) -> str:
    """VDSM's ``reviveTicket``: the SPICE ticket valid until at least now + ``seconds``,
    the connected client kept. Returns what was done (for the record)."""
    root = ET.fromstring(dom.XMLDesc(lv.VIR_DOMAIN_XML_SECURE))
    graphics = next((g for g in root.iter("graphics") if g.get("type") == "spice"), None)
    if graphics is None:
        return "no SPICE graphics"
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    wanted = now + dt.timedelta(seconds=seconds)
    current = graphics.get("passwdValidTo")
    if current:
        # VDSM parses it unguarded; an unparsable value fails the migration there too
        wanted = max(wanted, dt.datetime.strptime(current[:19], TICKET_TIME_FORMAT))
    graphics.set("passwdValidTo", wanted.strftime(TICKET_TIME_FORMAT))
    graphics.set("connected", "keep")
    dom.updateDeviceFlags(ET.tostring(graphics, encoding="unicode"), 0)
    return f"passwdValidTo {wanted.strftime(TICKET_TIME_FORMAT)}, connected=keep"


class Monitor(threading.Thread):
    """VDSM's MonitorThread: the schedule's steps, at most one per look, on a rise."""

    def __init__(
        self, lv: Any, dom: Any, policy: Policy, record: DomainRecord, interval: float
    ) -> None:
        super().__init__(name=f"monitor {record.domain}", daemon=True)
        self.lv, self.dom, self.record, self.interval = lv, dom, record, interval
        self.steps = list(policy.steps)
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def act(self, action: str, value: int, count: int) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 3), "action": action, "value": value,
                 "count": count}  # fmt: skip
        try:
            if action == "setDowntime":
                self.dom.migrateSetMaxDowntime(value, 0)
                self.record.downtime_ms = value
            elif action == "postcopy":
                self.dom.migrateStartPostCopy(0)
            elif action == "abort":
                self.dom.abortJob()
                self.stop.set()
        except self.lv.libvirtError as exc:
            entry["error"] = str(exc)
        self.record.actions.append(entry)

    def look(self) -> dict[str, Any] | None:
        try:
            stats = self.dom.jobStats(0)
            speed = self.dom.migrateGetMaxSpeed(0)
            downtime = self.dom.migrateGetMaxDowntime(0)
        except self.lv.libvirtError:
            return None
        if stats.get("type", 0) in (0, None) or speed is None or downtime is None:
            return None  # no job (yet), or it just ended
        look = {
            "t": round(time.monotonic() - self.t0, 3),
            "iteration": int(stats.get("memory_iteration", 0)),
            "remaining": int(stats.get("memory_remaining", 0)),
            "speed_mibs": int(speed),
            "downtime_ms": int(downtime),
        }
        self.record.looks.append(look)
        return look

    def run(self) -> None:
        first: int | None = None
        last_count = 0
        while not self.stop.wait(self.interval):
            look = self.look()
            if look is None:
                continue
            if first is None:
                first = look["iteration"]
            count = look["iteration"] - first
            if count > last_count and self.steps and self.steps[0].limit < count:
                step = self.steps.pop(0)
                self.act(step.action, step.value, count)
            last_count = max(last_count, count)


class Caller:
    """Drains domains off one source host, VDSM's way (``max_outgoing`` at a time)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.lv = _libvirt()
        self.policy = policies()[options.policy]
        self.slots = threading.BoundedSemaphore(options.max_outgoing)

    def migrate(
        self, name: str, on_done: Callable[[DomainRecord], None] | None = None
    ) -> DomainRecord:
        lv, options, policy = self.lv, self.options, self.policy
        record = DomainRecord(domain=name, policy=policy.name, queued_at=time.time())
        conn = lv.open(options.source_uri)
        try:
            dom = conn.lookupByName(name)
            flags, record.flags = migration_flags(lv, policy, options)
            with self.slots:
                record.started_at = time.monotonic()
                monitor = Monitor(lv, dom, policy, record, options.monitor_interval_s)
                monitor.act("setDowntime", policy.init_downtime_ms, 0)  # the init action
                monitor.start()
                try:
                    if options.client_connected:
                        record.ticket = revive_ticket(lv, dom, SPICE_MIGRATION_HANDOVER_TIME_S)
                    params, record.params = migration_params(lv, dom, options)
                    duri = f"qemu+{options.transport}://{options.destination}/system"
                    dom.migrateToURI3(duri, params, flags)
                    record.ok = True
                except lv.libvirtError as exc:
                    record.error = str(exc)
                finally:
                    monitor.stop.set()
                    monitor.join(5.0)
                    record.ended_at = time.monotonic()
        except lv.libvirtError as exc:
            record.error = record.error or str(exc)
        finally:
            conn.close()
        if on_done is not None:
            on_done(record)
        return record

    def drain(
        self, names: Sequence[str], on_done: Callable[[DomainRecord], None] | None = None
    ) -> list[DomainRecord]:
        """Every domain, each in its own thread as VDSM's SourceThreads; the slots limit
        how many run at once. Records in the order given."""
        records: dict[str, DomainRecord] = {}

        def one(name: str) -> None:
            records[name] = self.migrate(name, on_done)

        threads = [threading.Thread(target=one, args=(n,), name=f"source {n}") for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [records[n] for n in names]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("domains", nargs="+", metavar="DOMAIN", help="domains to migrate")
    p.add_argument("--source", required=True, metavar="URI", help="the source libvirtd")
    p.add_argument(
        "--destination", required=True, metavar="HOST",
        help="the destination host as the source libvirtd reaches it",
    )  # fmt: skip
    p.add_argument("--bandwidth", type=int, default=MAX_BANDWIDTH_MIBS, metavar="MIBS",
                   help=f"BANDWIDTH param (VDSM's default {MAX_BANDWIDTH_MIBS}; 0: none)")  # fmt: skip
    p.add_argument("--max-outgoing", type=int, default=MAX_OUTGOING_MIGRATIONS, metavar="N",
                   help="outgoing migrations at once (VDSM: 2)")  # fmt: skip
    p.add_argument("--monitor-interval", type=float, default=MONITOR_INTERVAL_S, metavar="S",
                   help="seconds between the monitor's looks (VDSM: 10)")  # fmt: skip
    p.add_argument("--policy", choices=sorted(policies()), default="legacy",
                   help="convergence schedule (Engine's built-in policies; legacy: VDSM's own)")  # fmt: skip
    p.add_argument("--console-address", metavar="ADDR",
                   help="send GRAPHICS_URI spice://ADDR (default: none, as Engine)")  # fmt: skip
    p.add_argument("--tunnelled", action="store_true", help="VIR_MIGRATE_TUNNELLED, no URI")
    p.add_argument("--transport", default="tcp", choices=("tcp", "tls"),
                   help="destination libvirtd URI scheme (VDSM: tls when ssl is on)")  # fmt: skip
    p.add_argument("--no-client", action="store_true",
                   help="no client connected: the ticket is not revived")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON line per domain")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.max_outgoing < 1 or args.monitor_interval <= 0 or args.bandwidth < 0:
        print("vdsm_caller: --max-outgoing >= 1, --monitor-interval > 0, --bandwidth >= 0",
              file=sys.stderr)  # fmt: skip
        return 2
    options = Options(
        source_uri=args.source,
        destination=args.destination,
        bandwidth_mibs=args.bandwidth,
        max_outgoing=args.max_outgoing,
        monitor_interval_s=args.monitor_interval,
        policy=args.policy,
        console_address=args.console_address,
        tunnelled=args.tunnelled,
        client_connected=not args.no_client,
        transport=args.transport,
    )
    lock = threading.Lock()

    def done(record: DomainRecord) -> None:
        with lock:
            if args.json:
                print(json.dumps(record.as_json()), flush=True)
            else:
                state = "ok" if record.ok else f"FAILED: {record.error}"
                print(f"{record.domain}: {state} in {record.wall_s} s", flush=True)

    try:
        records = Caller(options).drain(args.domains, done)
    except Exception as exc:  # libvirt unreachable and the like: one line, exit 3
        print(f"vdsm_caller: {exc}", file=sys.stderr)
        return 3
    return 0 if all(r.ok for r in records) else 7


if __name__ == "__main__":
    sys.exit(main())
