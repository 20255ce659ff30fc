"""The hook's address rules without ``ipaddress`` agree with ``ipaddress``.

A rewrite judges a foreign IPv4 address and reads this host's IPv6 addresses on every
incoming migration; both are now done without importing ``ipaddress`` (and the
``functools``/``collections`` it drags in). These properties pin them to what
``ipaddress`` says, over random addresses and random sets of local addresses.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from spice_libvirt.hook.local import canonical_ipv4, ipv6_text, is_local_address

_IPV4 = st.builds(
    lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1)
) | st.sampled_from(["127.0.0.1", "127.9.9.9", "0.0.0.0", "10.0.0.1", "10.0.0.2"])
_ENTRY = _IPV4 | st.sampled_from(
    ["::1", "::ffff:10.0.0.1", "hv1", "010.0.0.1", " 10.0.0.1", "[10.0.0.1]", "2001:db8::1"]
)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 2**128 - 1) | st.sampled_from([0, 1, 2**32, 2**48 - 1 << 32, 1 << 112]))
def test_ipv6_text_is_ipaddress(number: int) -> None:
    raw = format(number, "032x")
    assert ipv6_text(raw) == str(ipaddress.IPv6Address(bytes.fromhex(raw)))


@settings(max_examples=500, deadline=None)
@given(_IPV4 | st.text("0123456789.", max_size=16), st.frozensets(_ENTRY, max_size=5))
def test_ipv4_addresses_are_judged_as_ipaddress_would(address: str, local: frozenset[str]) -> None:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        assert not canonical_ipv4(address)
        return
    assert canonical_ipv4(address)
    parsed = set()
    for entry in local:
        try:
            parsed.add(ipaddress.ip_address(entry))
        except ValueError:
            continue
    expected = ip.is_loopback or ip.is_unspecified or ip in parsed
    assert is_local_address(address, local, hostname="hv1") == expected
