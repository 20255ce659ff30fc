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
    syslog_socket = "/dev/log"
    metrics_textfile = "/var/lib/prometheus/node-exporter/spice_libvirt.prom"

(``spice_libvirt/config.example.toml``, shipped in the package, says the same with a
comment for each key.) A missing default file means "all defaults"; a missing file that was named explicitly, a
file that is not TOML, unknown keys and out-of-range values raise
:class:`~spice_libvirt.errors.ConfigError` with one line that says which key is wrong.

Why plain Python with hand-written checks instead of pydantic(-settings), dataclasses or even
``tomllib`` and ``pathlib`` on every call: the hook loads this module on every guest
operation of every domain, under a deadline of at most 2 s that counts from interpreter
start, and 16 hooks at once on a small host all pay the imports. pydantic and
pydantic-settings were two thirds of the hook's start-up (0.19 s of CPU); ``dataclasses``
(which imports ``inspect``), ``typing``, ``pathlib`` and ``tomllib`` (``re``, ``typing``) were
most of what remained. So :class:`Settings` is a plain frozen class, paths are kept as
strings and handed out as :class:`~pathlib.Path` on attribute access, and a flat file of
simple ``key = value`` lines is read by :func:`_read_flat_toml`, which hands anything
beyond that subset to ``tomllib`` (same values, same errors). ``benchmarks/bench_hook.py``
measures the result.
"""

from __future__ import annotations

import os

from spice_libvirt.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path
    from typing import Any

#: libvirt blocks the guest operation while a hook runs; the project promises at most 2 s.
MAX_HOOK_TIMEOUT_S = 2.0
#: The environment variable that names another configuration file.
CONFIG_ENV = "SPICE_LIBVIRT_CONFIG"
#: Prefix of the environment variables that override single keys (case-insensitive).
ENV_PREFIX = "SPICE_LIBVIRT_"
#: Where the host configuration lives unless ``SPICE_LIBVIRT_CONFIG`` says otherwise (as a
#: string; ``DEFAULT_CONFIG_PATH`` is the same as a Path).
DEFAULT_CONFIG_FILE = "/etc/spice-libvirt/config.toml"
#: Where the hook journal lives by default (FHS: variable state of a local package);
#: ``DEFAULT_JOURNAL_PATH`` is the same as a Path.
DEFAULT_JOURNAL_FILE = "/var/lib/spice-libvirt/journal.sqlite3"

#: The keys, in the order :class:`Settings` lists them.
FIELDS = (
    "spice_address",
    "journal_path",
    "journal_max_rows",
    "fail_closed",
    "hook_timeout_s",
    "syslog_socket",
    "metrics_textfile",
    "allow_taint",
    "migrate_tls",
)
#: The local syslog socket (journald's and rsyslog's); "" turns the log lines off.
DEFAULT_SYSLOG_SOCKET = "/dev/log"

_LAZY_PATHS = {
    "DEFAULT_CONFIG_PATH": DEFAULT_CONFIG_FILE,
    "DEFAULT_JOURNAL_PATH": DEFAULT_JOURNAL_FILE,
}
_HOSTNAME_PATTERN = (
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def __getattr__(name: str) -> Path:
    """``DEFAULT_CONFIG_PATH`` and ``DEFAULT_JOURNAL_PATH`` as Paths, built on first use."""
    if name in _LAZY_PATHS:
        from pathlib import Path

        return Path(_LAZY_PATHS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class InvalidSettingsError(ValueError):
    """One or more keys are invalid; ``problems`` holds ``(key, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


class Settings:
    """Everything a host's spice-libvirt installation is configured with. Frozen.

    Values are checked (and normalised) on construction, from TOML types or from the strings
    of environment variables alike; :class:`InvalidSettingsError` names every bad key.

    * ``spice_address``: the address this host's SPICE servers listen on and clients can
      reach; the hook rewrites a non-local graphics listen address of an incoming migration
      to it. Unset: the hook never rewrites.
    * ``journal_path``: SQLite file of the hook journal (a Path; ``journal_file`` is the
      same as a string, for the hook's start-up).
    * ``journal_max_rows``: newest rows kept in the journal (10 .. 10 000 000).
    * ``fail_closed``: when the hook cannot do its job: false = say so on stderr and let
      libvirt go on (exit 0), true = make libvirt abort the operation (exit 1).
    * ``hook_timeout_s``: hard deadline of one hook invocation, interpreter start included
      (0 < s <= 2).
    * ``syslog_socket``: the AF_UNIX datagram socket that gets one line per hook call and
      per migration (default ``/dev/log``; ``""`` = none). An absent socket is skipped.
    * ``metrics_textfile``: the node_exporter textfile-collector file (``*.prom``) that
      ``migrate`` and ``evacuate`` add their outcomes to (default ``""``: none).
    * ``allow_taint``: ``migrate`` and ``evacuate`` may use libvirt's monitor passthrough
      (``query-spice``; QEMU's max-bandwidth for a guest the taint-free hold cannot keep),
      which marks the domain tainted (``custom-monitor``). Default false.
    * ``migrate_tls``: ``migrate`` and ``evacuate`` encrypt the guest's memory on the wire
      (``VIR_MIGRATE_TLS``): ``"auto"`` (default, None here) where this host is set up for
      it, or always (true) or never (false).
    """

    __slots__ = (
        "allow_taint",
        "fail_closed",
        "hook_timeout_s",
        "journal_file",
        "journal_max_rows",
        "metrics_textfile",
        "migrate_tls",
        "spice_address",
        "syslog_socket",
    )

    spice_address: str | None
    journal_file: str
    journal_max_rows: int
    fail_closed: bool
    hook_timeout_s: float
    syslog_socket: str
    metrics_textfile: str
    allow_taint: bool
    migrate_tls: bool | None

    def __init__(
        self,
        spice_address: object = None,
        journal_path: object = DEFAULT_JOURNAL_FILE,
        journal_max_rows: object = 10_000,
        fail_closed: object = False,
        hook_timeout_s: object = 1.5,
        syslog_socket: object = DEFAULT_SYSLOG_SOCKET,
        metrics_textfile: object = "",
        allow_taint: object = False,
        migrate_tls: object = "auto",
    ) -> None:
        problems: list[tuple[str, str]] = []
        checks: tuple[tuple[str, str, Callable[[Any], Any], object], ...] = (
            ("spice_address", "spice_address", _address_or_hostname, spice_address),
            ("journal_path", "journal_file", _absolute_path, journal_path),
            ("journal_max_rows", "journal_max_rows", _integer(10, 10_000_000), journal_max_rows),
            ("fail_closed", "fail_closed", _boolean, fail_closed),
            ("hook_timeout_s", "hook_timeout_s", _timeout, hook_timeout_s),
            ("syslog_socket", "syslog_socket", _socket_path, syslog_socket),
            ("metrics_textfile", "metrics_textfile", _textfile_path, metrics_textfile),
            ("allow_taint", "allow_taint", _boolean, allow_taint),
            ("migrate_tls", "migrate_tls", _auto_boolean, migrate_tls),
        )
        for key, slot, check, value in checks:
            try:
                object.__setattr__(self, slot, check(value))
            except ValueError as exc:
                problems.append((key, str(exc)))
        if problems:
            raise InvalidSettingsError(problems)

    @property
    def journal_path(self) -> Path:
        from pathlib import Path

        return Path(self.journal_file)

    def _values(self) -> tuple[object, ...]:
        return (
            self.spice_address,
            self.journal_file,
            self.journal_max_rows,
            self.fail_closed,
            self.hook_timeout_s,
            self.syslog_socket,
            self.metrics_textfile,
            self.allow_taint,
            self.migrate_tls,
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: Settings are frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: Settings are frozen")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in FIELDS)
        return f"Settings({shown})"


def _canonical_ipv4(value: str) -> bool:
    """True for a dotted quad that ``ipaddress`` would print back unchanged (no import)."""
    parts = value.split(".")
    return len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and (p == "0" or p[0] != "0") and int(p) < 256
        for p in parts
    )


def _address_or_hostname(value: object) -> str | None:
    """An IP address (v4 or v6) or a DNS name; anything else would reach QEMU's argv."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not an IP address or host name: {value!r}")
    value = value.strip()
    if _canonical_ipv4(value):
        return value
    import ipaddress

    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    import re

    if re.match(_HOSTNAME_PATTERN, value):
        return value
    raise ValueError(f"not an IP address or host name: {value!r}")


def _absolute_path(value: object) -> str:
    if not isinstance(value, str | os.PathLike):
        raise ValueError(f"not a path: {value!r}")
    path = os.fspath(value)
    if not isinstance(path, str):
        raise ValueError(f"not a path: {value!r}")
    # libvirtd runs hooks with cwd=/; a relative path would silently mean /<path>.
    if not os.path.isabs(path):
        raise ValueError(f"must be an absolute path: {str(value)!r}")
    return _pure_path_text(path)


def _pure_path_text(path: str) -> str:
    """``str(Path(path))`` for an absolute POSIX path, without importing pathlib: empty and
    ``.`` components dropped (``..`` kept), two leading slashes kept as POSIX allows."""
    root = "//" if path.startswith("//") and not path.startswith("///") else "/"
    return root + "/".join(p for p in path.split("/") if p and p != ".")


def _socket_path(value: object) -> str:
    """An absolute path, or "" for no syslog at all."""
    if value == "":
        return ""
    return _absolute_path(value)


def _textfile_path(value: object) -> str:
    """An absolute path ending in ``.prom`` (node_exporter reads no other), or "" for none."""
    if value == "":
        return ""
    path = _absolute_path(value)
    if not path.endswith(".prom"):
        raise ValueError(f"must end in .prom (node_exporter's textfile collector): {path!r}")
    return path


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"not a boolean (true/false): {value!r}")


def _auto_boolean(value: object) -> bool | None:
    """``"auto"`` (None: let the program decide), or a boolean."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        return _boolean(value)
    except ValueError:
        raise ValueError(f"not auto, true or false: {value!r}") from None


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


def _default_config_file() -> str:
    # A test (or an embedding tool) may have replaced the module's DEFAULT_CONFIG_PATH.
    named: str | os.PathLike[str] = globals().get("DEFAULT_CONFIG_PATH", DEFAULT_CONFIG_FILE)
    return os.fspath(named)


def config_path(environ: dict[str, str] | None = None) -> tuple[Path, bool]:
    """Return the configuration file to read and whether it was named explicitly."""
    from pathlib import Path

    name, explicit = _config_file(environ)
    return Path(name), explicit


def _config_file(environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    env = os.environ if environ is None else environ
    named = env.get(CONFIG_ENV)
    if named:
        return named, True
    return _default_config_file(), False


def load_config(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load the host configuration, raising :class:`ConfigError` when it is invalid.

    ``path`` names the TOML file (default: ``$SPICE_LIBVIRT_CONFIG`` or
    :data:`DEFAULT_CONFIG_PATH`); a path given here or in the environment must exist.
    ``overrides`` win over every other source.
    """
    if path is not None:
        toml_file, explicit = os.fspath(path), True
    else:
        toml_file, explicit = _config_file()
    if explicit and not os.path.isfile(toml_file):
        raise ConfigError(f"configuration file {toml_file} does not exist")
    values: dict[str, Any] = {}
    try:
        with open(toml_file, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        pass  # only possible for the default file: all defaults
    except OSError as exc:
        raise ConfigError(f"{toml_file}: cannot read: {exc.strerror or exc}") from exc
    else:
        values.update(_parse_toml(toml_file, data))
    values.update(_from_environment(os.environ))
    values.update(overrides)
    unknown = [(k, "unknown key") for k in values if k not in FIELDS]
    try:
        if unknown:
            raise InvalidSettingsError(unknown)
        return Settings(**values)
    except InvalidSettingsError as exc:
        raise ConfigError(f"invalid configuration ({toml_file}): {exc}") from exc


def _parse_toml(toml_file: str, data: bytes) -> dict[str, Any]:
    flat = _read_flat_toml(data)
    if flat is not None:
        return flat
    import tomllib

    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{toml_file}: not valid TOML: not UTF-8 ({exc.reason})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{toml_file}: not valid TOML: {exc}") from exc


_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _read_flat_toml(data: bytes) -> dict[str, Any] | None:
    """The values of a file made only of comments and ``key = value`` lines, or None.

    The subset: bare keys; values that are basic strings without escapes, literal strings,
    ``true``/``false``, decimal integers and plain decimal fractions; comments after
    values. For every file inside it the result equals ``tomllib``'s (a property test
    checks this); anything outside it (tables, arrays, escapes, exponents, duplicate keys,
    control characters, text that is not UTF-8...) returns None, and ``tomllib`` reads the
    file, with its own values and errors.
    """
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    out: dict[str, Any] = {}
    lines = text.split("\n")
    for number, raw in enumerate(lines, 1):
        # CR only as half of a CRLF: a lone one (the last line's too) is tomllib's to refuse
        line = raw[:-1] if raw.endswith("\r") and number < len(lines) else raw
        if any((c < " " and c != "\t") or c == "\x7f" for c in line):
            return None
        line = line.strip(" \t")
        if not line or line[0] == "#":
            continue
        key, eq, rest = line.partition("=")
        key = key.strip(" \t")
        if not eq or not key or not _BARE_KEY.issuperset(key) or key in out:
            return None
        value = _flat_value(rest.strip(" \t"))
        if value is None:
            return None
        out[key] = value[0]
    return out


def _flat_value(text: str) -> tuple[object] | None:
    """One value of the flat subset, as a 1-tuple; None when outside it."""
    if text[:1] in ('"', "'"):
        end = text.find(text[0], 1)
        content = text[1:end]
        after = text[end + 1 :].lstrip(" \t")
        if end < 0 or (text[0] == '"' and "\\" in content) or (after and after[0] != "#"):
            return None
        return (content,)
    token = text.partition("#")[0].rstrip(" \t")
    if token in ("true", "false"):
        return (token == "true",)
    digits = token[1:] if token[:1] in ("+", "-") else token
    whole, dot, fraction = digits.partition(".")
    if not (whole.isascii() and whole.isdigit()) or (whole[0] == "0" and whole != "0"):
        return None
    if not dot:
        return (int(token),)
    if fraction.isascii() and fraction.isdigit():
        return (float(token),)
    return None


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``SPICE_LIBVIRT_<KEY>`` for every known key (other ``SPICE_LIBVIRT_*`` are not ours).

    Values stay strings; :class:`Settings` turns "true", "0.8" or "100" into the field's
    type, and reports them like a bad file value.
    """
    keys = {f"{ENV_PREFIX}{name}".lower(): name for name in FIELDS}
    return {keys[k.lower()]: v for k, v in environ.items() if k.lower() in keys}
