"""oVirt/VDSM hook adapters: record migrations that VDSM drives into the same journal.

On an oVirt host VDSM, not a human with ``virsh``, starts migrations, and it has its own
hook points: it runs every executable in ``/usr/libexec/vdsm/hooks/<hook point>/`` in
sorted order, passing the domain XML in a temporary file named by ``$_hook_domxml`` and the
VM's id in ``$vmId``. The shims in ``hooks/vdsm/`` exec :func:`main` with the hook point's
name. We support two points:

* ``before_vm_migrate_source`` - on the source, before VDSM calls libvirt's migrate: the
  intent (which VM, which SPICE listen address it has now);
* ``after_vm_migrate_destination`` - on the destination, once the VM runs there: the
  result (the SPICE listen address it ended up with).

The adapters only read the XML file; they never write it back (VDSM would pass a changed
file on to libvirt), and they never call libvirt or VDSM.

Exit codes follow VDSM's convention (``vdsm.hook.hooking``): 0 success, 1 failed but let
the other hooks run, 2 failed and stop the chain. Beware what VDSM does with them: for
``before_*`` points *any* non-zero status makes VDSM raise ``HookError`` after the chain,
which aborts the migration; ``after_*`` points ignore the status. Hence:

* fail-open (default): every problem is one line on stderr (VDSM logs it) and exit 0;
* fail-closed (``fail_closed = true``): unusable input (no ``$_hook_domxml``, unreadable or
  malformed XML, unknown hook point) exits 2; the deadline exits 1;
* an exception nobody expected (a bug, a broken install) counts as unusable input, or
  fails open before the configuration is read;
* either way, a journal that cannot be written (permissions, disk full, its lock held) is
  one line on stderr and exit 0: the journal is our bookkeeping, and refusing a migration
  because another hook held its lock would be absurd. A document over the size limit or
  with a DOCTYPE is *declined* with exit 0 too (see
  :class:`~spice_libvirt.hook.rewrite.DeclinedXMLError`);
* like the libvirt hook, each run is bounded by ``hook_timeout_s`` (at most 2 s) from
  interpreter start, armed before the configuration is read
  (:mod:`spice_libvirt.hook.deadline`).
"""

from __future__ import annotations

import time

# Taken before the heavier imports below: the deadline counts from (almost) process start.
_MODULE_LOADED = time.monotonic()

import contextlib  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TextIO  # noqa: E402

from spice_libvirt.config import MAX_HOOK_TIMEOUT_S, Settings, load_config  # noqa: E402
from spice_libvirt.errors import ConfigError, HookError, unexpected  # noqa: E402
from spice_libvirt.hook.deadline import Deadline, HookDeadlineError  # noqa: E402
from spice_libvirt.hook.journal import Journal, JournalEntry  # noqa: E402
from spice_libvirt.hook.rewrite import (  # noqa: E402
    MAX_XML_BYTES,
    DeclinedXMLError,
    DomainXML,
    parse_domain,
)

PROG = "spice-libvirt-vdsm"
HOOK_POINTS = ("before_vm_migrate_source", "after_vm_migrate_destination")

#: VDSM's return codes (see the module docstring for what VDSM does with them).
EXIT_OK = 0
EXIT_ERROR_CONTINUE = 1
EXIT_ERROR_STOP = 2
#: Longest wait for the journal's lock (as the libvirt hook's).
_JOURNAL_TIMEOUT_S = 0.25


class _BadInputError(HookError):
    """The hook point or its input file is unusable (exit 2 when failing closed)."""


def spice_listen_summary(dom: DomainXML) -> str:
    """A short description of the SPICE listen addresses, for the journal's detail column."""
    parts = []
    for g in dom.root.iterfind("./devices/graphics"):
        if g.get("type") != "spice":
            continue
        addrs = [
            l.get("address") or f"({l.get('type')})"
            for l in g.iterfind("listen")  # noqa: E741
        ]
        attr = g.get("listen")
        shown = ",".join(addrs) if addrs else (attr or "(default)")
        port = g.get("port") or "auto"
        parts.append(f"spice listen {shown} port {port}")
    return "; ".join(parts) if parts else "no spice graphics"


def _read_domxml(environ: Mapping[str, str]) -> DomainXML:
    name = environ.get("_hook_domxml")
    if not name:
        raise _BadInputError("$_hook_domxml is not set: not run by VDSM?")
    path = Path(name)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_XML_BYTES + 1)
    except OSError as exc:
        raise _BadInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_XML_BYTES:
        declined = DeclinedXMLError(f"domain XML is larger than {MAX_XML_BYTES} bytes; not read")
        raise _BadInputError(f"{path}: {declined}") from declined
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadInputError(f"{path}: domain XML is not UTF-8: {exc.reason}") from exc
    try:
        return parse_domain(text)
    except HookDeadlineError:
        raise
    except HookError as exc:
        raise _BadInputError(f"{path}: {exc}") from exc


def run(
    hook_point: str,
    environ: Mapping[str, str],
    stderr: TextIO,
    *,
    started: float | None = None,
    hard_watchdog: bool = False,
) -> int:
    """One VDSM hook invocation; returns the exit code for VDSM.

    Under the same :class:`~spice_libvirt.hook.deadline.Deadline` as the libvirt hook, armed
    before the configuration is read: VDSM waits for its hooks as libvirtd does.
    """
    started = time.monotonic() if started is None else started
    deadline = Deadline(started, MAX_HOOK_TIMEOUT_S, prog=PROG, hard=hard_watchdog)
    fail_code = EXIT_OK  # until the configuration says otherwise
    try:
        with deadline:
            try:
                settings: Settings = load_config()
            except ConfigError as exc:
                print(f"{PROG}: {hook_point}: {exc} (failing open)", file=stderr)
                return EXIT_OK
            except HookDeadlineError:
                raise
            except Exception as exc:  # the operator's choice is unknown: fail open
                print(f"{PROG}: {hook_point}: configuration: {unexpected(exc)} (failing open)",
                      file=stderr)  # fmt: skip
                return EXIT_OK
            fail_code = EXIT_ERROR_CONTINUE if settings.fail_closed else EXIT_OK
            deadline.retarget(settings.hook_timeout_s, fail_code)
            return _record(hook_point, environ, settings, started, stderr)
    except HookDeadlineError:
        print(f"{PROG}: {hook_point}: deadline of {deadline.budget_s:g} s exceeded", file=stderr)
        return deadline.exit_code
    except Exception as exc:  # any other exception ends in the configured exit code too
        print(f"{PROG}: {hook_point}: {unexpected(exc)}", file=stderr)
        return fail_code


def _record(
    hook_point: str,
    environ: Mapping[str, str],
    settings: Settings,
    started: float,
    stderr: TextIO,
) -> int:
    vm_id = environ.get("vmId", "-") or "-"
    try:
        if hook_point not in HOOK_POINTS:
            raise _BadInputError(
                f"unknown hook point {hook_point!r}; expected one of {', '.join(HOOK_POINTS)}"
            )
        dom = _read_domxml(environ)
    except HookDeadlineError:
        raise
    except Exception as exc:  # _BadInputError, or anything nobody expected: unusable input
        detail = str(exc) if isinstance(exc, _BadInputError) else unexpected(exc)
        print(f"{PROG}: {hook_point}: {detail}", file=stderr)
        _record_error(settings, hook_point, vm_id, detail)
        declined = isinstance(exc.__cause__, DeclinedXMLError)
        return EXIT_ERROR_STOP if settings.fail_closed and not declined else EXIT_OK
    entry = JournalEntry(
        ts=time.time(),
        source="vdsm",
        object=dom.name or vm_id,
        operation=hook_point,
        extra=vm_id,
        domain=dom.name,
        uuid=dom.uuid,
        detail=spice_listen_summary(dom),
        duration_ms=(time.monotonic() - started) * 1000,
        pid=os.getpid(),
    )
    try:
        _journal(settings).record(entry)
    except HookDeadlineError:
        raise
    except HookError as exc:
        # Never fatal, not even with fail_closed (see the module docstring).
        print(f"{PROG}: {hook_point}: {exc} (continuing)", file=stderr)
    except Exception as exc:
        print(f"{PROG}: {hook_point}: journal: {unexpected(exc)} (continuing)", file=stderr)
    return EXIT_OK


def _journal(settings: Settings) -> Journal:
    return Journal(
        settings.journal_path, max_rows=settings.journal_max_rows, timeout_s=_JOURNAL_TIMEOUT_S
    )


def _record_error(settings: Settings, hook_point: str, vm_id: str, detail: str) -> None:
    # Already reporting an error: the journal is best effort here.
    with contextlib.suppress(Exception):
        _journal(settings).record(
            JournalEntry(
                ts=time.time(),
                source="vdsm",
                object=vm_id,
                operation=hook_point,
                extra=vm_id,
                outcome="error",
                detail=detail,
                pid=os.getpid(),
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spice_libvirt.hook.vdsm HOOK_POINT`` (what the shims in hooks/vdsm run)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(f"usage: {PROG} HOOK_POINT   (one of: {', '.join(HOOK_POINTS)})", file=sys.stderr)
        return EXIT_ERROR_STOP
    return run(args[0], os.environ, sys.stderr, started=_MODULE_LOADED, hard_watchdog=True)


if __name__ == "__main__":
    sys.exit(main())
