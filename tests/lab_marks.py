"""Marks shared by every test module that builds the two-host libvirt lab."""

from __future__ import annotations

import os
import shutil

import pytest

LIBVIRT_LAB = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("libvirtd") is None, reason="libvirtd is not installed"),
]
