"""Tickets from a file or the environment, never argv; the file is read bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from spice_libvirt.errors import ConfigError
from spice_libvirt.secrets import MAX_TICKET_FILE_BYTES, TICKET_ENV, read_ticket


def test_first_line_of_the_file_wins_over_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("s3cret\nsecond line\n")
    assert read_ticket(f, {TICKET_ENV: "other"}) == "s3cret"
    f.write_text("")
    assert read_ticket(f, {}) == ""
    assert read_ticket(None, {TICKET_ENV: "from-env"}) == "from-env"
    assert read_ticket(None, {}) is None


def _bad_file(kind: str, directory: Path) -> Path:
    if kind == "absent":
        return directory / "absent"
    if kind == "endless":
        return Path("/dev/zero")
    path = directory / "binary"
    path.write_bytes(b"\xff\xfe")
    return path


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("absent", "cannot read ticket file"),
        ("endless", f"larger than {MAX_TICKET_FILE_BYTES} bytes"),
        ("binary", "not UTF-8"),
    ],
)
def test_bad_ticket_files_are_one_line_errors(tmp_path: Path, kind: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        read_ticket(_bad_file(kind, tmp_path), {})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
