"""Record-stream continuity checks and spice:// URI parsing."""

from __future__ import annotations

import pytest

from spice_libvirt.errors import ConfigError
from spice_libvirt.spice.stream import StreamChecker, parse_record
from spice_libvirt.spice.uri import parse_spice_uri


def rec(n: int, ms: int = 5) -> bytes:
    return b"%020d %010d\n" % (n, ms)


def test_contiguous_stream_in_odd_chunks() -> None:
    data = b"".join(rec(i) for i in range(100))
    checker = StreamChecker()
    for i in range(0, len(data), 7):
        checker.feed(data[i : i + 7], now=float(i))
    stats = checker.snapshot()
    assert (stats.records, stats.gaps, stats.duplicates, stats.first, stats.last) == (
        100,
        0,
        0,
        0,
        99,
    )


def test_gaps_duplicates_and_garbage() -> None:
    checker = StreamChecker()
    checker.feed(
        rec(0) + rec(1) + rec(5) + rec(5) + rec(3) + b"garbage-garbage\n" + rec(6), now=1.0
    )
    stats = checker.snapshot()
    assert (stats.records, stats.gaps, stats.duplicates, stats.malformed) == (4, 1, 2, 1)
    assert parse_record(rec(42)) == 42
    assert parse_record(b"x" * 32) is None


def test_stall_is_measured_between_arrivals() -> None:
    checker = StreamChecker()
    checker.feed(rec(0), now=10.0)
    checker.feed(rec(1), now=10.25)
    assert checker.snapshot().max_stall_ms == 250.0
    checker.reset_stall()
    assert checker.snapshot().max_stall_ms == 0.0


@pytest.mark.parametrize(
    ("text", "host", "port", "tls"),
    [
        ("spice://127.0.0.1:5900", "127.0.0.1", 5900, None),
        ("spice://hostB:5900?tls-port=5901", "hostb", 5900, 5901),
        ("spice://hostB?tlsPort=5901", "hostb", None, 5901),
        ("spice://[::1]:5900", "::1", 5900, None),
        ("spice://h?port=5902", "h", 5902, None),
    ],
)
def test_uri_forms(text: str, host: str, port: int | None, tls: int | None) -> None:
    uri = parse_spice_uri(text)
    assert (uri.host, uri.port, uri.tls_port) == (host, port, tls)


@pytest.mark.parametrize(
    "text",
    ["vnc://h:5900", "spice://h", "spice://h:99999", "spice://:5900", "spice://h?tls-port=x"],
)
def test_bad_uris_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_spice_uri(text)
