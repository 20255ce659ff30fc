"""``python -m spice_libvirt``: the same as the ``spice-libvirt`` command."""

import sys

from spice_libvirt.cli import main

sys.exit(main())
