#!/usr/bin/env bash
# Build the Debian package of spice-libvirt's hypervisor part (never the labs) into dist/:
#
#   bash scripts/build-deb.sh [--find-links DIR]    -> dist/spice-libvirt_<version>_amd64.deb
#
# With Debian's own tools, from this tree's debian/ directory: dpkg-buildpackage, debhelper,
# pybuild (dh-python's pyproject plugin) and lintian, which must find no error and no warning.
# What it does:
#   1. installs the Build-Depends of debian/control and lintian with apt, when missing;
#   2. copies the files the package is built from (pyproject.toml, README.md, LICENSE,
#      spice_libvirt/, debian/) into a private directory (mktemp, 0700), so that a build
#      never sees the labs, the tests or a stale build/ directory;
#   3. fetches the wheels debian/vendor.txt bundles (pydantic 2, qemu.qmp...: what Debian 12
#      lacks) into that copy's debian/vendor-wheels, from DIR (--find-links, or
#      $SPICE_LIBVIRT_DEB_WHEELS) when given, else from PyPI; pip checks every hash;
#   4. dpkg-buildpackage -b (binary only, unsigned), then lintian on the .deb and .changes;
#   5. copies the .deb into dist/ and prints its path.
# Runs as root (apt); the build itself needs no root (Rules-Requires-Root: no).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${SPICE_LIBVIRT_DEB_WHEELS:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --find-links) WHEELS=${2:?--find-links needs a directory}; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# Debian's tools and Debian's python3 only: not a pyenv, venv or /usr/local interpreter
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

say() { echo "build-deb: $*" >&2; }
die() { echo "build-deb: $*" >&2; exit 1; }

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/spice_libvirt/__init__.py")
debversion=$(dpkg-parsechangelog -l "$ROOT/debian/changelog" -S Version 2>/dev/null \
    || sed -n '1s/^spice-libvirt (\([^)]*\)).*/\1/p' "$ROOT/debian/changelog")
[ -n "$version" ] || die "no __version__ in spice_libvirt/__init__.py"
[ "$debversion" = "$version" ] \
    || die "debian/changelog says $debversion, spice_libvirt/__init__.py says $version: add a changelog entry"

# 1. tools and Build-Depends ------------------------------------------------------------
need=()
for tool in dpkg-buildpackage:dpkg-dev dpkg-checkbuilddeps:dpkg-dev lintian:lintian; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
if ! (cd "$ROOT" && dpkg-checkbuilddeps) 2>/dev/null; then
    say "installing the Build-Depends of debian/control"
    DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -q "$ROOT" >/dev/null
fi

# 2. a private copy of what the package is built from -----------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spice-libvirt-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/spice-libvirt-$version"
mkdir "$SRC"
cp -a "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$SRC/"
cp -a "$ROOT/debian" "$SRC/debian"
rm -rf "$SRC/debian/vendor-wheels" "$SRC/debian/spice-libvirt" "$SRC/debian/.debhelper"
(cd "$ROOT" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' spice_libvirt) | tar -xf - -C "$SRC"

# 3. the bundled wheels, every hash checked ----------------------------------------------
pip=(python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all:
     --require-hashes --dest "$SRC/debian/vendor-wheels" --requirement "$SRC/debian/vendor.txt")
if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || die "$WHEELS: no such directory (--find-links)"
    pip+=(--no-index --find-links "$WHEELS")
fi
PIP_CONFIG_FILE=/dev/null "${pip[@]}" || die "the wheels of debian/vendor.txt could not be fetched"

# 4. build and check -------------------------------------------------------------------------
say "building spice-libvirt $version in $SRC"
(cd "$SRC" && dpkg-buildpackage -b -us -uc --no-pre-clean >"$WORK/build.log" 2>&1) || {
    tail -n 60 "$WORK/build.log" >&2
    die "dpkg-buildpackage failed (the end of its log is above)"
}
deb=$(ls "$WORK"/spice-libvirt_"${version}"_*.deb)
changes=$(ls "$WORK"/spice-libvirt_"${version}"_*.changes)
say "lintian $(basename "$deb")"
lintian --fail-on error,warning --info --tag-display-limit 0 "$changes" >&2 \
    || die "lintian found errors or warnings (listed above)"

# 5. the result ----------------------------------------------------------------------------
mkdir -p "$ROOT/dist"
cp "$deb" "$ROOT/dist/"
echo "$ROOT/dist/$(basename "$deb")"
