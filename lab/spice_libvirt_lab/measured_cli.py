"""``spice-libvirt`` with its own peak memory written down at exit (the hostile matrix).

The peak resident set of a child cannot be read from its parent: ``wait4``'s ``ru_maxrss``
also counts the parent's pages at the fork, and /proc disappears with the process. So the
child reports its own ``VmHWM`` (the high-water mark of *its* address space since exec)
into the file named by ``SPICE_LIBVIRT_HWM_FILE`` as it exits. Nothing else is imported
here: the figure is the command's own.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

HWM_ENV = "SPICE_LIBVIRT_HWM_FILE"


def _vmhwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _write_hwm(path: str) -> None:
    Path(path).write_text(f"{_vmhwm_kib()}\n")


def main() -> None:
    path = os.environ.get(HWM_ENV)
    if path:
        atexit.register(_write_hwm, path)
    from spice_libvirt.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
