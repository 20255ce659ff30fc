"""What an administrator reads before running anything: ``--version`` and ``--help``.

A hypervisor's admin learns the command from ``--help`` alone, so every option of every
sub-command must say what it does (the parser is walked, not sampled), and the version
printed is the package's one version source, the same one pip installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import spice_libvirt
from spice_libvirt.cli import build_parser
from spice_libvirt.exitcodes import EXIT_CODE_HELP

ROOT = Path(__file__).resolve().parents[1]


def _undocumented(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> list[str]:
    missing: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _undocumented(sub, (*path, name))
        elif not action.help or action.help == argparse.SUPPRESS:
            shown = "/".join(action.option_strings) or action.dest
            missing.append(f"{' '.join(path) or '(top)'}: {shown}")
    return missing


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    names: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names += list(action.choices)
    return names


def test_every_option_of_every_subcommand_has_help() -> None:
    parser = build_parser()
    assert {"doctor", "hook", "journal", "migrate"} <= set(_commands(parser))
    assert _undocumented(parser, ()) == []


def test_every_subcommand_help_ends_with_the_exit_codes() -> None:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                text = sub.format_help()
                assert "exit codes:" in text, name
                for code, meaning in EXIT_CODE_HELP.items():
                    assert f"{int(code):>3}  {meaning}" in text, (name, code)


def test_version_is_the_one_version_source() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spice_libvirt", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == f"spice-libvirt {spice_libvirt.__version__}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "spice_libvirt.__version__"}
    # what pip recorded at install time is read from the same attribute
    assert metadata.version("spice-libvirt") == spice_libvirt.__version__


def test_lab_only_dependencies_are_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("cryptography") for d in project["dependencies"])
    assert any(d.startswith("cryptography") for d in project["optional-dependencies"]["client"])


def test_a_host_without_the_lab_extra_runs_the_cli_and_the_controller() -> None:
    """``cryptography`` absent (None in sys.modules makes its import fail, as on a host
    installed without ``[client]``): the CLI, the libvirt controller and the hook still load;
    only linking an embedded client asks for the extra, with a typed error."""
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from spice_libvirt.cli import build_parser; build_parser()\n"
        "import spice_libvirt.libvirt.controller, spice_libvirt.hook.qemu_hook\n"
        "from spice_libvirt.errors import ConfigError\n"
        "from spice_libvirt.spice.link import encrypt_ticket\n"
        "try:\n"
        "    encrypt_ticket(b'', None)\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "pip install 'spice-libvirt[client]'" in out
