"""The Debian package of the hypervisor part, built from this tree with Debian's own tools.

``scripts/build-deb.sh`` (through :func:`spice_libvirt_lab.deb.ensure_deb`, which keeps one
build per tree content: the Vagrant test installs the same file on hv2) builds it with
dpkg-buildpackage, debhelper and pybuild, offline (the bundled wheels from the local cache
the Ansible tests fill). Then, without installing it on this machine (it would hook this
machine's libvirtd):

* lintian finds no error and no warning;
* it holds the CLI, the bundled modules Debian 12 lacks, the agent's sandboxed unit (the text
  ``spice-libvirt agent unit`` prints for /usr/bin/spice-libvirt), the example
  configurations as its only conffiles, man pages -- and nothing of the labs;
* its maintainer scripts install and remove the hook shim through ``spice-libvirt hook`` and
  only ever *reload* libvirtd;
* it depends on Debian's python3-libvirt, python3-prometheus-client, python3-rich and
  python3-tenacity, never on
  Debian's pydantic 1, and on CPython 3.11 (the bundled pydantic-core is built for it);
* unpacked, its CLI runs with Debian's ``/usr/bin/python3`` and those Debian modules: the
  bundled pydantic 2 is the one it imports, ``lab`` says in one line what to install.

What an install does on a host (apt install, doctor, the agent, a migration there and back,
apt purge) is in tests/test_vagrant_lab.py: only the Vagrant VMs have systemd.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from spice_libvirt.cli import LAB_NOT_INSTALLED
from spice_libvirt.cli.agent import unit_text
from spice_libvirt.exitcodes import ExitCode
from spice_libvirt_lab import deb
from tests.test_ansible_ssh import CONSTRAINTS, find_links  # noqa: F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpkg-buildpackage") is None, reason="dpkg-dev missing"),
]

REPO = Path(__file__).resolve().parent.parent
PRIVATE = "usr/lib/spice-libvirt"


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def package(find_links: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    log = tmp_path_factory.mktemp("deb") / "build.log"
    return deb.ensure_deb(log, find_links)


@pytest.fixture(scope="module")
def files(package: Path) -> dict[str, str]:
    """Every path in the package -> its mode and owner, as ``dpkg-deb -c`` lists them."""
    listing = _run(["dpkg-deb", "-c", str(package)])
    assert listing.returncode == 0, listing.stderr
    found = {}
    for line in listing.stdout.splitlines():
        fields = line.split()
        found[fields[5].removeprefix("./").rstrip("/")] = f"{fields[0]} {fields[1]}"
    return found


def _control(package: Path, member: str) -> str:
    tar_bytes = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(package)], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        extracted = tar.extractfile(f"./{member}")
        assert extracted is not None, member
        return extracted.read().decode()


def test_lintian_finds_no_error_and_no_warning(package: Path) -> None:
    proc = _run(["lintian", "--fail-on", "error,warning", str(package)], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [x for x in proc.stdout.splitlines() if x[:2] in ("E:", "W:")], proc.stdout


def test_contents_are_the_hypervisor_part(package: Path, files: dict[str, str]) -> None:
    assert re.fullmatch(r"spice-libvirt_\d+\.\d+\.\d+_amd64\.deb", package.name)
    for path in (
        "usr/bin/spice-libvirt", "usr/bin/spice-libvirt-hook",
        f"{PRIVATE}/spice_libvirt/hook/launch.py", f"{PRIVATE}/spice_libvirt/cli/__init__.py",
        f"{PRIVATE}/pydantic/__init__.py", f"{PRIVATE}/pydantic_core/__init__.py",
        f"{PRIVATE}/qemu/qmp/__init__.py", "lib/systemd/system/spice-libvirt-agent.service",
        "etc/spice-libvirt/config.toml", "etc/spice-libvirt/agent.toml",
        "usr/share/man/man1/spice-libvirt.1.gz", "usr/share/doc/spice-libvirt/copyright",
    ):  # fmt: skip
        assert path in files, path
    assert files["usr/bin/spice-libvirt"] == "-rwxr-xr-x root/root"
    assert {v.split()[1] for v in files.values()} == {"root/root"}
    assert not [p for p, v in files.items() if v[5] == "w" or v[8] == "w"]  # nothing g/o-writable
    # no lab, no test, no GPL-2 tool of qemu.qmp, no shim file (the postinst writes it)
    assert not [p for p in files if "lab" in Path(p).name or "/tests/" in p], files
    assert not [
        p for p in files if "qmp_shell" in p or "qmp_tui" in p or p.startswith("etc/libvirt")
    ]
    assert not [p for p in files if "__pycache__" in p]  # compiled on the host by py3compile


def test_unit_and_conffiles(package: Path, tmp_path: Path) -> None:
    assert _run(["dpkg-deb", "-x", str(package), str(tmp_path)]).returncode == 0
    unit = (tmp_path / "lib/systemd/system/spice-libvirt-agent.service").read_text()
    assert unit == unit_text("/usr/bin/spice-libvirt")
    assert "ProtectSystem=strict" in unit
    assert _control(package, "conffiles").split() == [
        "/etc/spice-libvirt/agent.toml",
        "/etc/spice-libvirt/config.toml",
    ]


def test_maintainer_scripts_only_reload_libvirtd(package: Path) -> None:
    postinst, prerm, postrm = (_control(package, m) for m in ("postinst", "prerm", "postrm"))
    assert "spice-libvirt hook install" in postinst
    assert "spice-libvirt hook uninstall" in prerm
    assert "rm -rf /var/lib/spice-libvirt" in postrm
    for script in (postinst, prerm, postrm):
        for line in script.splitlines():
            if "libvirtd" in line or "virtqemud" in line:
                assert not re.search(r"\b(restart|stop|start)\b", line), line
    assert 'deb-systemd-invoke reload "$unit"' in postinst


def test_dependencies_are_debians_where_debian_has_them(package: Path) -> None:
    fields = _control(package, "control")
    depends = next(x for x in fields.splitlines() if x.startswith("Depends:"))
    for wanted in (
        "python3-libvirt (>= 9.0)", "python3-rich (>= 13)", "python3-tenacity (>= 8)",
        "python3-prometheus-client (>= 0.16)",
        "python3 (<< 3.12)", "libvirt-daemon-system",
    ):  # fmt: skip
        assert wanted in depends, depends
    assert "pydantic" not in depends  # Debian 12's is 1.10: the package brings its own 2.x
    assert "Architecture: amd64" in fields
    # the bundled versions are the role's pinned ones
    pinned = dict(
        ln.split("==") for ln in CONSTRAINTS.read_text().splitlines() if "==" in ln
    )  # fmt: skip
    bundled = (REPO / "debian" / "vendor.txt").read_text().splitlines()
    for line in (x for x in bundled if x and not x.startswith("#")):
        name, rest = line.split("==", 1)
        version = rest.split()[0]
        key = next(
            k for k in pinned if re.sub(r"[._]", "-", k.lower()) == re.sub(r"[._]", "-", name)
        )
        assert pinned[key] == version, (name, version, pinned[key])
        assert " --hash=sha256:" in line


def test_unpacked_cli_runs_on_debians_python(package: Path, tmp_path: Path) -> None:
    if not Path("/usr/lib/python3/dist-packages/tenacity").is_dir():
        pytest.fail("python3-tenacity missing: bash scripts/setup.sh installs it")
    root = tmp_path / "root"
    assert _run(["dpkg-deb", "-x", str(package), str(root)]).returncode == 0
    boot = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from spice_libvirt.cli import main; sys.exit(main(sys.argv[1:]))"
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return _run(["/usr/bin/python3", "-I", "-c", boot, str(root / PRIVATE), *args])

    assert cli("migrate", "--help").returncode == 0
    version = cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip().endswith(package.name.split("_")[1])
    lab = cli("lab", "up")
    assert (lab.returncode, lab.stderr) == (
        int(ExitCode.LAB),
        f"spice-libvirt: lab: {LAB_NOT_INSTALLED}\n",
    )
    which = _run([
        "/usr/bin/python3", "-I", "-c",
        f"import sys; sys.path.insert(0, {str(root / PRIVATE)!r}); import pydantic, tenacity, rich; "
        "print(pydantic.VERSION, pydantic.__file__, tenacity.__file__, rich.__file__)",
    ])  # fmt: skip
    version_, pyd, ten, rich = which.stdout.split()
    assert version_.startswith("2.")
    assert pyd.startswith(str(root / PRIVATE))
    assert ten.startswith("/usr/lib/python3/dist-packages/")
    assert rich.startswith("/usr/lib/python3/dist-packages/")
