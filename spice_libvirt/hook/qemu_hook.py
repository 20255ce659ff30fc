"""The libvirt ``qemu`` hook: journal every call, fix the SPICE address of incoming migrations.

libvirt runs ``/etc/libvirt/hooks/qemu.d/50-spice-libvirt OBJECT OPERATION SUBOP EXTRA``
(a sh shim that runs this module's :func:`main`: through :mod:`spice_libvirt.hook.launch`
with ``python -I -S`` by default, or through the ``spice-libvirt-hook`` console script) with
the domain XML on stdin, and waits for it, on every event of every domain. The rules this
module keeps, and why:

* **Never call libvirt.** libvirtd is blocked on us; calling back into it can deadlock
  (libvirt's hooks documentation says so in capitals). Nothing here imports ``libvirt``,
  and a test proves it.
* **Be quick.** A hook delays the guest operation it belongs to, so a call loads only the
  standard library's C parts it needs (expat, sqlite3, signal and thread primitives) and
  this package's hook modules: no ``typing``, ``dataclasses``, ``pathlib``, ``re`` or
  ElementTree unless a rewrite needs it (``tests/test_hook_launch.py`` checks the list,
  ``benchmarks/bench_hook.py`` measures a call against a bare interpreter). Before
  anything else, the configuration included, :class:`~spice_libvirt.hook.deadline.Deadline`
  arms a soft deadline (SIGALRM: report, journal, pick the exit status) and, when run as a
  program (launcher or console script), a hard one (a thread that calls ``os._exit``) for when the soft one cannot fire. The budget
  is 2 s until the configuration is read, then ``hook_timeout_s``, interpreter start
  included.
* **``migrate begin`` is a filter.** On the destination it receives the incoming XML; what
  it prints replaces it, and printing nothing means "unchanged". We print only when the
  SPICE listen address had to change (:mod:`spice_libvirt.hook.rewrite`), and only after
  both deadlines are disarmed, the whole document in one write: a deadline firing halfway
  would hand libvirt half a document with exit status 0.
* **Input is bounded.** At most :data:`~spice_libvirt.hook.rewrite.MAX_XML_BYTES` are read
  from stdin; a larger document, or one with a DOCTYPE or entity declarations, is
  *declined*: one line on stderr, nothing on stdout, exit 0 even with ``fail_closed``
  (:class:`~spice_libvirt.hook.rewrite.DeclinedXMLError` says why that is right for a
  rewrite hook).
* **Fail open by default.** If anything goes wrong (bad arguments, malformed XML, the
  deadline, and any exception nobody expected: a bug, a broken install) we print one line
  on stderr and exit 0, so libvirt carries on with the unchanged XML. With ``fail_closed = true`` the exit status is 1 instead and libvirt
  aborts the operation, logging our stderr line (``virHookCall ... unexpected exit status
  1: <line>``).
* **The journal is never fatal**, not even with ``fail_closed``: an unwritable or full
  journal, or its lock held by someone else, is one line on stderr and the hook goes on.
  It is our bookkeeping, not a condition of the guest operation.
* An invalid configuration file is reported and treated as fail-open: with the file
  unreadable we cannot know the administrator asked for fail-closed, and refusing every
  VM start on a typo would be worse.

Exit status: 0 = success or fail-open error; 1 = error with ``fail_closed``; 2 = usage
error of ``--self-test``.
"""

from __future__ import annotations

import time

# Taken before the heavier imports below: the deadline counts from (almost) process start.
_MODULE_LOADED = time.monotonic()

import io  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from spice_libvirt.config import MAX_HOOK_TIMEOUT_S, Settings, load_config  # noqa: E402
from spice_libvirt.errors import ConfigError, HookError, unexpected  # noqa: E402
from spice_libvirt.hook.deadline import Deadline, HookDeadlineError  # noqa: E402
from spice_libvirt.hook.journal import Journal, JournalEntry  # noqa: E402
from spice_libvirt.hook.scan import MAX_XML_BYTES, DeclinedXMLError, scan_domain  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TextIO

    from spice_libvirt.hook.journal import Outcome

PROG = "spice-libvirt-hook"
#: Longest wait for the journal's lock; the journal write must fit into the report margin.
_JOURNAL_TIMEOUT_S = 0.25

EXIT_OK = 0
EXIT_FAIL_CLOSED = 1
EXIT_USAGE = 2


class Invocation:
    """libvirt's four arguments, named."""

    __slots__ = ("extra", "object", "operation", "suboperation")

    def __init__(self, object: str, operation: str, suboperation: str, extra: str) -> None:
        self.object = object
        self.operation = operation
        self.suboperation = suboperation
        self.extra = extra

    @classmethod
    def from_argv(cls, args: Sequence[str]) -> Invocation:
        if len(args) != 4:
            raise HookError(
                f"expected 4 arguments (object operation sub-operation extra), got {len(args)}"
            )
        return cls(*args)

    @classmethod
    def lenient(cls, args: Sequence[str]) -> Invocation:
        """The arguments padded or cut to four, for messages and journal rows."""
        return cls(*(list(args) + ["-"] * 4)[:4])

    @property
    def is_migrate_begin(self) -> bool:
        return self.operation == "migrate" and self.suboperation == "begin"


class _Result:
    __slots__ = ("detail", "domain", "outcome", "output", "uuid")

    def __init__(
        self,
        output: str | None = None,
        outcome: Outcome = "ok",
        detail: str = "",
        domain: str | None = None,
        uuid: str | None = None,
    ) -> None:
        self.output = output
        self.outcome: Outcome = outcome
        self.detail = detail
        self.domain = domain
        self.uuid = uuid


def _process(inv: Invocation, text: str, settings: Settings) -> _Result:
    """Do the hook's job for one invocation; raise :class:`HookError` when it cannot."""
    if inv.is_migrate_begin:
        return _migrate_begin(text, settings)
    if not text.strip():
        # Guest hooks always get XML; tolerate its absence elsewhere (nothing to parse).
        return _Result(detail="no XML on stdin")
    dom = scan_domain(text)
    return _Result(domain=dom.name, uuid=dom.uuid)


def _migrate_begin(text: str, settings: Settings) -> _Result:
    """The incoming domain's XML, with its SPICE listen address rewritten if it must be.

    Decided and done from the expat pass: no ElementTree (with ``re``, ``enum``...), which
    was most of a rewrite's cost. The result is what
    :func:`~spice_libvirt.hook.rewrite.rewrite_graphics_listen` gives, with every other
    byte of the document unchanged (:mod:`spice_libvirt.hook.patch`;
    ``tests/test_hook_launch.py`` and ``tests/test_hook_patch.py`` check the two agree).
    """
    dom = scan_domain(text)
    seen = dom.spice_listens
    if settings.spice_address is None:
        return _Result(None, "ok", "unchanged: no spice_address configured", dom.name, dom.uuid)
    from spice_libvirt.hook.local import plainly_local

    if all(plainly_local(a, settings.spice_address) for a in seen):
        return _Result(None, "ok", _unchanged(seen), dom.name, dom.uuid)
    from spice_libvirt.hook.local import host_addresses, is_local_address

    local = host_addresses()
    hostname = os.uname().nodename  # what socket.gethostname() returns, without socket
    keep = {*local, settings.spice_address}
    if all(is_local_address(a, keep, hostname=hostname) for a in seen):
        return _Result(None, "ok", _unchanged(seen), dom.name, dom.uuid)
    from spice_libvirt.hook.patch import rewrite_sites

    xml, changes = rewrite_sites(
        text, dom.listen_sites, settings.spice_address, local, hostname=hostname
    )
    if xml is None:  # cannot happen (same rules on the same addresses); never silent
        raise HookError("rewrite found nothing to change in a non-local SPICE listen address")
    return _Result(xml, "rewritten", "; ".join(changes), dom.name, dom.uuid)


def _unchanged(seen: tuple[str, ...]) -> str:
    if seen:
        return f"unchanged: SPICE listen {', '.join(seen)} is local here"
    return "unchanged: no SPICE listen address in the XML (host's spice_listen applies)"


def _read_and_process(args: Sequence[str], stdin: TextIO, settings: Settings) -> _Result:
    inv = Invocation.from_argv(args)
    try:
        # Bounded: one character more than the limit tells "too large" from "just fits",
        # and the rest of a huge document is never read (libvirt gets EPIPE, not a hang).
        text = stdin.read(MAX_XML_BYTES + 1)
    except UnicodeDecodeError as exc:
        raise HookError(f"domain XML is not UTF-8: {exc.reason}") from exc
    return _process(inv, text, settings)


def _journal(settings: Settings, entry: JournalEntry) -> None:
    Journal(
        settings.journal_file, max_rows=settings.journal_max_rows, timeout_s=_JOURNAL_TIMEOUT_S
    ).record(entry)


def _journal_quietly(settings: Settings, entry: JournalEntry, stderr: TextIO) -> None:
    """Record ``entry``; a journal that cannot be written is reported, never fatal.

    Not even with ``fail_closed``: the journal is our bookkeeping, not a condition of the
    guest operation, and a lock held by a reader (or 16 hooks at once) must not refuse VMs.
    The deadline firing here counts as a journal failure too: the result is already known.
    """
    try:
        _journal(settings, entry)
    except HookDeadlineError:
        print(f"{PROG}: journal skipped: the deadline is near (continuing)", file=stderr)
    except HookError as exc:
        print(f"{PROG}: {exc} (continuing)", file=stderr)
    except Exception as exc:
        print(f"{PROG}: journal: {unexpected(exc)} (continuing)", file=stderr)


def _syslog(settings: Settings, e: JournalEntry) -> None:
    """The same call as one syslog line (never fatal, never blocking: see
    :mod:`spice_libvirt.syslog_line`), for fleets that ship syslog/journald."""
    from spice_libvirt import syslog_line

    detail = f": {e.detail}" if e.detail else ""
    took = f" ({e.duration_ms:.0f} ms)" if e.duration_ms is not None else ""
    message = f"{e.object} {e.operation} {e.suboperation} {e.extra}: {e.outcome}{detail}{took}"
    severity = syslog_line.WARNING if e.outcome == "error" else syslog_line.INFO
    try:
        syslog_line.send(PROG, message, path=settings.syslog_socket, severity=severity)
    except HookDeadlineError:
        raise
    except Exception:  # a log line is never a condition of the guest operation
        pass


def _entry(inv: Invocation, wall: float, started: float, res: _Result) -> JournalEntry:
    return JournalEntry(
        ts=wall,
        object=inv.object,
        operation=inv.operation,
        suboperation=inv.suboperation,
        extra=inv.extra,
        domain=res.domain,
        uuid=res.uuid,
        outcome=res.outcome,
        detail=res.detail,
        duration_ms=(time.monotonic() - started) * 1000,
        pid=os.getpid(),
    )


def run(
    args: Sequence[str],
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    *,
    started: float | None = None,
    hard_watchdog: bool = False,
) -> int:
    """One hook invocation; see the module docstring for the contract.

    Any exception ends in the configured exit code, not only the expected ones: an
    unexpected one (a bug, a broken install, an odd input nobody thought of) is reported in
    one line like a :class:`HookError`, and before the configuration is read it fails open.
    """
    started = time.monotonic() if started is None else started
    wall = time.time()
    inv = Invocation.lenient(args)
    deadline = Deadline(started, MAX_HOOK_TIMEOUT_S, prog=PROG, hard=hard_watchdog)
    fail_code = EXIT_OK  # until the configuration says otherwise
    try:
        with deadline:
            try:
                settings = load_config()
            except ConfigError as exc:
                print(f"{PROG}: {exc} (failing open)", file=stderr)
                return EXIT_OK
            except HookDeadlineError:
                raise
            except Exception as exc:  # the operator's choice is unknown: fail open
                print(f"{PROG}: configuration: {unexpected(exc)} (failing open)", file=stderr)
                return EXIT_OK
            fail_code = EXIT_FAIL_CLOSED if settings.fail_closed else EXIT_OK
            deadline.retarget(settings.hook_timeout_s, fail_code)
            try:
                result = _read_and_process(args, stdin, settings)
            except HookError as exc:
                return _failed(inv, exc, settings, wall, started, stderr)
            except Exception as exc:
                return _failed(inv, HookError(unexpected(exc)), settings, wall, started, stderr)
            entry = _entry(inv, wall, started, result)
            _journal_quietly(settings, entry, stderr)
            _syslog(settings, entry)
    except HookDeadlineError:
        # Only reached when the deadline fired outside the inner handlers (config loading,
        # or between them): nothing was written to stdout.
        print(f"{PROG}: {inv.object} {inv.operation} {inv.suboperation}: deadline of "
              f"{deadline.budget_s:g} s exceeded", file=stderr)  # fmt: skip
        return deadline.exit_code
    except Exception as exc:  # outside the inner handlers: nothing was written to stdout
        print(f"{PROG}: {inv.object} {inv.operation} {inv.suboperation}: {unexpected(exc)}",
              file=stderr)  # fmt: skip
        return fail_code
    # Both deadlines are disarmed: the document goes out whole, in one write.
    if result.output is not None:
        try:
            stdout.write(result.output)
            stdout.flush()
        except Exception as exc:  # libvirt stopped reading (EPIPE) or a closed stream
            print(f"{PROG}: {inv.object} {inv.operation} {inv.suboperation}: the rewritten "
                  f"XML did not reach libvirt: {unexpected(exc)}", file=stderr)  # fmt: skip
            return fail_code
    return EXIT_OK


def _failed(
    inv: Invocation,
    error: HookError,
    settings: Settings,
    wall: float,
    started: float,
    stderr: TextIO,
) -> int:
    """Report ``error`` in one line, journal it (best effort), return the exit status."""
    if isinstance(error, HookDeadlineError):
        error = HookDeadlineError(
            f"deadline of {settings.hook_timeout_s:g} s exceeded before the hook finished"
        )
    declined = isinstance(error, DeclinedXMLError)
    note = " (passing the XML through unchanged)" if declined else ""
    print(f"{PROG}: {inv.object} {inv.operation} {inv.suboperation}: {error}{note}", file=stderr)
    if not isinstance(error, HookDeadlineError):
        # Best effort: the journal is most useful exactly when something went wrong.
        import contextlib  # an error path: not worth an import on every call

        entry = _entry(inv, wall, started, _Result(outcome="error", detail=str(error)))
        with contextlib.suppress(Exception):
            _journal(settings, entry)
        _syslog(settings, entry)
    if declined or not settings.fail_closed:
        return EXIT_OK
    return EXIT_FAIL_CLOSED


_SELF_TEST_XML = """<domain type='kvm'>
  <name>spice-libvirt-self-test</name>
  <uuid>00000000-0000-4000-8000-000000000000</uuid>
  <devices>
    <graphics type='spice' autoport='yes' listen='192.0.2.254'>
      <listen type='address' address='192.0.2.254'/>
    </graphics>
  </devices>
</domain>
"""


def self_test(stdout: TextIO, stderr: TextIO) -> int:
    """Check this host's setup without libvirt: config valid, rewrite works, journal writable.

    Used by the Ansible role's verification; it writes one ``self-test`` journal row.
    """
    try:
        settings = load_config()
    except ConfigError as exc:
        print(f"{PROG}: self-test: {exc}", file=stderr)
        return EXIT_USAGE
    problems = []
    from spice_libvirt.hook.rewrite import host_addresses, rewrite_graphics_listen

    if settings.spice_address is None:
        print("spice_address: not set (incoming migrations are never rewritten)", file=stdout)
    else:
        res = rewrite_graphics_listen(_SELF_TEST_XML, settings.spice_address, host_addresses())
        if res.xml is None or f'address="{settings.spice_address}"' not in res.xml:
            problems.append("rewrite of a foreign listen address did not happen")
        else:
            print(f"rewrite: 192.0.2.254 -> {settings.spice_address}: ok", file=stdout)
    try:
        _journal(
            settings,
            JournalEntry(
                ts=time.time(),
                object="-",
                operation="self-test",
                detail="spice-libvirt-hook --self-test",
                pid=os.getpid(),
            ),
        )
        print(f"journal: {settings.journal_path}: writable", file=stdout)
    except HookError as exc:
        problems.append(str(exc))
    for p in problems:
        print(f"{PROG}: self-test: {p}", file=stderr)
    return EXIT_FAIL_CLOSED if problems else EXIT_OK


def _console_streams() -> tuple[TextIO, TextIO]:
    """UTF-8 stdin/stdout whatever the locale: libvirt runs hooks with LC_ALL=C."""
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict")
    stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
    return stdin, stdout


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Entry point; with no arguments (the console script) it reads ``sys.argv`` and stdio.

    Returns the exit status; the console script wrapper passes it to ``sys.exit``.
    """
    console = argv is None
    args = list(sys.argv[1:] if argv is None else argv)
    err = stderr if stderr is not None else sys.stderr
    if stdin is None or stdout is None:
        cin, cout = _console_streams()
        stdin = stdin if stdin is not None else cin
        stdout = stdout if stdout is not None else cout
    try:
        if args == ["--self-test"]:
            return self_test(stdout, err)
        return run(
            args,
            stdin,
            stdout,
            err,
            started=_MODULE_LOADED if console else None,
            hard_watchdog=console,
        )
    except Exception as exc:  # run() returns for anything it can; this is the last line
        print(f"{PROG}: {unexpected(exc)} (failing open)", file=err)
        return EXIT_OK
    finally:
        # everything out before returning: the launcher ends the process with os._exit
        for stream in (stdout, err):
            try:  # noqa: SIM105 - contextlib is an import the hook does not pay for
                stream.flush()
            except (OSError, ValueError):  # a reader gone, a stream closed
                pass
