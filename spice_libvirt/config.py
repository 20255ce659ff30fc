"""Host configuration of spice-libvirt, shared by the CLI and the libvirt hook.

The hook runs inside libvirtd with a scrubbed environment and no command-line options of
its own, so everything it needs to know about *this host* (which address SPICE should
listen on, where the journal lives, whether to fail open or closed) must come from a file.
That file is ``/etc/spice-libvirt/config.toml``; ``SPICE_LIBVIRT_CONFIG`` names another one
(the labs bake it into the hook shim, one file per simulated host). Environment variables
with the ``SPICE_LIBVIRT_`` prefix override single keys, mostly for tests and one-off runs.

Precedence, highest first: keyword arguments, environment, TOML file, defaults. The file
is flat TOML, for example::

    spice_address = "192.0.2.10"
    journal_path = "/var/lib/spice-libvirt/journal.sqlite3"
    journal_max_rows = 10000
    fail_closed = false
    hook_timeout_s = 1.5

A missing default file means "all defaults"; a missing file that was named explicitly, a
file that is not TOML, unknown keys and out-of-range values raise
:class:`~spice_libvirt.errors.ConfigError` with one line that says which key is wrong.

Why a standard-library dataclass with hand-written checks instead of pydantic(-settings):
the hook loads this module on every guest operation, under a deadline of at most 2 s that
counts from interpreter start, and 16 hooks at once on a small host all pay the import.
pydantic and pydantic-settings were two thirds of the hook's start-up (0.19 s of CPU); without
them 16 hooks starting together on two busy cores still make their deadline.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from spice_libvirt.errors import ConfigError

#: Where the host configuration lives unless ``SPICE_LIBVIRT_CONFIG`` says otherwise.
DEFAULT_CONFIG_PATH = Path("/etc/spice-libvirt/config.toml")
#: The environment variable that names another configuration file.
CONFIG_ENV = "SPICE_LIBVIRT_CONFIG"
#: Prefix of the environment variables that override single keys (case-insensitive).
ENV_PREFIX = "SPICE_LIBVIRT_"
#: Where the hook journal lives by default (FHS: variable state of a local package).
DEFAULT_JOURNAL_PATH = Path("/var/lib/spice-libvirt/journal.sqlite3")
#: libvirt blocks the guest operation while a hook runs; the project promises at most 2 s.
MAX_HOOK_TIMEOUT_S = 2.0

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class InvalidSettingsError(ValueError):
    """One or more keys are invalid; ``problems`` holds ``(key, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    """Everything a host's spice-libvirt installation is configured with.

    Values are checked (and normalised) on construction, from TOML types or from the strings
    of environment variables alike; :class:`InvalidSettingsError` names every bad key.
    """

    #: the address this host's SPICE servers listen on and clients can reach; the hook
    #: rewrites a non-local graphics listen address of an incoming migration to it.
    #: Unset: the hook never rewrites.
    spice_address: str | None = None
    #: SQLite file of the hook journal
    journal_path: Path = DEFAULT_JOURNAL_PATH
    #: newest rows kept in the journal (10 .. 10 000 000)
    journal_max_rows: int = 10_000
    #: when the hook cannot do its job: false = say so on stderr and let libvirt go on
    #: (exit 0), true = make libvirt abort the operation (exit 1)
    fail_closed: bool = False
    #: hard deadline of one hook invocation, interpreter start included (0 < s <= 2)
    hook_timeout_s: float = 1.5

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        checks: dict[str, Callable[[Any], Any]] = {
            "spice_address": _address_or_hostname,
            "journal_path": _absolute_path,
            "journal_max_rows": _integer(10, 10_000_000),
            "fail_closed": _boolean,
            "hook_timeout_s": _timeout,
        }
        for name, check in checks.items():
            try:
                object.__setattr__(self, name, check(getattr(self, name)))
            except ValueError as exc:
                problems.append((name, str(exc)))
        if problems:
            raise InvalidSettingsError(problems)


def _address_or_hostname(value: object) -> str | None:
    """An IP address (v4 or v6) or a DNS name; anything else would reach QEMU's argv."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not an IP address or host name: {value!r}")
    value = value.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if _HOSTNAME_RE.match(value):
        return value
    raise ValueError(f"not an IP address or host name: {value!r}")


def _absolute_path(value: object) -> Path:
    if not isinstance(value, str | Path):
        raise ValueError(f"not a path: {value!r}")
    path = Path(value)
    # libvirtd runs hooks with cwd=/; a relative path would silently mean /<path>.
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path: {str(value)!r}")
    return path


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"not a boolean (true/false): {value!r}")


def _number(value: object, kind: type[int] | type[float]) -> int | float:
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, int | float) and (kind is float or isinstance(value, int)):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    raise ValueError(f"not {'an integer' if kind is int else 'a number'}: {value!r}")


def _integer(low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        number = int(_number(value, int))
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}, got {number}")
        return number

    return check


def _timeout(value: object) -> float:
    number = float(_number(value, float))
    if not 0.0 < number <= MAX_HOOK_TIMEOUT_S:
        raise ValueError(f"must be more than 0 and at most {MAX_HOOK_TIMEOUT_S:g}, got {number:g}")
    return number


def config_path(environ: dict[str, str] | None = None) -> tuple[Path, bool]:
    """Return the configuration file to read and whether it was named explicitly."""
    env = os.environ if environ is None else environ
    named = env.get(CONFIG_ENV)
    if named:
        return Path(named), True
    return DEFAULT_CONFIG_PATH, False


def load_config(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load the host configuration, raising :class:`ConfigError` when it is invalid.

    ``path`` names the TOML file (default: ``$SPICE_LIBVIRT_CONFIG`` or
    :data:`DEFAULT_CONFIG_PATH`); a path given here or in the environment must exist.
    ``overrides`` win over every other source.
    """
    if path is not None:
        toml_file, explicit = Path(path), True
    else:
        toml_file, explicit = config_path()
    if explicit and not toml_file.is_file():
        raise ConfigError(f"configuration file {toml_file} does not exist")
    values: dict[str, Any] = {}
    try:
        with toml_file.open("rb") as f:
            values.update(tomllib.load(f))
    except FileNotFoundError:
        pass  # only possible for the default file: all defaults
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{toml_file}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{toml_file}: cannot read: {exc.strerror or exc}") from exc
    values.update(_from_environment(os.environ))
    values.update(overrides)
    known = {f.name for f in fields(Settings)}
    unknown = [(k, "unknown key") for k in values if k not in known]
    try:
        if unknown:
            raise InvalidSettingsError(unknown)
        return Settings(**values)
    except InvalidSettingsError as exc:
        raise ConfigError(f"invalid configuration ({toml_file}): {exc}") from exc


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``SPICE_LIBVIRT_<KEY>`` for every known key (other ``SPICE_LIBVIRT_*`` are not ours).

    Values stay strings; :class:`Settings` turns "true", "0.8" or "100" into the field's
    type, and reports them like a bad file value.
    """
    keys = {f"{ENV_PREFIX}{f.name}".lower(): f.name for f in fields(Settings)}
    return {keys[k.lower()]: v for k, v in environ.items() if k.lower() in keys}
