#!/usr/bin/env bash
# Set everything up and run the whole test suite against real QEMU, libvirtd, SPICE clients,
# then the linters. Extra arguments go to pytest (e.g. scripts/test.sh -m "not libvirt").
# Exit status: 0 only if everything passed; pytest's "no tests collected" (5) is a failure.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

bash scripts/setup.sh || exit 1

.venv/bin/pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "test: pytest collected no tests; that is a failure" >&2
    exit 1
fi
[ "$status" -eq 0 ] || exit "$status"

.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
.venv/bin/mypy || exit 1
