"""Start the libvirt hook: ``PYTHON -I -S .../spice_libvirt/hook/launch.py OBJECT OP SUBOP EXTRA``.

Why a file run by path and not the ``spice-libvirt-hook`` console script: libvirtd runs the
hook on every event of every domain, and most of a console script's start-up beyond the
bare interpreter is ``site`` scanning site-packages and running its ``.pth`` files (an
editable install's import finder, setuptools' distutils hack, whatever else the venv
holds). The hook needs only the standard library and this package, so the shim
:mod:`~spice_libvirt.hook.install` writes runs the venv's interpreter with ``-S`` (no
``site``) and ``-I`` (no ``PYTHON*`` variables, no user site, no script directory on
``sys.path``) on this file, which calls the same :func:`spice_libvirt.hook.qemu_hook.main` the
console script calls.

Three things it does besides calling it:

* the directory *holding* the package goes at the end of ``sys.path``, after the standard
  library, which it must never shadow;
* ``spice_libvirt`` is registered as a bare package (its ``__path__`` only), so the package's
  ``__init__`` does not run in the hook process. The hook uses nothing from it (only
  :mod:`spice_libvirt.errors` and :mod:`spice_libvirt.config`, imported as modules), and
  keeping it out means an import added there for the CLI or the API (``typing`` today,
  which drags in ``re``, ``enum``, ``functools``...) can never slow down every guest event
  on the host. ``tests/test_hook_launch.py`` checks which modules a hook call loads;
* it ends the process with ``os._exit`` once :func:`~spice_libvirt.hook.qemu_hook.main` has
  returned (output flushed, journal closed): the interpreter's teardown of the loaded
  modules is work no one needs, on every guest event;
* an exception it did not expect -- the hook's modules failing to import (a broken or
  half-upgraded install) -- is one line on stderr and exit 0: the configuration that could
  ask for fail-closed is unknown then, as with an unreadable configuration file.
"""

import os
import sys

if __name__ == "__main__":
    _root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.append(_root)
    _package = type(sys)("spice_libvirt", "spice-libvirt (bare package for the hook)")
    _package.__path__ = [os.path.join(_root, "spice_libvirt")]
    sys.modules["spice_libvirt"] = _package
    try:
        from spice_libvirt.hook.qemu_hook import main

        _code = main()  # returns with its output flushed and the journal closed
    except Exception as _exc:  # a broken install: the configuration is unknown, fail open
        _text = " ".join(str(_exc).split())
        sys.stderr.write(f"spice-libvirt-hook: unexpected {type(_exc).__name__}: {_text} "
                         "(failing open)\n")  # fmt: skip
        _code = 0
    # No interpreter teardown (finalising sqlite3, pyexpat and every module: ~2 ms of CPU
    # on every guest event, benchmarks/bench_hook.py): the process has nothing left to do.
    for _stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - contextlib is an import the hook does not pay for
            _stream.flush()
        except (OSError, ValueError):  # closed with main's UTF-8 wrapper, or a gone reader
            pass
    os._exit(_code)
