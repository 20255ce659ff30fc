"""The one verdict (``migration/verdict.py``), table-driven, without QEMU.

Both controllers hand their evidence to :func:`judge`; these tables are therefore the rules
of both paths. Each row is one kind of evidence and the verdict it must give.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from typing import Any

import pytest

from spice_libvirt.migration.evidence import Channel, Sessions, SpiceSession
from spice_libvirt.migration.report import Endpoint, MigrationReport
from spice_libvirt.migration.verdict import Settling, VerdictEvidence, judge, settled
from spice_libvirt.spice.record import ClientMigrationRecord, PathStep, StreamStats

#: above 2**31: QEMU prints it negative; the verdict must use the unsigned form
CID = 0xDEADBEEF
NEW = 7
#: deliberately not in protocol order: the verdict sorts
CHANNELS: list[Channel] = [(10, 0), (2, 0), (1, 0), (4, 0), (3, 0)]
NAMES = ["main:0", "display:0", "inputs:0", "cursor:0", "port:0"]


def session(cid: int, tls: bool | None = False, channels: list[Channel] = CHANNELS) -> SpiceSession:
    return SpiceSession(cid, dict.fromkeys(channels, tls))


def sessions(*items: SpiceSession) -> Sessions:
    return {s.connection_id: s for s in items}


AFTER: dict[str, Sessions | None] = {
    "kept": sessions(session(CID)),
    "new": sessions(session(NEW)),
    "kept+new": sessions(session(CID), session(NEW)),
    "gone": {},
    "unobserved": None,
}


def record(
    path: str = "seamless",
    *,
    steps: tuple[str, ...] = ("MIGRATE_BEGIN_SEAMLESS", "MIGRATE", "MIGRATE_DATA"),
    kept: bool = True,
    after: int | None = CID,
) -> ClientMigrationRecord:
    return ClientMigrationRecord.model_validate(
        {
            "path": path,
            "connection_id_before": CID,
            "connection_id_after": after,
            "connection_id_kept": kept,
            "steps": [
                PathStep(t_ms=float(i), channel="main:0", side="src", direction="rx", message=m)
                for i, m in enumerate(steps)
            ],
            "blackout_ms": {"display:0": 12.5},
        }
    )


RECORDS: dict[str, ClientMigrationRecord | None] = {
    "none": None,
    "seamless": record(),
    "seamless-without-data": record(steps=("MIGRATE_BEGIN_SEAMLESS", "MIGRATE")),
    "semi-seamless": record("semi-seamless"),
    "switch-host": record("switch-host", kept=False, after=NEW),
    "saw-nothing": record("none", steps=(), kept=False, after=None),
    "cancelled": record("cancelled", steps=("MIGRATE_BEGIN_SEAMLESS", "MIGRATE_CANCEL")),
}


def evidence(
    status: str | None = "completed",
    after: str = "kept",
    *,
    option: bool | None = True,
    embedded: bool = False,
    rec: str = "none",
    gaps: int = 0,
    aborted: bool = False,
) -> VerdictEvidence:
    return VerdictEvidence(
        status=status,
        before=sessions(session(CID)),
        after=AFTER[after],
        linked=True,
        aborted_before_migrate=aborted,
        seamless_option=option,
        embedded_id=CID if embedded else None,
        record=RECORDS[rec] if embedded else None,
        stream=StreamStats(records=10, gaps=gaps) if embedded else None,
    )


# ------------------------------------------------------------------ a client we do not drive

EXTERNAL = [
    # status, after, seamless option, path, outcome, id after, kept
    ("completed", "kept", True, "seamless", "seamless", CID, True),
    ("completed", "kept", None, "seamless", "seamless", CID, True),
    ("completed", "kept", False, "semi-seamless", "semi-seamless", CID, True),
    ("completed", "new", True, "switch-host", "switch-host", NEW, False),
    ("completed", "kept+new", True, "switch-host", "switch-host", NEW, False),
    ("completed", "gone", True, "lost", "client-lost", None, False),
    ("completed", "unobserved", True, "failed", "failed", None, False),
    ("failed", "kept", True, "failed", "failed", CID, True),
    ("failed", "gone", True, "failed", "failed", None, False),
    ("cancelled", "kept", True, "cancelled", "cancelled", CID, True),
    (None, "unobserved", None, "failed", "failed", None, False),
]


@pytest.mark.parametrize(
    ("status", "after", "option", "path", "outcome", "id_after", "kept"), EXTERNAL
)
def test_external_client(
    status: str | None,
    after: str,
    option: bool | None,
    path: str,
    outcome: str,
    id_after: int | None,
    kept: bool,
) -> None:
    v = judge(evidence(status, after, option=option))
    [c] = v.clients
    assert (c.kind, c.evidence) == ("external", "qmp")
    assert c.path == path
    assert v.outcome == outcome
    assert v.seamless is (outcome == "seamless")
    assert c.connection_id_before == CID
    assert c.connection_id_after == id_after
    assert c.connection_id_kept is kept
    assert c.channels_before == NAMES
    assert c.channels_after == (NAMES if id_after is not None else [])
    if status == "completed" and after == "kept" and option is None:
        assert c.note is not None
        assert "look alike" in c.note
    if status != "completed" and after == "kept":
        assert c.note == "the client stayed on the source"


def test_aborted_before_migrate_is_cancelled_and_the_client_stays() -> None:
    v = judge(evidence(None, "kept", aborted=True))
    [c] = v.clients
    assert v.outcome == "cancelled"
    assert c.path == "cancelled"
    assert c.connection_id_kept


def test_no_client_is_no_client_not_seamless() -> None:
    v = judge(VerdictEvidence(status="completed", before={}, after={}))
    assert v.outcome == "no-client"
    assert not v.seamless
    assert v.clients == []


# ------------------------------------------------------------------ our embedded client

EMBEDDED = [
    # status, after, record, path, outcome
    ("completed", "kept", "seamless", "seamless", "seamless"),
    ("completed", "kept", "seamless-without-data", "failed", "failed"),
    ("completed", "new", "seamless", "switch-host", "switch-host"),
    ("completed", "kept", "none", "failed", "failed"),
    ("completed", "new", "none", "failed", "failed"),  # never switch-host without a record
    ("completed", "gone", "none", "failed", "failed"),
    ("completed", "kept", "semi-seamless", "semi-seamless", "semi-seamless"),
    ("completed", "new", "switch-host", "switch-host", "switch-host"),
    ("completed", "kept", "saw-nothing", "failed", "failed"),
    ("failed", "kept", "none", "failed", "failed"),
    ("cancelled", "kept", "cancelled", "cancelled", "cancelled"),
]


@pytest.mark.parametrize(("status", "after", "rec", "path", "outcome"), EMBEDDED)
def test_embedded_client(status: str, after: str, rec: str, path: str, outcome: str) -> None:
    v = judge(evidence(status, after, embedded=True, rec=rec))
    [c] = v.clients
    assert (c.kind, c.evidence) == ("embedded", "client-record")
    assert c.path == path
    assert v.outcome == outcome
    assert c.stream is not None
    assert v.stream is c.stream
    if rec == "none":
        assert c.record is None
        assert c.note is not None
        if status == "completed":
            assert "did not finish" in c.note
    else:
        assert c.record is RECORDS[rec]
        assert c.blackout_ms == {"display:0": 12.5}
    if rec == "switch-host":
        assert c.connection_id_after == NEW
        assert not c.connection_id_kept


def test_stream_gaps_downgrade_seamless_only() -> None:
    broken = judge(evidence(embedded=True, rec="seamless", gaps=2))
    assert broken.clients[0].path == "seamless"  # the protocol path, as it happened
    assert broken.outcome == "failed"
    assert any("stream continuity broken" in n for n in broken.notes)
    reset = judge(evidence(after="new", embedded=True, rec="switch-host", gaps=2))
    assert reset.outcome == "switch-host"


def test_every_combination_keeps_the_invariants() -> None:
    """Over all evidence: a claim of seamless is always backed, and no record is never a reset."""
    combos = itertools.product(
        ["completed", "failed", "cancelled", None],
        list(AFTER),
        [True, False, None],
        [False, True],
        list(RECORDS),
        [0, 3],
    )
    for status, after, option, embedded, rec, gaps in combos:
        ev = evidence(status, after, option=option, embedded=embedded, rec=rec, gaps=gaps)
        v = judge(ev)
        [c] = v.clients
        ctx: Any = (status, after, option, embedded, rec, gaps)
        if v.outcome == "seamless":
            assert status == "completed", ctx
            assert c.path == "seamless", ctx
            assert c.connection_id_kept, ctx
            assert not (embedded and gaps), ctx
            assert option is not False or embedded, ctx  # only its own record can say
        if embedded and rec == "none":
            assert c.path != "switch-host", ctx
        if status != "completed":
            assert v.outcome in ("failed", "cancelled"), ctx
        assert c.channels_before == NAMES, ctx


# ------------------------------------------------------------------ TLS, channel by channel


TLS_CASES = [
    # before (per channel), after, downgraded channels
    ({(1, 0): True, (2, 0): True}, {(1, 0): True, (2, 0): True}, []),
    ({(1, 0): True, (2, 0): True}, {(1, 0): False, (2, 0): False}, ["main:0", "display:0"]),
    ({(1, 0): True, (2, 0): False}, {(1, 0): False, (2, 0): False}, ["main:0"]),
    ({(1, 0): True, (2, 0): False}, {(1, 0): True, (2, 0): False}, []),
    ({(1, 0): False, (2, 0): False}, {(1, 0): True, (2, 0): True}, []),
    ({(1, 0): True, (2, 0): True}, {(1, 0): True}, []),  # a channel not seen after
]


@pytest.mark.parametrize(("before", "after", "downgraded"), TLS_CASES)
def test_tls_compared_per_channel(
    before: dict[Channel, bool], after: dict[Channel, bool], downgraded: list[str]
) -> None:
    b = {CID: SpiceSession(CID, dict(before))}
    a = {CID: SpiceSession(CID, dict(after))}
    v = judge(VerdictEvidence(status="completed", before=b, after=a, seamless_option=True))
    [c] = v.clients
    assert c.path == "seamless"
    assert c.tls_downgraded_channels == downgraded
    assert v.tls_downgraded_channels == downgraded
    assert v.tls_downgraded is bool(downgraded)
    # a downgrade is never a plain success, whatever the protocol path
    assert v.seamless is not bool(downgraded)
    assert c.tls_before is (all(before.values()))
    assert c.tls_after is (all(after.values()))
    # and per channel, by name, on both sides
    names = {(1, 0): "main:0", (2, 0): "display:0"}
    assert c.tls_channels_before == {names[ch]: tls for ch, tls in before.items()}
    assert c.tls_channels_after == {names[ch]: tls for ch, tls in after.items()}


def test_tls_downgrade_after_switch_host_and_for_several_clients() -> None:
    before = {CID: SpiceSession(CID, {(1, 0): True}), 9: SpiceSession(9, {(1, 0): True})}
    after = {NEW: SpiceSession(NEW, {(1, 0): False}), 9: SpiceSession(9, {(1, 0): True})}
    v = judge(VerdictEvidence(status="completed", before=before, after=after))
    assert [c.path for c in v.clients] == ["switch-host", "switch-host"]
    assert v.tls_downgraded_channels == [f"{CID}/main:0", "9/main:0"]


def test_apply_writes_the_report_and_keeps_its_shape() -> None:
    b = {CID: SpiceSession(CID, {(1, 0): True})}
    a = {CID: SpiceSession(CID, {(1, 0): False})}
    v = judge(VerdictEvidence(status="completed", before=b, after=a, seamless_option=True))
    report = MigrationReport(
        outcome="failed",
        started_at=dt.datetime.now(dt.UTC),
        source=Endpoint(qmp="a"),
        destination=Endpoint(qmp="b"),
        migrate_uri="tcp:x:1",
        client_target="h:1",
    )
    v.apply(report)
    data = report.model_dump(mode="json")
    assert data["outcome"] == "seamless"
    assert data["seamless"] is False
    assert data["tls_downgraded"] is True
    assert data["tls_downgraded_channels"] == ["main:0"]
    assert data["clients"][0]["tls_before"] is True
    assert data["clients"][0]["tls_after"] is False
    assert data["clients"][0]["tls_downgraded_channels"] == ["main:0"]


def test_an_evacuation_with_a_tls_downgrade_is_not_all_seamless() -> None:
    """The same verdict feeds ``evacuate``: one domain's downgrade is the batch's exit code."""
    from spice_libvirt.exitcodes import ExitCode, for_report
    from spice_libvirt.libvirt.evacuate import DomainResult, EvacuationReport
    from spice_libvirt.libvirt.request import HoldDetails, LibvirtMigrationReport

    def domain(name: str, downgraded: bool) -> DomainResult:
        b = {CID: SpiceSession(CID, {(1, 0): True})}
        a = {CID: SpiceSession(CID, {(1, 0): not downgraded})}
        report = LibvirtMigrationReport(
            outcome="failed",
            started_at=dt.datetime.now(dt.UTC),
            source=Endpoint(qmp="a"),
            destination=Endpoint(qmp="b"),
            migrate_uri="qemu+tcp://b/system",
            client_target="cookie",
            domain=name,
            hold=HoldDetails(policy="auto"),
        )
        report.migration.status = "completed"
        judge(VerdictEvidence(status="completed", before=b, after=a, seamless_option=True)).apply(
            report
        )
        return DomainResult(
            domain=name, outcome=report.outcome, exit_code=int(for_report(report)), report=report
        )

    batch = EvacuationReport(
        source_uri="a",
        destination_uri="b",
        started_at=dt.datetime.now(dt.UTC),
        parallel=2,
        domains=[domain("ok", False), domain("bad", True)],
    )
    assert [d.exit_code for d in batch.domains] == [ExitCode.OK, ExitCode.TLS_DOWNGRADED]
    assert batch.exit_code() is ExitCode.TLS_DOWNGRADED


# ------------------------------------------------------------------ a reconnect not yet linked


def test_a_reconnect_without_its_new_id_is_switch_host() -> None:
    """A new connection after the client left the source, its session not linked yet
    (spice-server may stall it ~10 s behind a stale pre-linked session): switch-host."""
    ev = dataclasses.replace(evidence("completed", "kept"), reconnected=True)
    v = judge(ev)
    [c] = v.clients
    assert c.path == "switch-host"
    assert v.outcome == "switch-host"
    assert c.connection_id_kept is False
    assert c.note is not None
    assert "anew" in c.note
    # a new id seen wins over the bare reconnect: the report names it
    [c2] = judge(dataclasses.replace(evidence("completed", "new"), reconnected=True)).clients
    assert (c2.path, c2.connection_id_after) == ("switch-host", NEW)


# ------------------------------------------------------------------ when the evidence is enough

#: returned at 10.0 s; RTT 0.3 s, margin 0.1 s -> the quiet window is 0.4 s
RET, RTT = 10.0, 0.3
SETTLING = [
    # name, after, now, source left, reconnected, dropped, embedded, record, rtt, done, recheck
    ("new id: at once", "kept+new", RET, None, None, False, False, False, RTT, True, None),
    (
        "new id before the window",
        "new",
        RET + 0.01,
        RET - 1,
        None,
        False,
        False,
        False,
        RTT,
        True,
        None,
    ),
    (
        "kept, left long ago",
        "kept",
        RET + 0.003,
        RET - 1.4,
        None,
        False,
        False,
        False,
        RTT,
        True,
        None,
    ),
    (
        "kept, left just before",
        "kept",
        RET,
        RET - 0.1,
        None,
        False,
        False,
        False,
        RTT,
        False,
        RET + 0.3,
    ),
    ("kept, window over", "kept", RET + 0.3, RET - 0.1, None, False, False, False, RTT, True, None),
    (
        "kept, left unseen: from the return",
        "kept",
        RET + 0.2,
        None,
        None,
        False,
        False,
        False,
        RTT,
        False,
        RET + 0.4,
    ),
    (
        "kept, left after the return",
        "kept",
        RET + 0.4,
        RET + 0.3,
        None,
        False,
        False,
        False,
        RTT,
        True,
        None,
    ),
    (
        "kept, RTT unknown: 0.5 s",
        "kept",
        RET + 0.45,
        RET,
        None,
        False,
        False,
        False,
        None,
        False,
        RET + 0.5,
    ),
    (
        "reconnect, id not yet",
        "kept",
        RET + 0.1,
        RET - 0.5,
        RET,
        False,
        False,
        False,
        RTT,
        False,
        RET + 0.8,
    ),
    (
        "reconnect, waited 2 windows",
        "kept",
        RET + 0.8,
        RET - 0.5,
        RET,
        False,
        False,
        False,
        RTT,
        True,
        None,
    ),
    (
        "pre-link dropped: wait for the bound",
        "kept",
        RET + 1,
        RET - 1,
        None,
        True,
        False,
        False,
        RTT,
        False,
        RET + 6,
    ),
    (
        "gone: wait for the bound",
        "gone",
        RET + 1,
        RET - 1,
        None,
        False,
        False,
        False,
        RTT,
        False,
        RET + 6,
    ),
    ("bound over", "gone", RET + 6, None, None, False, False, False, RTT, True, None),
    (
        "unobserved, bound over",
        "unobserved",
        RET + 6,
        None,
        None,
        False,
        False,
        False,
        RTT,
        True,
        None,
    ),
    ("embedded record in", "kept", RET, None, None, False, True, True, RTT, True, None),
    (
        "embedded, no record: as external",
        "kept",
        RET,
        RET - 1,
        None,
        False,
        True,
        False,
        RTT,
        True,
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "after", "now", "left", "again", "dropped", "emb", "rec", "rtt", "done", "recheck"),
    SETTLING,
    ids=[row[0] for row in SETTLING],
)
def test_settled(
    name: str,
    after: str,
    now: float,
    left: float | None,
    again: float | None,
    dropped: bool,
    emb: bool,
    rec: bool,
    rtt: float | None,
    done: bool,
    recheck: float | None,
) -> None:
    s = settled(
        Settling(
            before=sessions(session(CID)),
            after=AFTER[after],
            returned_at=RET,
            now=now,
            rtt=rtt,
            source_left_at=left,
            reconnected_at=again,
            prelinks_dropped=dropped,
            embedded=emb,
            record_in=rec,
            margin=0.1,
            bound=6.0,
        )
    )
    assert s.done is done, s.reason
    assert s.reason
    if recheck is None:
        assert s.recheck_at is None
    else:
        assert s.recheck_at == pytest.approx(recheck)


def test_settled_without_a_client_has_nothing_to_wait_for() -> None:
    s = settled(Settling({}, AFTER["new"], RET, RET, RTT))
    assert s.done
    assert "no client" in s.reason


def test_settled_never_waits_past_the_bound_and_is_ready_within_a_window() -> None:
    """Over a grid of times: the recheck is never after the bound; a kept session with no
    reconnect is conclusive within 1 RTT + margin of libvirt's return."""
    for now, left, rtt in itertools.product(
        [RET + x / 100 for x in range(0, 700, 7)], [None, RET - 2, RET - 0.05], [None, 0.0, 0.3]
    ):
        for after in ("kept", "gone", "new"):
            s = settled(Settling(sessions(session(CID)), AFTER[after], RET, now, rtt, left))
            assert s.done or (s.recheck_at is not None and now < s.recheck_at <= RET + 6.0)
            window = (rtt + 0.1) if rtt is not None else 0.5
            if after == "kept" and now >= RET + window:
                assert s.done
