"""The one default lab directory: where it is, created private, refused when not ours.

Pure filesystem checks (no QEMU, no namespaces): they run in milliseconds.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import pytest

from spice_libvirt.errors import LabError
from spice_libvirt_lab import labdir, libvirt_lab, qemu_lab
from spice_libvirt_lab.labdir import UnsafeLabDirectory, ensure_private_dir, remove_inside
from spice_libvirt_lab.libvirt_host import BIND_MOUNTS, HostConfig, LibvirtHost

NOBODY = 65534


def test_every_lab_kind_uses_the_one_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(labdir.LAB_DIR_ENV, raising=False)
    base = labdir.default_lab_dir()
    if os.geteuid() == 0:
        assert base == Path("/run/spice-libvirt/lab")
    assert qemu_lab.default_lab_dir() == base
    assert libvirt_lab.default_lab_dir() == base / "libvirt"
    monkeypatch.setenv(labdir.LAB_DIR_ENV, "/srv/labs/x")
    assert qemu_lab.default_lab_dir() == Path("/srv/labs/x")
    assert libvirt_lab.default_lab_dir() == Path("/srv/labs/x/libvirt")


def test_non_root_default_is_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(labdir.LAB_DIR_ENV, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert labdir.default_lab_dir() == Path("/tmp/spice-libvirt-1000/lab")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert labdir.default_lab_dir() == Path("/run/user/1000/spice-libvirt/lab")


def test_created_private_with_missing_parents(lab_dir: Path) -> None:
    target = lab_dir / "a" / "b" / "lab"
    assert ensure_private_dir(target) == target
    for path in (lab_dir / "a", lab_dir / "a" / "b", target):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {mode:o}"
    # idempotent on a directory that is already ours and private
    ensure_private_dir(target)


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o777])
def test_group_or_world_writable_is_refused(lab_dir: Path, mode: int) -> None:
    target = lab_dir / "lab"
    target.mkdir()
    target.chmod(mode)
    with pytest.raises(UnsafeLabDirectory, match="is writable by"):
        ensure_private_dir(target)


def test_unsafe_is_a_lab_error(lab_dir: Path) -> None:
    """Typed: the CLI maps it to the lab's exit code (10) like every other LabError."""
    assert issubclass(UnsafeLabDirectory, LabError)


@pytest.mark.root  # chown to another user
def test_someone_elses_directory_is_refused(lab_dir: Path) -> None:
    target = lab_dir / "lab"
    target.mkdir(mode=0o700)
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(UnsafeLabDirectory, match=f"uid {NOBODY}"):
        ensure_private_dir(target)


@pytest.mark.root  # chown to another user
def test_a_planted_parent_is_refused_before_anything_is_created(lab_dir: Path) -> None:
    """``/tmp/spice-libvirt-UID`` made by another user first: nothing is created in it."""
    planted = lab_dir / "spice-libvirt-1000"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(UnsafeLabDirectory, match="belongs to uid"):
        ensure_private_dir(planted / "lab")
    assert not (planted / "lab").exists()


def test_writable_parent_without_sticky_bit_is_refused(lab_dir: Path) -> None:
    parent = lab_dir / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(UnsafeLabDirectory, match="is writable by"):
        ensure_private_dir(parent / "lab")
    parent.chmod(0o1777)  # like /tmp: sticky, so others cannot replace our entry
    assert ensure_private_dir(parent / "lab").is_dir()


def test_symlinked_lab_directory_is_refused(lab_dir: Path) -> None:
    real = lab_dir / "real"
    real.mkdir(mode=0o700)
    (lab_dir / "lab").symlink_to(real)
    with pytest.raises(UnsafeLabDirectory, match="symbolic link"):
        ensure_private_dir(lab_dir / "lab")


def test_remove_inside_only_removes_inside(lab_dir: Path) -> None:
    root = lab_dir / "lab"
    inside = root / "run-1" / "A"
    inside.mkdir(parents=True)
    outside = lab_dir / "precious"
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    for bad in (outside, root, root / "escape", root / ".." / "precious"):
        with pytest.raises(UnsafeLabDirectory, match="not inside"):
            remove_inside(root, bad)
    assert outside.is_dir()
    remove_inside(root, root / "run-1")
    assert not (root / "run-1").exists()


def test_host_namespace_mounts_run_last_and_quotes_paths(lab_dir: Path) -> None:
    """The default lab dir lies under /run: /run must be replaced after every other bind."""
    state = lab_dir / "it's a dir" / "A"
    host = LibvirtHost(
        HostConfig(
            name="A",
            hostname="hostA",
            netns="slab000000A",
            ip="10.251.1.1",
            host_uuid="00000000-0000-0000-0000-000000000001",
            state_dir=state,
            hosts={"hostA": "10.251.1.1"},
        )
    )
    script = host.namespace_script()
    mounts = [shlex.split(line) for line in script.splitlines() if line.startswith("mount ")]
    assert [m[-1] for m in mounts] == [target for _, target in BIND_MOUNTS]
    assert mounts[-1][-1] == "/run"
    assert all(m[2] == str(state / src) for m, (src, _) in zip(mounts, BIND_MOUNTS, strict=True))


def test_reading_checks_without_creating(lab_dir: Path) -> None:
    """Read-only commands check an existing directory and create nothing."""
    missing = lab_dir / "nothing-here"
    assert labdir.check_private_dir(missing) == missing
    assert not missing.exists()
    shared = lab_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeLabDirectory, match="is writable by"):
        libvirt_lab.load_state(shared)
    with pytest.raises(UnsafeLabDirectory, match="is writable by"):
        qemu_lab.QemuLab(shared).load()
