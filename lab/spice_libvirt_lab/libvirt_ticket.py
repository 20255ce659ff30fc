"""A SPICE ticket on the lab guest, set the way a manager sets it: through libvirt, on the
running domain's graphics device (``virDomainUpdateDeviceFlags`` with ``passwd`` and
``passwdValidTo``), never on a command line or in the domain XML file on disk.

The lab records only the ticket *file* (the ticket is read from it when a client needs it),
so neither the state file nor ``lab status`` ever holds the secret.
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from pathlib import Path

from pydantic import SecretStr

from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt.secrets import read_ticket
from spice_libvirt_lab.libvirt_host import require_libvirt
from spice_libvirt_lab.libvirt_state import LabState


def lab_ticket(state: LabState) -> SecretStr | None:
    """The lab's ticket, read from its file now (None: the lab has none)."""
    if state.ticket_file is None:
        return None
    ticket = read_ticket(state.ticket_file, env={})
    if not ticket:
        raise ConfigError(f"ticket file {state.ticket_file} is empty")
    return SecretStr(ticket)


def set_ticket(state: LabState, host: str, valid_s: float | None) -> dt.datetime | None:
    """Set the lab's ticket on the guest running on ``host``, valid ``valid_s`` seconds
    from now (None: no expiry); the expiry set, in UTC.

    ``connected='keep'``: a client already linked stays (spice-server would otherwise drop
    it, as ``set_password`` with ``connected=disconnect`` does).
    """
    ticket = lab_ticket(state)
    if ticket is None:
        raise LabError("the lab has no ticket file")
    lv = require_libvirt()
    conn = state.host(host).open()
    try:
        dom = conn.lookupByName(state.domain)
        node = ET.fromstring(dom.XMLDesc(lv.VIR_DOMAIN_XML_SECURE)).find(
            "./devices/graphics[@type='spice']"
        )
        if node is None:
            raise LabError(f"{state.domain} has no SPICE graphics")
        node.set("passwd", ticket.get_secret_value())
        node.set("connected", "keep")
        valid_to = None
        if valid_s is not None:
            valid_to = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=valid_s)).replace(
                microsecond=0
            )
            node.set("passwdValidTo", valid_to.strftime("%Y-%m-%dT%H:%M:%S"))
        elif "passwdValidTo" in node.attrib:
            del node.attrib["passwdValidTo"]
        node.tail = None
        try:
            dom.updateDeviceFlags(ET.tostring(node, encoding="unicode"), lv.VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError as exc:
            # libvirt's message never contains the ticket
            raise LabError(f"setting the SPICE ticket failed: {exc.get_error_message()}") from exc
        return valid_to
    finally:
        conn.close()


def check_ticket_file(path: Path) -> Path:
    """``path`` absolute, readable and non-empty now, so ``lab up`` fails before building."""
    path = path.absolute()
    if not read_ticket(path, env={}):
        raise ConfigError(f"ticket file {path} is empty")
    return path


__all__ = ["check_ticket_file", "lab_ticket", "set_ticket"]
