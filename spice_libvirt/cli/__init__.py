"""The ``spice-libvirt`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; :func:`commands` lists them explicitly, and the handler each
installs returns an exit code. No product module imports this package. Errors derived from
:class:`~spice_libvirt.errors.SpiceLibvirtError` become one line on stderr and a documented
exit code (:mod:`spice_libvirt.exitcodes`), never a traceback: management tools parse both.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from spice_libvirt import __version__, errors
from spice_libvirt.exitcodes import ExitCode, exit_codes_epilog, for_error

Handler = Callable[[argparse.Namespace], int]
Register = Callable[[Any], None]


def commands() -> tuple[Register, ...]:
    """Each sub-command's ``register``, in the order ``--help`` lists them."""
    from spice_libvirt.cli import (
        agent,
        doctor,
        evacuate,
        hook,
        journal,
        migrate,
        probe,
        watch,
    )

    return (
        probe.register,
        watch.register,
        _lab_register(),
        migrate.register,
        evacuate.register,
        agent.register,
        hook.register,
        journal.register,
        doctor.register,
    )


#: What ``spice-libvirt lab`` says on a host without the labs (a hypervisor, by design).
LAB_NOT_INSTALLED = (
    "the labs are not installed here (they are for development machines, never hypervisors):"
    " pip install ./lab from the source tree (the spice-libvirt-lab distribution)"
)


def _lab_register() -> Register:
    """The labs' ``register`` where the separate ``spice-libvirt-lab`` distribution is
    installed; elsewhere a ``lab`` command that says in one line what to install."""
    try:
        from spice_libvirt_lab.command import register
    except ImportError as exc:
        missing = exc.name or ""
        reason = LAB_NOT_INSTALLED
        if missing and not missing.startswith("spice_libvirt_lab"):
            reason = f"the labs cannot load: {exc}"
        return functools.partial(_register_lab_unavailable, reason)
    return register


def _register_lab_unavailable(reason: str, subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lab", help="labs for development machines (not installed here)", add_help=False
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def unavailable(args: argparse.Namespace) -> int:
        print(f"spice-libvirt: lab: {reason}", file=sys.stderr)
        return int(ExitCode.LAB)

    parser.set_defaults(handler=unavailable)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spice-libvirt",
        description="Seamless SPICE live migration for QEMU/KVM and libvirt, verified.",
        epilog=exit_codes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version (the package's one version source) and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in commands():
        register(sub)
    for command in sub.choices.values():
        _with_exit_codes(command)
    return parser


class _EpilogAsIs(argparse.HelpFormatter):
    """Wraps the description as usual, prints the exit-code table as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit codes:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _with_exit_codes(parser: argparse.ArgumentParser) -> None:
    """Every sub-command's ``--help`` ends with the exit codes (management tools branch on
    them); a sub-command that set its own epilog keeps it."""
    if parser.epilog is None:
        parser.epilog = exit_codes_epilog()
        if parser.formatter_class is argparse.HelpFormatter:
            parser.formatter_class = _EpilogAsIs


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[list[int]]:
    """SIGTERM takes SIGINT's path: the running migration is cancelled and undone, not
    killed mid-way (a service manager stops us with SIGTERM, a user with Ctrl-C).

    The first SIGTERM is handed to whatever handles SIGINT at that moment -- inside
    ``asyncio.run`` the runner's handler, which cancels the main task so every controller
    runs its shielded undo; elsewhere Python's default, KeyboardInterrupt. Later SIGTERMs
    are ignored while that undo runs (SIGKILL stays the way to stop us at once). The list
    yielded holds the signals received, so the exit code can say which one it was.

    A process started in the background by a script inherits SIGINT *ignored*; then
    ``asyncio.run`` installs no handler of its own and a SIGTERM could only raise
    KeyboardInterrupt somewhere inside the event loop, skipping the undo. So for the
    command's duration an ignored SIGINT is blocked (held pending in every thread, the
    later ones inherit the mask) and Python's default handler stands in, which lets
    ``asyncio.run`` install its own; the inherited disposition is put back at the end,
    pending SIGINTs discarded, as ignoring them meant.
    """
    received: list[int] = []

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:
            return
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT at the C default: still stop, the Python way
            raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave it alone
        yield received
        return
    inherited = signal.getsignal(signal.SIGINT)
    masked = inherited is signal.SIG_IGN
    if masked:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield received
    finally:
        if masked:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # discards a pending SIGINT
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    with _sigterm_as_sigint() as received:
        try:
            return _main(argv, received)
        except KeyboardInterrupt:  # before or after the handler ran (parsing, set-up)
            return _interrupted(received)


def _interrupted(received: list[int]) -> int:
    if received:
        print("spice-libvirt: terminated (SIGTERM)", file=sys.stderr)
        return int(ExitCode.TERMINATED)
    print("spice-libvirt: interrupted", file=sys.stderr)
    return int(ExitCode.INTERRUPTED)


def _main(argv: Sequence[str] | None, received: list[int]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    # qemu.qmp logs every failed connect attempt at ERROR; our retries and the one-line
    # error on stderr say it better, so its own lines are shown only with -vv
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if args.verbose >= 2 else logging.CRITICAL)
    handler: Handler = args.handler
    try:
        return int(handler(args))
    except errors.SpiceLibvirtError as exc:
        print(f"spice-libvirt: error: {exc}", file=sys.stderr)
        return int(for_error(exc))
    except KeyboardInterrupt:
        return _interrupted(received)
    except BrokenPipeError:
        # the reader of our output went away (``| head``): not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the exit-time flush
        return int(ExitCode.OK)
    except Exception as exc:  # last resort: one line, no traceback, unless -vv
        if args.verbose >= 2:
            raise
        print(f"spice-libvirt: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return int(ExitCode.FAILURE)
