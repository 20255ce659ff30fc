"""The Vagrant lab's private libvirtd sees its lab directory where root's labs live: ``/run``.

Its mount namespace puts a directory of the lab over ``/run``; a lab directory under
``/run`` (root's default, ``/run/spice-libvirt/lab``) must stay visible to libvirtd, which
keeps the storage pool and the VMs' serial logs there. A real libvirtd, no VM, no network.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from spice_libvirt_lab import labdir
from spice_libvirt_lab.vagrant_libvirtd import PrivateLibvirtd


@pytest.mark.libvirt
@pytest.mark.skipif(shutil.which("libvirtd") is None, reason="libvirtd is not installed")
def test_a_lab_directory_under_run_stays_visible_to_libvirtd() -> None:
    base = labdir.ensure_private_dir(Path("/run/spice-libvirt"))
    lab = Path(tempfile.mkdtemp(prefix="vagrant-libvirtd-", dir=base))
    daemon = PrivateLibvirtd(state_dir=lab / "libvirt")
    try:
        daemon.prepare()
        daemon.start()
        (lab / "pool").mkdir()
        daemon.virsh("pool-define-as", "p", "dir", "--target", str(lab / "pool"))
        daemon.virsh("pool-start", "p")  # libvirtd opens the directory: it sees it
        daemon.virsh("vol-create-as", "p", "v.img", "1M")
        assert (lab / "pool" / "v.img").is_file()  # and what it writes there lands here
        assert daemon.remove_everything() == ["volume v.img", "pool p"]
    finally:
        daemon.stop()
        assert not daemon.alive()
        shutil.rmtree(lab)
