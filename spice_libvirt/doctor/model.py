"""The typed result of ``spice-libvirt doctor``: one :class:`Check` per question asked.

Why a model and not text: the Ansible role's verify step and the evacuation play read the
JSON form and branch on ``ready``; an admin reads the same checks as a table. Each failed or
doubtful check carries a one-line ``fix`` an admin can act on without reading the code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

#: ok: ready on this point; warn: probably fine but not provable from here (does not make
#: the host "not ready"); fail: seamless migration will not work until fixed; skip: does not
#: apply to this host (e.g. no TLS configured).
Status = Literal["ok", "warn", "fail", "skip"]


class Check(BaseModel):
    """One question about this host, its answer, and what to do when the answer is bad."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


class DoctorReport(BaseModel):
    """Every check of one host; ``ready`` is false as soon as one check failed."""

    host: str
    connect: str
    ready: bool
    checks: list[Check]

    @classmethod
    def of(cls, host: str, connect: str, checks: list[Check]) -> DoctorReport:
        return cls(
            host=host,
            connect=connect,
            ready=all(c.status != "fail" for c in checks),
            checks=checks,
        )


def ok(name: str, detail: str) -> Check:
    return Check(name=name, status="ok", detail=detail)


def warn(name: str, detail: str, fix: str) -> Check:
    return Check(name=name, status="warn", detail=detail, fix=fix)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name=name, status="fail", detail=detail, fix=fix)


def skip(name: str, detail: str) -> Check:
    return Check(name=name, status="skip", detail=detail)
