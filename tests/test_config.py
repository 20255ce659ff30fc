"""Host configuration: sources, precedence, and one-line errors for every kind of bad input."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spice_libvirt import config
from spice_libvirt.config import FIELDS, Settings, load_config
from spice_libvirt.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SPICE_LIBVIRT_* from the outside, and no real /etc file."""
    import os

    for key in list(os.environ):
        if key.startswith("SPICE_LIBVIRT_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "config.toml")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_when_the_default_file_is_missing() -> None:
    s = load_config()
    assert s.spice_address is None
    assert s.journal_path == Path("/var/lib/spice-libvirt/journal.sqlite3")
    assert s.journal_max_rows == 10_000
    assert s.fail_closed is False
    assert 0 < s.hook_timeout_s <= 2.0


def test_toml_file_named_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(
        tmp_path,
        'spice_address = "192.0.2.7"\njournal_path = "/tmp/j.sqlite3"\n'
        "journal_max_rows = 100\nfail_closed = true\nhook_timeout_s = 0.8\n",
    )
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(path))
    s = load_config()
    assert s.spice_address == "192.0.2.7"
    assert s.journal_path == Path("/tmp/j.sqlite3")
    assert s.journal_max_rows == 100
    assert s.fail_closed is True
    assert s.hook_timeout_s == 0.8


def test_precedence_kwargs_over_env_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, 'spice_address = "192.0.2.1"\njournal_max_rows = 100\n')
    monkeypatch.setenv("SPICE_LIBVIRT_SPICE_ADDRESS", "192.0.2.2")
    s = load_config(path)
    assert s.spice_address == "192.0.2.2"
    assert s.journal_max_rows == 100
    assert load_config(path, spice_address="192.0.2.3").spice_address == "192.0.2.3"


def test_addresses_are_normalised_and_hostnames_accepted(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, 'spice_address = "2001:DB8::0001"\n')).spice_address == (
        "2001:db8::1"
    )
    assert load_config(_write(tmp_path, 'spice_address = "hv2.example.org"\n')).spice_address == (
        "hv2.example.org"
    )


def test_explicitly_named_missing_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICE_LIBVIRT_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope2.toml")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus = 1\n", "bogus: unknown key"),
        ('spice_address = "10.0.0.1; rm -rf /"\n', "spice_address"),
        ('spice_address = "-bad-"\n', "spice_address"),
        ("hook_timeout_s = 5\n", "hook_timeout_s"),
        ("hook_timeout_s = 0\n", "hook_timeout_s"),
        ("journal_max_rows = 1\n", "journal_max_rows"),
        ('journal_max_rows = "many"\n', "journal_max_rows"),
        ('journal_path = "relative/j.sqlite3"\n', "journal_path: must be an absolute"),
        ('fail_closed = "perhaps"\n', "fail_closed"),
        ("spice_address = [\n", "not valid TOML"),
    ],
)
def test_invalid_configuration_is_one_clear_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert str(path) in message


def test_invalid_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPICE_LIBVIRT_JOURNAL_MAX_ROWS", "lots")
    with pytest.raises(ConfigError, match="journal_max_rows"):
        load_config()


def test_settings_are_frozen() -> None:
    s = load_config()
    with pytest.raises(AttributeError, match="frozen"):
        s.fail_closed = True
    assert s.fail_closed is False


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ("true", "fail_closed", True),
        ("0", "fail_closed", False),
        ("Off", "fail_closed", False),
        ("0.8", "hook_timeout_s", 0.8),
        ("2", "hook_timeout_s", 2.0),
        ("250", "journal_max_rows", 250),
        ("/srv/j.sqlite3", "journal_path", Path("/srv/j.sqlite3")),
    ],
)
def test_environment_strings_are_typed(
    monkeypatch: pytest.MonkeyPatch, env: str, field: str, value: object
) -> None:
    monkeypatch.setenv(f"spice_libvirt_{field}", env)  # the prefix is case-insensitive
    assert getattr(load_config(), field) == value


def test_toml_types_are_checked_too(tmp_path: Path) -> None:
    for text, fragment in [
        ("fail_closed = 1\n", "fail_closed: not a boolean"),
        ("journal_max_rows = 100.5\n", "journal_max_rows: not an integer"),
        ("hook_timeout_s = true\n", "hook_timeout_s: not a number"),
        ("spice_address = 5\n", "spice_address: not an IP address"),
        ("journal_path = 5\n", "journal_path: not a path"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            load_config(_write(tmp_path, text))


def test_every_bad_key_is_named_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "hook_timeout_s = 9\njournal_max_rows = 1\n"))
    assert "hook_timeout_s: must be more than 0 and at most 2" in str(info.value)
    assert "journal_max_rows: must be between 10 and 10000000, got 1" in str(info.value)


def test_other_spice_libvirt_variables_are_not_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPICE_LIBVIRT_TICKET", "secret")
    monkeypatch.setenv("SPICE_LIBVIRT_LAB_DIR", "/tmp/x")
    assert load_config().fail_closed is False


# -- the flat-file fast path reads exactly what tomllib reads ------------------------------

_KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789_-", min_size=1, max_size=8)
_SCALARS = st.one_of(
    st.booleans().map(lambda b: "true" if b else "false"),
    st.integers(-(10**20), 10**20).map(str),
    st.from_regex(r"[+-]?(0|[1-9][0-9]{0,3})(\.[0-9]{1,4})?", fullmatch=True),
    st.text(st.characters(codec="utf-8"), max_size=12).map(lambda t: f'"{t}"'),
    st.text(st.characters(codec="utf-8"), max_size=12).map(lambda t: f"'{t}'"),
    # outside the subset or invalid: tomllib must decide
    st.sampled_from(
        [
            "01",
            "1e3",
            "1_000",
            "inf",
            '"a\\tb"',
            "[1, 2]",
            "{a = 1}",
            '"""x"""',
            "1.",
            ".5",
            "TRUE",
            "",
        ]
    ),
)
_LINES = st.one_of(
    st.tuples(
        _KEYS, _SCALARS, st.sampled_from(["", " ", "\t"]), st.sampled_from(["", " # c", "#x=1"])
    ).map(lambda t: f"{t[2]}{t[0]} = {t[1]}{t[3]}"),
    st.sampled_from(["", "# comment", "  ", "[table]", "a.b = 1", "x = 1 2", "\x01", "k = 1\r"]),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINES, max_size=6), st.sampled_from(["\n", "\r\n"]))
def test_flat_fast_path_agrees_with_tomllib(lines: list[str], newline: str) -> None:
    data = newline.join(lines).encode()
    fast = config._read_flat_toml(data)
    try:
        expected: dict[str, object] | None = tomllib.loads(data.decode())
    except tomllib.TOMLDecodeError:
        expected = None
    if fast is not None:
        # inside the subset: the same values and types, never a file tomllib refuses
        assert expected is not None
        assert fast == expected
        assert [type(v) for v in fast.values()] == [type(v) for v in expected.values()]


def test_flat_fast_path_covers_what_a_host_file_holds() -> None:
    text = (
        "# written by the Ansible role\n"
        'spice_address = "192.0.2.10"\n'
        "journal_path = '/var/lib/spice-libvirt/journal.sqlite3'  # default\n"
        "journal_max_rows = 10000\nfail_closed = false\nhook_timeout_s = 1.5\n"
    )
    assert config._read_flat_toml(text.encode()) == tomllib.loads(text)


def test_files_outside_the_subset_get_tomllib_errors(tmp_path: Path) -> None:
    for text, fragment in [
        ("a = 1\na = 2\n", "not valid TOML"),
        ("[spice]\naddress = 1\n", "unknown key"),
        ('spice_address = "192.0.2.\\u0031"\n', None),
    ]:
        path = _write(tmp_path, text)
        if fragment is None:
            assert load_config(path).spice_address == "192.0.2.1"
        else:
            with pytest.raises(ConfigError, match=fragment):
                load_config(path)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'spice_address = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_paths_are_normalised_like_pathlib(tmp_path: Path) -> None:
    for raw in ["/srv//j.sqlite3", "/srv/./x/", "//srv/j", "///srv/j", "/srv/../j"]:
        path = _write(tmp_path, f'journal_path = "{raw}"\n')
        s = load_config(path)
        assert s.journal_path == Path(raw)
        assert s.journal_file == str(Path(raw))


def test_default_paths_are_paths() -> None:
    assert isinstance(config.DEFAULT_JOURNAL_PATH, Path)
    assert str(config.DEFAULT_JOURNAL_PATH) == config.DEFAULT_JOURNAL_FILE


def test_ipv4_fast_path_is_what_ipaddress_prints() -> None:
    for text in ["192.0.2.1", "0.0.0.0", "255.255.255.255", "10.0.0.01", "256.1.1.1", "1.2.3"]:
        fast = config._canonical_ipv4(text)
        try:
            same = str(ipaddress.ip_address(text)) == text
        except ValueError:
            same = False
        assert fast == same, text


def test_the_shipped_example_is_valid_and_documents_every_key() -> None:
    """``spice_libvirt/config.example.toml`` (package data): loads as the defaults, names
    every key, and is listed in pyproject's package data so wheels carry it."""
    from importlib import resources

    example = resources.files("spice_libvirt") / "config.example.toml"
    text = example.read_text(encoding="utf-8")
    with resources.as_file(example) as path:
        assert load_config(path) == Settings()
    for key in FIELDS:
        assert re.search(rf"^#?{key} = ", text, re.MULTILINE), key
    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "config.example.toml" in data["package-data"]["spice_libvirt"]
