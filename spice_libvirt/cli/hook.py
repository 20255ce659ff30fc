"""``spice-libvirt hook install|uninstall|status``: manage the libvirt hook shim.

The work is done by :mod:`spice_libvirt.hook.install`; this module only maps arguments to
it and results to text (or JSON for ``status --json``, which the Ansible role checks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spice_libvirt.exitcodes import ExitCode
from spice_libvirt.hook import install as hook_install


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "hook",
        help="install, remove or inspect the libvirt qemu hook",
        description=(
            "Manage the libvirt hook shim in HOOKS_DIR/qemu.d/50-spice-libvirt (libvirt >= "
            "6.5). HOOKS_DIR/qemu itself is never written: VDSM and other tools own it. "
            "libvirtd (or virtqemud) looks for hooks when it starts or reloads: reload it afterwards "
            "(systemctl reload libvirtd, i.e. SIGHUP; running guests and migrations go on). "
            "`spice-libvirt doctor` says whether the running daemon has seen the hook."
        ),
    )
    actions = parser.add_subparsers(dest="hook_action", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--hooks-dir",
            type=Path,
            default=hook_install.DEFAULT_HOOKS_DIR,
            help="libvirt's hook directory (default: %(default)s)",
        )

    p_install = actions.add_parser("install", help="write the shim into qemu.d/")
    common(p_install)
    p_install.add_argument(
        "--executable",
        type=Path,
        default=None,
        help="exec this spice-libvirt-hook console script instead of the default (this "
        "venv's python -I -S on the installed launcher, the fastest start)",
    )
    p_install.add_argument(
        "--config",
        type=Path,
        default=None,
        help="bake SPICE_LIBVIRT_CONFIG=CONFIG into the shim (default: the hook reads "
        "/etc/spice-libvirt/config.toml)",
    )
    p_install.set_defaults(handler=_install)

    p_uninstall = actions.add_parser("uninstall", help="remove our shim (only ours)")
    common(p_uninstall)
    p_uninstall.set_defaults(handler=_uninstall)

    p_status = actions.add_parser("status", help="say whether the hook is installed and usable")
    common(p_status)
    p_status.add_argument("--json", action="store_true", help="print the status as JSON")
    p_status.set_defaults(handler=_status)


def _install(args: argparse.Namespace) -> int:
    res = hook_install.install(args.hooks_dir, executable=args.executable, config=args.config)
    print(res.message)
    return int(ExitCode.OK)


def _uninstall(args: argparse.Namespace) -> int:
    res = hook_install.uninstall(args.hooks_dir)
    print(res.message)
    return int(ExitCode.OK)


def _status(args: argparse.Namespace) -> int:
    st = hook_install.status(args.hooks_dir)
    if args.json:
        data = st.model_dump(mode="json")
        data["installed"] = st.installed
        data["qemu_d_supported"] = st.qemu_d_supported
        print(json.dumps(data, indent=2))
        return int(ExitCode.OK)
    if st.installed:
        print(f"installed: {st.shim_path}")
        state = "ok" if st.target_ok else "MISSING or not executable"
        print(f"  execs: {st.target} ({state})")
        if st.launcher:
            print(f"  launcher: {st.launcher}")
        if st.config is not None:
            print(f"  config: {st.config}" + ("" if st.config.is_file() else " (MISSING)"))
    elif st.present:
        print(f"not installed: {st.shim_path} exists but was not written by spice-libvirt")
    else:
        print(f"not installed: {st.shim_path} does not exist")
    if st.foreign_qemu_hook:
        print(f"foreign hook: {st.hooks_dir / 'qemu'} exists (left alone; it runs before qemu.d)")
    else:
        print(f"foreign hook: none at {st.hooks_dir / 'qemu'}")
    if st.other_scripts:
        print("other qemu.d scripts: " + ", ".join(st.other_scripts))
    if st.libvirt_version is None:
        print("libvirt: daemon not found (qemu.d/ needs libvirt >= 6.5)")
    elif st.qemu_d_supported is False:
        print(f"libvirt: {st.libvirt_version}: TOO OLD, qemu.d/ hooks need libvirt >= 6.5")
    else:
        print(f"libvirt: {st.libvirt_version} (runs qemu.d/ hooks)")
    return int(ExitCode.OK)
