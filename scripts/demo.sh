#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: set everything up, start the built-in lab (two
# QEMUs on loopback, the source running a guest with a SPICE display), migrate it with the
# embedded SPICE client attached and print the verdict, then tear the lab down.
#
#   bash scripts/demo.sh            # firmware guest under KVM: the race case (tens of ms)
#   GUEST=linux bash scripts/demo.sh  # Linux guest streaming records through a SPICE port
#
# Exit status: the verdict's (0 seamless, 8 not seamless, 7 failed; see README).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
LAB_DIR=$(mktemp -d "${TMPDIR:-/tmp}/spice-libvirt-demo.XXXXXX")
CLI=("$ROOT/.venv/bin/spice-libvirt" lab --dir "$LAB_DIR")
cleanup() {
    "${CLI[@]}" down >/dev/null 2>&1 || true
    rm -rf "$LAB_DIR"
}
trap cleanup EXIT
"${CLI[@]}" up --guest "${GUEST:-firmware}"
echo
status=0
"${CLI[@]}" migrate || status=$?
echo
echo "(the lab is torn down again; 'spice-libvirt lab migrate --json' gives the full timed report)"
exit "$status"
