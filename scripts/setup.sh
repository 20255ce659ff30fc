#!/usr/bin/env bash
# Prepare this machine (Debian 12) for spice-libvirt development, tests and the lab.
#
#   bash scripts/setup.sh
#
# Idempotent: it prints one short line for each step it actually performs, and nothing when
# nothing needs doing. On failure it says which step failed and shows the end of that step's
# output. What it does:
#   1. installs the Debian packages the lab and the Debian package's build need (apt-get
#      update only if one is missing, or apt cannot name the guest's kernel package);
#   2. creates .venv/ in the repository and installs the project with its dev, libvirt and lab
#      extras (again only when pyproject.toml changed or the venv is incomplete);
#   3. builds the test guests into the cache: the Linux one (python -m spice_libvirt_lab.guest
#      build) and the bare-metal memcheck one from its C sources (python -m
#      spice_libvirt_lab.memcheck build; gcc and ld, nothing downloaded).
# It never edits the machine's libvirt configuration: every lab libvirtd has its own private
# /etc/libvirt (qemu.conf included), and nothing here uses the machine's own libvirtd.
# Environment: PYTHON (interpreter for the venv, default python3, must be >= 3.11),
#              SPICE_LIBVIRT_CACHE (guest cache root), SETUP_SKIP_GUEST=1 (skip step 3),
#              SPICE_LIBVIRT_VAGRANT=0 (leave out the Vagrant lab's packages: vagrant,
#              vagrant-libvirt, mmdebstrap...; scripts/test.sh then leaves out its test).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3}
PACKAGES=(
    qemu-system-x86 libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc libc6-dev
    virt-viewer xvfb xauth tshark busybox-static cpio iproute2 seabios ipxe-qemu procps
    openssl xz-utils python3-venv python3-dev binutils ruby openssh-server openssh-client
    prometheus prometheus-node-exporter
    # the Debian package (scripts/build-deb.sh): Debian's packaging tools, lintian, and what
    # the package depends on (its test runs the packaged CLI with Debian's python3)
    dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-pip lintian
    python3-prometheus-client python3-rich python3-tenacity
)
# the Vagrant lab (lab up --vagrant; its test runs in scripts/test.sh) unless opted out
if [ "${SPICE_LIBVIRT_VAGRANT:-1}" != 0 ]; then
    PACKAGES+=(vagrant vagrant-libvirt mmdebstrap extlinux syslinux-common fdisk qemu-utils dnsmasq-base)
fi

LOG=$(mktemp "${TMPDIR:-/tmp}/spice-libvirt-setup.XXXXXX")
trap 'rm -f "$LOG"' EXIT

say() { echo "setup: $*"; }

# run STEP-DESCRIPTION COMMAND...: quiet unless it fails
run() {
    local what=$1
    shift
    : >"$LOG"
    if ! "$@" >"$LOG" 2>&1; then
        echo "setup: $what failed (command: $*)" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "setup: need root for: $*" >&2
        return 1
    fi
}

# 1. Debian packages -------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    # (outputs captured before matching: with pipefail, "cmd | grep -q" fails when grep's
    # early exit kills cmd with SIGPIPE)
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing+=("$pkg")
    fi
done
# the Linux test guest is built from the kernel package apt knows: without package lists
# (a fresh image) apt cannot name it, so refresh them then too
policy=$(apt-cache policy linux-image-amd64 2>/dev/null || true)
if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
    need_update=1
fi
if [ ${#missing[@]} -gt 0 ] || [ "${need_update:-0}" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # tshark asks whether non-root users may capture; answer "no" without a prompt.
    echo "wireshark-common wireshark-common/install-setuid boolean false" \
        | as_root debconf-set-selections >/dev/null 2>&1 || true
    say "refreshing the apt package lists"
    run "apt-get update" as_root apt-get update -q
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${#missing[@]} Debian packages: ${missing[*]}"
        run "apt-get install ${missing[*]}" as_root apt-get install -y -q "${missing[@]}"
    fi
fi

# 2. Python virtual environment ---------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: $PYTHON is missing or older than Python 3.11 (set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating the virtual environment $VENV"
    run "python -m venv $VENV" "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.spice-libvirt-setup"
want=$(cat "$ROOT/pyproject.toml" "$ROOT/lab/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
    || ! "$VENV/bin/python" -c 'import spice_libvirt, spice_libvirt_lab, libvirt, pytest, mypy' 2>/dev/null; then
    say "installing spice-libvirt (dev, libvirt, client extras) and spice-libvirt-lab into .venv"
    run "pip install -e .[dev,libvirt,client] -e ./lab" \
        "$VENV/bin/python" -m pip install -q -e "$ROOT[dev,libvirt,client]" -e "$ROOT/lab"
    echo "$want" >"$stamp"
fi

# 3. Test guests ----------------------------------------------------------------------------
# The firmware guest is SeaBIOS only (no build); the Linux guest is cached by its inputs,
# so this is a no-op after the first run ("show" tells which guest is there before and after).
if [ "${SETUP_SKIP_GUEST:-0}" != 1 ]; then
    guest() { "$VENV/bin/python" -m spice_libvirt_lab.guest "$@"; }
    before=$(guest show 2>/dev/null || true)
    if [ -z "$before" ]; then
        say "building the Linux test guest (first run: a few minutes)"
    fi
    run "building the linux test guest" guest build -q
    if [ -n "$before" ] && [ "$(guest show 2>/dev/null || true)" != "$before" ]; then
        say "rebuilt the Linux test guest (its inputs changed)"
    fi
    memcheck() { "$VENV/bin/python" -m spice_libvirt_lab.memcheck "$@"; }
    before=$(memcheck show 2>/dev/null || true)
    run "building the memcheck test guest" memcheck build -q
    if [ "$(memcheck show 2>/dev/null || true)" != "$before" ]; then
        say "built the memcheck test guest (its sources or the toolchain changed)"
    fi
fi
