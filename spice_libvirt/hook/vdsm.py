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
  malformed XML, unknown hook point) exits 2; a journal that cannot be written exits 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from spice_libvirt.config import Settings, load_config
from spice_libvirt.errors import ConfigError, HookError
from spice_libvirt.hook.journal import Journal, JournalEntry
from spice_libvirt.hook.rewrite import MAX_XML_BYTES, DomainXML, parse_domain

PROG = "spice-libvirt-vdsm"
HOOK_POINTS = ("before_vm_migrate_source", "after_vm_migrate_destination")

#: VDSM's return codes (see the module docstring for what VDSM does with them).
EXIT_OK = 0
EXIT_ERROR_CONTINUE = 1
EXIT_ERROR_STOP = 2


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
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadInputError(f"{path}: domain XML is not UTF-8: {exc.reason}") from exc
    try:
        return parse_domain(text)
    except HookError as exc:
        raise _BadInputError(f"{path}: {exc}") from exc


def run(hook_point: str, environ: Mapping[str, str], stderr: TextIO) -> int:
    """One VDSM hook invocation; returns the exit code for VDSM."""
    started = time.monotonic()
    try:
        settings: Settings = load_config()
    except ConfigError as exc:
        print(f"{PROG}: {hook_point}: {exc} (failing open)", file=stderr)
        return EXIT_OK
    vm_id = environ.get("vmId", "-") or "-"
    try:
        if hook_point not in HOOK_POINTS:
            raise _BadInputError(
                f"unknown hook point {hook_point!r}; expected one of {', '.join(HOOK_POINTS)}"
            )
        dom = _read_domxml(environ)
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
        Journal(settings.journal_path, max_rows=settings.journal_max_rows, timeout_s=0.5).record(
            entry
        )
    except _BadInputError as exc:
        print(f"{PROG}: {hook_point}: {exc}", file=stderr)
        _record_error(settings, hook_point, vm_id, str(exc))
        return EXIT_ERROR_STOP if settings.fail_closed else EXIT_OK
    except HookError as exc:
        print(f"{PROG}: {hook_point}: {exc}", file=stderr)
        return EXIT_ERROR_CONTINUE if settings.fail_closed else EXIT_OK
    return EXIT_OK


def _record_error(settings: Settings, hook_point: str, vm_id: str, detail: str) -> None:
    # Already reporting an error: the journal is best effort here.
    with contextlib.suppress(HookError):
        Journal(settings.journal_path, max_rows=settings.journal_max_rows, timeout_s=0.5).record(
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
    return run(args[0], os.environ, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
