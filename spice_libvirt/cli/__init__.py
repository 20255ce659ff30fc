"""The ``spice-libvirt`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; the handler it installs returns an exit code. Errors derived from
:class:`~spice_libvirt.errors.SpiceLibvirtError` become one line on stderr and a documented
exit code (:mod:`spice_libvirt.exitcodes`), never a traceback: management tools parse both.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from spice_libvirt import errors
from spice_libvirt.exitcodes import ExitCode, for_error

#: Sub-command modules, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = ("probe", "watch", "lab", "migrate", "evacuate", "hook", "journal")

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spice-libvirt",
        description="Seamless SPICE live migration for QEMU/KVM and libvirt, verified.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"spice_libvirt.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"spice_libvirt.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
        print("spice-libvirt: interrupted", file=sys.stderr)
        return 130
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
