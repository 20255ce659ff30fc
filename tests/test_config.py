"""Host configuration: sources, precedence, and one-line errors for every kind of bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from spice_libvirt import config
from spice_libvirt.config import load_config
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
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.fail_closed = True  # type: ignore[misc]


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
