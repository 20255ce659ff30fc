"""A hold mark cannot exempt a domain from the host agent for good.

The controller marks a domain for :data:`CONTROLLER_CLAIM_S`; anyone who can write the
domain's metadata can write a mark that says "until the year 3000". Such an expiry counts
as the controller's window from when the agent first saw the mark.
"""

from __future__ import annotations

from spice_libvirt.libvirt.claim import (
    CONTROLLER_CLAIM_S,
    ClaimClock,
    claim_active,
    claim_xml,
)

FAR = 32_503_680_000.0  # the year 3000


def test_far_future_mark_counts_as_the_claim_window() -> None:
    now = 1_000_000.0
    mark = claim_xml("spice-libvirt migrate (pid 1)", FAR)
    assert claim_active(mark, now) == "spice-libvirt migrate (pid 1)"
    assert claim_active(mark, now + 10, seen_at=now) is not None
    assert claim_active(mark, now + CONTROLLER_CLAIM_S + 1, seen_at=now) is None
    # a mark within the window keeps its own, shorter expiry
    short = claim_xml("x", now + 30)
    assert claim_active(short, now + 29, seen_at=now) == "x"
    assert claim_active(short, now + 31, seen_at=now) is None


def test_the_agent_bounds_a_mark_by_its_first_sighting() -> None:
    clock = ClaimClock()
    mark = claim_xml("forever", FAR)
    t0 = 5_000.0
    assert clock.holder("uuid-1", mark, t0) == "forever"
    # read again at every migration: still counted from the first sighting
    assert clock.holder("uuid-1", mark, t0 + CONTROLLER_CLAIM_S - 1) == "forever"
    assert clock.holder("uuid-1", mark, t0 + CONTROLLER_CLAIM_S + 1) is None
    assert clock.holder("uuid-1", mark, t0 + 10 * CONTROLLER_CLAIM_S) is None
    # another domain's mark has its own window; a new mark (a controller's next
    # migration) starts a new one; a removed mark is forgotten
    assert clock.holder("uuid-2", mark, t0 + 500) == "forever"
    renewed = claim_xml("spice-libvirt migrate (pid 2)", t0 + 1000 + CONTROLLER_CLAIM_S)
    assert clock.holder("uuid-1", renewed, t0 + 1000) == "spice-libvirt migrate (pid 2)"
    assert clock.holder("uuid-1", None, t0 + 1001) is None
    assert clock.holder("uuid-1", mark, t0 + 1002) == "forever"


def test_a_mark_made_on_another_host_is_not_honoured() -> None:
    """Live metadata travels with the domain: the controller's mark for its migration out of
    hv1 arrives on hv2, where the next migration (anyone's) is the agent's to hold."""
    xml = claim_xml("spice-libvirt migrate (pid 5)", until=1000.0, host="hv1")
    assert claim_active(xml, 999.0, host="hv1") == "spice-libvirt migrate (pid 5)"
    assert claim_active(xml, 999.0, host="hv2") is None
    assert claim_active(xml, 999.0) == "spice-libvirt migrate (pid 5)"  # host unknown: honoured
    unnamed = claim_xml("older controller", until=1000.0)
    assert claim_active(unnamed, 999.0, host="hv2") == "older controller"
