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

Why a plain pydantic model and a dozen lines of merging instead of ``pydantic-settings``:
the hook loads this module on every guest operation, under a deadline of at most 2 s that
counts from interpreter start, and 16 hooks at once on a small host all pay the import.
``pydantic-settings`` (and the asyncio it pulls in) cost about a third of the hook's start-up.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class Settings(BaseModel):
    """Everything a host's spice-libvirt installation is configured with."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    spice_address: str | None = Field(
        default=None,
        description=(
            "the address this host's SPICE servers listen on and clients can reach; the hook "
            "rewrites a non-local graphics listen address of an incoming migration to it. "
            "Unset: the hook never rewrites."
        ),
    )
    journal_path: Path = Field(
        default=DEFAULT_JOURNAL_PATH, description="SQLite file of the hook journal"
    )
    journal_max_rows: int = Field(
        default=10_000, ge=10, le=10_000_000, description="newest rows kept in the journal"
    )
    fail_closed: bool = Field(
        default=False,
        description=(
            "when the hook cannot do its job: false = say so on stderr and let libvirt go on "
            "(exit 0), true = make libvirt abort the operation (exit 1)"
        ),
    )
    hook_timeout_s: float = Field(
        default=1.5,
        gt=0.0,
        le=MAX_HOOK_TIMEOUT_S,
        description="hard deadline of one hook invocation, interpreter start included",
    )

    @field_validator("spice_address")
    @classmethod
    def _address_or_hostname(cls, value: str | None) -> str | None:
        """An IP address (v4 or v6) or a DNS name; anything else would reach QEMU's argv."""
        if value is None:
            return None
        value = value.strip()
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        if _HOSTNAME_RE.match(value):
            return value
        raise ValueError(f"not an IP address or host name: {value!r}")

    @field_validator("journal_path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # libvirtd runs hooks with cwd=/; a relative path would silently mean /<path>.
        if not value.is_absolute():
            raise ValueError(f"must be an absolute path: {str(value)!r}")
        return value


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
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_one_line(toml_file, exc)) from exc


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``SPICE_LIBVIRT_<KEY>`` for every known key (other ``SPICE_LIBVIRT_*`` are not ours).

    Values stay strings; the model's lax validation turns "true", "0.8" or "100" into the
    field's type, and reports them like a bad file value.
    """
    fields = {f"{ENV_PREFIX}{name}".lower(): name for name in Settings.model_fields}
    return {fields[k.lower()]: v for k, v in environ.items() if k.lower() in fields}


def _one_line(toml_file: Path, exc: ValidationError) -> str:
    """Summarise a validation error as one line naming each bad key (libvirt logs one line)."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(config)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return f"invalid configuration ({toml_file}): " + "; ".join(parts)
